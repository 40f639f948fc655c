"""What mutual TLS costs usbipyd: the same server with and without TLS, in one run.

    python bench/bench_tls.py [--rounds N] [--duration S] [--json results.json]

Two usbipy servers (bench/server_usbipy.py) export the same devices, one in
plaintext and one over mutual TLS (userspace TLS, or kernel TLS where this
host has it and --ktls is given). The lean client (bench/fastclient.py)
drives both, pinned to its own core; with TLS it encrypts on that core too.
The table gives each server's rate and CPU time per URB and the ratio
TLS/plaintext, the figure to hold under 1.3 on the Python-served path.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script

from bench.bench import (  # noqa: E402
    CLIENT_CORE,
    ROOT,
    WORKLOADS,
    Server,
    measure,
    median_sample,
)
from usbipy.tls import TlsFiles, certs, client_context  # noqa: E402

#: The workloads the TLS goal names, and two more for the picture.
NAMES = ("GET_DESCRIPTOR depth 32", "READ(10) 64 KiB depth 1", "GET_DESCRIPTOR depth 1",
         "WRITE(10) 64 KiB depth 1")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=2.0, help="seconds per measurement")
    parser.add_argument("--rounds", type=int, default=5,
                        help="measurements per server and workload, alternating order")
    parser.add_argument("--ktls", action="store_true",
                        help="the TLS server hands its sessions to kernel TLS")
    parser.add_argument("--asyncio", action="store_true",
                        help="serve on asyncio's loop rather than uvloop")
    parser.add_argument("--json", type=Path, help="write the results here too")
    args = parser.parse_args()
    os.sched_setaffinity(0, {CLIENT_CORE})
    with tempfile.TemporaryDirectory() as where:
        base = Path(where)
        certs.init_ca(base)
        certs.issue("server", server=True, base=base, alt_names=("127.0.0.1",))
        client = certs.issue("client", server=False, base=base)
        tls_env = {**os.environ, "BENCH_TLS": str(base / "tls"),
                   "BENCH_KTLS": "1" if args.ktls else "0"}
        context = client_context(TlsFiles(client.cert, client.key, client.ca))
        script = [sys.executable, str(ROOT / "server_usbipy.py"),
                  *(["--asyncio"] if args.asyncio else [])]
        servers = [Server("plaintext", script),
                   Server("kernel TLS" if args.ktls else "TLS", script, tls_env, context)]
        plain, tls = servers[0].name, servers[1].name
        results: list[dict[str, object]] = []
        try:
            for work in [w for w in WORKLOADS if w.name in NAMES]:
                samples: dict[str, list[dict[str, float]]] = {s.name: [] for s in servers}
                for n in range(max(1, args.rounds)):
                    for server in servers if n % 2 == 0 else servers[::-1]:
                        samples[server.name].append(measure(server, work, args.duration))
                row: dict[str, object] = {"workload": work.name, "unit": work.unit}
                for server in servers:
                    row[server.name] = median_sample(samples[server.name])
                # the ratio per round, then its median: both servers saw the same moment
                row["cpu_ratio"] = statistics.median(
                    t["cpu_us_per_urb"] / p["cpu_us_per_urb"]
                    for t, p in zip(samples[tls], samples[plain], strict=True))
                results.append(row)
        finally:
            for server in servers:
                server.stop()
    print(f"{'workload':<27} {'unit':>5} {plain:>10} {tls:>10} {'ratio':>6}   "
          f"{'CPU/URB ' + plain:>18} {'CPU/URB ' + tls:>14} {'ratio':>6}")
    for row in results:
        p, t = row[plain], row[tls]
        assert isinstance(p, dict) and isinstance(t, dict)
        print(f"{row['workload']:<27} {row['unit']:>5} {p['rate']:>10.1f} {t['rate']:>10.1f} "
              f"{t['rate'] / p['rate']:>5.2f}x   {p['cpu_us_per_urb']:>15.1f} us "
              f"{t['cpu_us_per_urb']:>11.1f} us {row['cpu_ratio']:>6.2f}")
    if args.json:
        args.json.write_text(json.dumps({
            "time": time.time(), "python": platform.python_version(),
            "machine": platform.machine(), "cpus": os.cpu_count(),
            "duration_s": args.duration, "rounds": args.rounds, "results": results},
            indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
