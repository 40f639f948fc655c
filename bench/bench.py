"""usbipy's server side by side with usbip 0.7.0 (the fastest Python peer), in one run.

    python bench/bench.py [--json results.json] [--quick]

Both servers run as subprocesses pinned to one core, the client (usbipy's
userspace client) to another. Each workload runs against each server in turn;
the table gives throughput, the server's CPU time per URB (from /proc, so a
client-bound run still compares fairly) and the ratio usbipy/peer.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from usbipy.client import RemoteDevice, import_device
from usbipy.protocol import Direction

ROOT = Path(__file__).resolve().parent
PEER_VENV = ROOT / ".venv-peer"
PEER_VERSION = "usbip==0.7.0"
CLK_TCK = os.sysconf("SC_CLK_TCK")
GET_DEVICE = bytes.fromhex("8006000100001200")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime + stime


def peer_python() -> str:
    python = PEER_VENV / "bin/python"
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(PEER_VENV)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "-q", PEER_VERSION], check=True)
    return str(python)


class Server:
    def __init__(self, name: str, argv: list[str], busid: str, core: int) -> None:
        self.name = name
        self.port = free_port()
        self.busid = busid
        self.proc = subprocess.Popen([a.replace("{port}", str(self.port)) for a in argv],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                     preexec_fn=lambda: os.sched_setaffinity(0, {core}))
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    raise RuntimeError(f"{name} did not start") from None
                time.sleep(0.1)

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=30)


async def endpoints(dev: RemoteDevice) -> tuple[int, int]:
    """Bulk IN and OUT endpoint numbers from the configuration descriptor."""
    config = await dev.control(0x80, 6, 0x0200, 0, 255)
    ep_in = ep_out = 0
    i = 0
    while i < len(config):
        length, kind = config[i], config[i + 1]
        if kind == 5 and config[i + 3] & 3 == 2:
            if config[i + 2] & 0x80:
                ep_in = config[i + 2] & 0x0F
            else:
                ep_out = config[i + 2] & 0x0F
        i += length
    await dev.control(0x00, 9, config[5], 0, b"")
    return ep_in, ep_out


async def control(dev: RemoteDevice, count: int, depth: int) -> int:
    async def worker(n: int) -> None:
        for _ in range(n):
            ret = await dev.submit(0, Direction.IN, 18, setup=GET_DEVICE)
            assert ret.status == 0
    await asyncio.gather(*(worker(count // depth) for _ in range(depth)))
    return (count // depth) * depth


async def bot(dev: RemoteDevice, count: int, depth: int, write: bool) -> int:
    ep_in, ep_out = await endpoints(dev)
    size = 64 * 1024
    payload = os.urandom(size)
    tag = 0
    lock = asyncio.Lock()  # BOT is one command at a time: keep the URB order per command

    async def one(lba: int) -> None:
        nonlocal tag
        async with lock:
            tag += 1
            op = 0x2A if write else 0x28
            cdb = struct.pack(">BBIBHB", op, 0, lba, 0, size // 512, 0)
            cbw = struct.pack("<IIIBBB16s", 0x43425355, tag, size, 0 if write else 0x80, 0, 10,
                              cdb)
            futures = [dev.submit_nowait(ep_out, Direction.OUT, data=cbw)[1]]
            if write:
                futures.append(dev.submit_nowait(ep_out, Direction.OUT, data=payload)[1])
            else:
                futures.append(dev.submit_nowait(ep_in, Direction.IN, size)[1])
            futures.append(dev.submit_nowait(ep_in, Direction.IN, 13)[1])
        results = await asyncio.gather(*futures)
        assert all(r.status == 0 for r in results), [r.status for r in results]

    async def worker(n: int, start: int) -> None:
        for i in range(n):
            await one((start + i * 128) % 100_000)
    await asyncio.gather(*(worker(count // depth, d * 7) for d in range(depth)))
    return (count // depth) * depth


Workload = Callable[[RemoteDevice], Awaitable[int]]


async def measure(server: Server, work: Workload) -> tuple[float, float, int]:
    async with await import_device("127.0.0.1", server.busid, server.port) as dev:
        await work(dev)  # warm up
        cpu0, t0 = cpu_seconds(server.proc.pid), time.perf_counter()
        urbs = await work(dev)
        elapsed = time.perf_counter() - t0
        cpu = cpu_seconds(server.proc.pid) - cpu0
    return elapsed, cpu, urbs


def _ratio(a: float, b: float) -> str:
    return f"{a / b:>6.2f}" if b else "   n/a"  # CPU time is counted in clock ticks


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--json", type=Path, help="write the results here too")
    parser.add_argument("--quick", action="store_true", help="fewer iterations")
    args = parser.parse_args()
    scale = 1 if not args.quick else 4
    os.sched_setaffinity(0, {0})
    servers = [
        Server("usbipy", [sys.executable, "-m", "usbipy.cli.usbipyd", "--demo", "--tcp-port",
                          "{port}"], "1-2", core=1),
        Server("usbip-0.7.0", [peer_python(), str(ROOT / "peer_usbip070.py"), "{port}"], "1-1",
               core=1),
    ]
    n_ctl, n_bot = 4000 // scale, 400 // scale
    workloads: list[tuple[str, str, Workload, int]] = [
        ("GET_DESCRIPTOR depth 1", "URB/s", lambda d: control(d, n_ctl // 4, 1), 1),
        ("GET_DESCRIPTOR depth 32", "URB/s", lambda d: control(d, n_ctl, 32), 1),
        ("READ(10) 64 KiB depth 1", "MB/s", lambda d: bot(d, n_bot, 1, False), 3),
        ("READ(10) 64 KiB depth 4", "MB/s", lambda d: bot(d, n_bot, 4, False), 3),
        ("WRITE(10) 64 KiB depth 1", "MB/s", lambda d: bot(d, n_bot, 1, True), 3),
        ("WRITE(10) 64 KiB depth 4", "MB/s", lambda d: bot(d, n_bot, 4, True), 3),
    ]
    results: list[dict[str, object]] = []
    try:
        for name, unit, work, urbs_per_op in workloads:
            row: dict[str, object] = {"workload": name, "unit": unit}
            for server in servers:
                elapsed, cpu, ops = asyncio.run(measure(server, work))
                rate = ops / elapsed if unit == "URB/s" else ops * 65536 / elapsed / 1e6
                per_urb = cpu / (ops * urbs_per_op) * 1e6
                row[server.name] = {"rate": rate, "cpu_us_per_urb": per_urb}
            results.append(row)
    finally:
        for server in servers:
            server.stop()
    a, b = servers[0].name, servers[1].name
    print(f"{'workload':<26} {'unit':>5} {a:>10} {b:>12} {'ratio':>7}   "
          f"{'CPU/URB ' + a:>14} {'CPU/URB ' + b:>18} {'ratio':>6}")
    for row in results:
        ra, rb = row[a], row[b]
        assert isinstance(ra, dict) and isinstance(rb, dict)
        print(f"{row['workload']:<26} {row['unit']:>5} {ra['rate']:>10.1f} {rb['rate']:>12.1f} "
              f"{ra['rate'] / rb['rate']:>6.2f}x   {ra['cpu_us_per_urb']:>11.1f} us "
              f"{rb['cpu_us_per_urb']:>15.1f} us "
              f"{_ratio(ra['cpu_us_per_urb'], rb['cpu_us_per_urb'])}")
    if args.json:
        args.json.write_text(json.dumps({"time": time.time(), "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
