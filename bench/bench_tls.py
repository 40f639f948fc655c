"""What mutual TLS costs usbipyd: the same server with and without TLS, in one run.

    python bench/bench_tls.py [--rounds N] [--duration S] [--json results.json]

Two usbipy servers (bench/server_usbipy.py) export the same devices, one in
plaintext and one over mutual TLS (userspace TLS, or kernel TLS where this
host has it and --ktls is given). The lean client (bench/fastclient.py)
drives the plaintext one; the TLS one is driven by bench/tlsclient.py, which
seals its requests before the clock starts and counts the replies by record
length, so that a client busy with its own crypto does not starve the server
(which would inflate the server's CPU time per URB). The table gives each
server's rate and CPU time per URB and the ratio TLS/plaintext, the figure to
hold under 1.3 on the Python-served path.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script

from bench.bench import (  # noqa: E402
    BLOCK,
    CLIENT_CORE,
    GET_DEVICE,
    ROOT,
    Server,
    Workload,
    measure,
    median_sample,
    read10,
    write_results,
)
from bench.fastclient import IN, FastClient  # noqa: E402
from bench.tlsclient import SealedClient, counted_pipeline  # noqa: E402
from usbipy.tls import TlsFiles, certs, client_context  # noqa: E402

#: Upper bounds of operations per second, for how many requests to seal ahead.
MOST_PER_S = {"control": 300_000, "read": 30_000}


def _client(server: Server, interface_class: int) -> FastClient:
    busid = server.busid(interface_class)
    if server.tls is None:
        return FastClient("127.0.0.1", server.port, busid)
    return SealedClient("127.0.0.1", server.port, busid, server.tls)


def _run(client: FastClient, make_op: Callable[[], list[bytes]], reply_bytes: int,
         depth: int, duration: float, kind: str) -> tuple[int, int]:
    per_op = len(make_op())
    client._directions.clear()
    most = int(MOST_PER_S[kind] * duration) + depth
    if isinstance(client, SealedClient):
        ops = client.pipelined(make_op, reply_bytes, depth, duration, most)
    else:  # the same loop, the same batches: only the TLS differs
        requests = [b"".join(make_op()) for _ in range(most)]
        ops = counted_pipeline(client.sock, requests, len, reply_bytes, depth, duration)
    return ops, ops * per_op


def control(server: Server, depth: int, duration: float) -> tuple[int, int]:
    client = _client(server, 0x03)
    try:
        return _run(client, lambda: [client.request(IN, 0, 18, GET_DEVICE)], 48 + 18, depth,
                    duration, "control")
    finally:
        client.close()


def read(server: Server, duration: float) -> tuple[int, int]:
    client = _client(server, 0x08)
    try:
        op = read10(client)
        # replies: the CBW's (a header), the block's, the CSW's
        return _run(client, op, 48 + (48 + BLOCK) + (48 + 13), 1, duration, "read")
    finally:
        client.close()


#: The workloads the TLS goal names, and depth 1 for the picture.
WORKLOADS = [
    Workload("GET_DESCRIPTOR depth 32", "URB/s", lambda s, d: control(s, 32, d)),
    Workload("READ(10) 64 KiB depth 1", "MB/s", read, BLOCK),
    Workload("GET_DESCRIPTOR depth 1", "URB/s", lambda s, d: control(s, 1, d)),
]


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
            for work in WORKLOADS:
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
        write_results(args.json, args.duration, args.rounds, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
