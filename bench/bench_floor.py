"""usbipyd's emulated disk against the floor, in one run: what usbipy's own work
adds to the kernel's TCP copies.

    python bench/bench_floor.py [--rounds N] [--duration S] [--json results.json]

Two servers export a Bulk-Only disk on loopback, each pinned to the server's
core: usbipy (bench/server_usbipy.py, the demo's disk on a sparse image) and
the floor (bench/floor_server.py: no disk, no checks, every READ answered from
one preallocated buffer). The lean client (bench/fastclient.py) reads and
writes 64 KiB blocks with READ(10) and WRITE(10) at depths 1 and 4, alternating
between the two within each round. The table gives each one's throughput and
server CPU time per MB, and the ratio usbipy/floor of the CPU per MB: the
median of the rounds' ratios, so both saw the same moment of a noisy machine.
The goal is 1.15 at most at depth 4.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script

from bench.bench import (  # noqa: E402
    BLOCK,
    CLIENT_CORE,
    ROOT,
    Server,
    bot,
    cpu_seconds,
    median_sample,
    write_results,
)

WORKLOADS = [("READ(10) 64 KiB depth 1", 1, False), ("READ(10) 64 KiB depth 4", 4, False),
             ("WRITE(10) 64 KiB depth 1", 1, True), ("WRITE(10) 64 KiB depth 4", 4, True)]


def measure(server: Server, depth: int, write: bool, duration: float) -> dict[str, float]:
    bot(server, depth, write, min(duration, 0.3))  # warm up
    cpu0 = cpu_seconds(server.proc.pid)
    t0 = time.perf_counter()
    ops, _urbs = bot(server, depth, write, duration)
    elapsed = time.perf_counter() - t0
    mb = ops * BLOCK / 1e6
    return {"mb_s": mb / elapsed,
            "server_cpu_ms_per_mb": (cpu_seconds(server.proc.pid) - cpu0) / mb * 1e3}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=2.0, help="seconds per measurement")
    parser.add_argument("--rounds", type=int, default=5,
                        help="measurements per server and workload, alternating order")
    parser.add_argument("--json", type=Path, help="write the results here too")
    args = parser.parse_args()
    os.sched_setaffinity(0, {CLIENT_CORE})
    usbipy = Server("usbipy", [sys.executable, str(ROOT / "server_usbipy.py")])
    floor = Server("floor", [sys.executable, str(ROOT / "floor_server.py")])
    results: list[dict[str, object]] = []
    try:
        # the image's first pass fills the page cache (ext4 zeroes a sparse file's
        # pages as it reads them): before any measurement, not in the first one
        bot(usbipy, 4, False, 1.0)
        for name, depth, write in WORKLOADS:
            samples: dict[str, list[dict[str, float]]] = {"usbipy": [], "floor": []}
            for n in range(max(1, args.rounds)):
                for server in (usbipy, floor) if n % 2 == 0 else (floor, usbipy):
                    samples[server.name].append(measure(server, depth, write, args.duration))
            pairs = zip(samples["usbipy"], samples["floor"], strict=True)
            results.append({
                "workload": name,
                "usbipy": median_sample(samples["usbipy"]),
                "floor": median_sample(samples["floor"]),
                "server_cpu_ratio": statistics.median(
                    u["server_cpu_ms_per_mb"] / f["server_cpu_ms_per_mb"] for u, f in pairs),
            })
    finally:
        usbipy.stop()
        floor.stop()
    print(f"{'workload':<28} {'usbipy MB/s':>11} {'floor MB/s':>10}   {'usbipy ms/MB':>12} "
          f"{'floor ms/MB':>11} {'ratio':>6}")
    for row in results:
        u, f = row["usbipy"], row["floor"]
        assert isinstance(u, dict) and isinstance(f, dict)
        print(f"{row['workload']:<28} {u['mb_s']:>11.1f} {f['mb_s']:>10.1f}   "
              f"{u['server_cpu_ms_per_mb']:>12.3f} {f['server_cpu_ms_per_mb']:>11.3f} "
              f"{row['server_cpu_ratio']:>5.2f}x")
    if args.json:
        write_results(args.json, args.duration, args.rounds, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
