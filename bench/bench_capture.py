"""What capturing costs usbipyd: the same server with and without --capture, in one run.

    python bench/bench_capture.py [--rounds N] [--duration S] [--json results.json]

Two usbipy servers (bench/server_usbipy.py) export the same devices, one
recording every URB to a pcapng file (BENCH_CAPTURE), each pinned to the same
core in turn; the lean client (bench/fastclient.py) keeps 32 URBs in flight.
Rounds alternate the servers. The table gives each one's rate and CPU time per
URB (every thread of the server, the capture's writer included) and the ratio
captured/plain: the figure to hold under 1.10.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script

from bench.bench import (  # noqa: E402
    BLOCK,
    CLIENT_CORE,
    Server,
    Workload,
    bot,
    control,
    measure,
)

WORKLOADS = [
    Workload("GET_DESCRIPTOR depth 32", "URB/s", lambda s, d: control(s, 32, d)),
    Workload("READ(10) 64 KiB depth 32", "MB/s", lambda s, d: bot(s, 32, False, d), BLOCK),
    Workload("WRITE(10) 64 KiB depth 32", "MB/s", lambda s, d: bot(s, 32, True, d), BLOCK),
]
SERVER = [sys.executable, str(Path(__file__).resolve().parent / "server_usbipy.py")]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", type=float, default=2.0)
    parser.add_argument("--json", metavar="FILE")
    parser.add_argument("--only", metavar="TEXT", help="only the workloads whose name has TEXT")
    args = parser.parse_args()
    os.sched_setaffinity(0, {CLIENT_CORE})
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        capture = Path(tmp, "bench.pcapng")
        for work in [w for w in WORKLOADS if args.only is None or args.only in w.name]:
            samples: dict[str, list[dict[str, float]]] = {"plain": [], "captured": []}
            for _ in range(args.rounds):
                for name in samples:
                    env = ({**os.environ, "BENCH_CAPTURE": str(capture)} if name == "captured"
                           else None)
                    server = Server(name, SERVER, env=env)
                    try:
                        samples[name].append(measure(server, work, args.duration))
                    finally:
                        server.stop()
            plain = statistics.median(s["rate"] for s in samples["plain"])
            captured = statistics.median(s["rate"] for s in samples["captured"])
            cpu_plain = statistics.median(s["cpu_us_per_urb"] for s in samples["plain"])
            cpu_captured = statistics.median(s["cpu_us_per_urb"] for s in samples["captured"])
            rows.append({"workload": work.name, "unit": work.unit, "plain": plain,
                         "captured": captured, "cpu_us_per_urb_plain": cpu_plain,
                         "cpu_us_per_urb_captured": cpu_captured,
                         "capture_mb": capture.stat().st_size / 1e6 if capture.exists() else 0})
            print(f"{work.name:<27} {work.unit:>5}  plain {plain:10.0f}  captured "
                  f"{captured:10.0f}  rate {captured / plain:5.2f}x   CPU/URB {cpu_plain:6.1f} "
                  f"-> {cpu_captured:6.1f} us ({cpu_captured / cpu_plain:5.2f}x)", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"rounds": args.rounds,
                                               "duration_s": args.duration,
                                               "results": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
