"""What a flood of connections does to a real client of usbipyd, with its default limits.

    python bench/bench_flood.py [--tries N] [--flood N]

Starts usbipyd (this tree, --demo, default limits) on 127.0.0.1, then times a
real client (127.0.0.1) listing the devices and importing the disk, N times
each, in five situations: no load; N silent connections from one address
(127.0.1.1); N silent connections spread over 20 addresses (which fill the
total cap, so the oldest make room); 200 clients that trickle a request one
byte every 0.2 s; and the same silent flood against the TLS port (handshakes
that never start). Prints the median and the worst time of each, and what the
server held. Loopback only.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script

from usbipy.client import import_device, list_devices  # noqa: E402
from usbipy.tls import TlsFiles, certs, client_context  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start(args: list[str], log: Path) -> subprocess.Popen[bytes]:
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "usbipy.cli.usbipyd", "-c", os.devnull,
                                 "--demo",
                                 "--disk-size", "1048576", "--no-usbip-host", "--no-libusb",
                                 *args], stderr=out,
                                env={**os.environ, "PYTHONPATH": str(ROOT / "src")})
    deadline = time.monotonic() + 60
    while "exporting 1-3" not in log.read_text():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(log.read_text())
        time.sleep(0.05)
    return proc


async def connect(port: int, source: str) -> socket.socket:
    sock = socket.socket()
    sock.setblocking(False)
    sock.bind((source, 0))
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
    return sock


async def timed(tries: int, op: Callable[[], Awaitable[object]]) -> list[float]:
    times = []
    for _ in range(tries):
        t0 = time.perf_counter()
        await op()
        times.append(time.perf_counter() - t0)
    return times


def show(name: str, times: list[float]) -> None:
    print(f"  {name:<8} median {statistics.median(times) * 1000:6.1f} ms, "
          f"worst {max(times) * 1000:6.1f} ms")


async def situation(title: str, port: int, tries: int, tls: ssl.SSLContext | None,
                    load: Callable[[], Awaitable[Callable[[], None]]]) -> None:
    # The real client opens 2 x tries connections per situation: at the default accept
    # rate (20 a second, bursts of 100, per address) its bucket needs 5 s to refill.
    await asyncio.sleep(5)
    stop = await load()
    try:
        await asyncio.sleep(0.5)  # (the server takes the flood in)

        async def list_() -> None:
            await list_devices("127.0.0.1", port, tls=tls)

        async def import_() -> None:
            device = await import_device("127.0.0.1", "1-2", port, tls=tls)
            await device.close()

        print(title)
        show("list", await timed(tries, list_))
        show("import", await timed(tries, import_))
    finally:
        stop()


def silent(port: int, flood: int, addresses: int) -> Callable[[], Awaitable[Callable[[], None]]]:
    async def load() -> Callable[[], None]:
        socks = []
        for n in range(flood):
            try:
                socks.append(await connect(port, f"127.0.1.{1 + n % addresses}"))
            except OSError:
                pass  # (refused by a cap: the server said no at once)
        def stop() -> None:
            for sock in socks:
                sock.close()
        return stop
    return load


def trickling(port: int, clients: int) -> Callable[[], Awaitable[Callable[[], None]]]:
    async def load() -> Callable[[], None]:
        socks = [await connect(port, f"127.0.2.{1 + n % 50}") for n in range(clients)]
        loop = asyncio.get_running_loop()

        async def drip(sock: socket.socket) -> None:
            for byte in bytes.fromhex("0111800300000000") * 100:
                try:
                    await loop.sock_sendall(sock, bytes([byte]))
                except OSError:
                    return
                await asyncio.sleep(0.2)

        tasks = [asyncio.create_task(drip(s)) for s in socks]

        def stop() -> None:
            for task in tasks:
                task.cancel()
            for sock in socks:
                sock.close()
        return stop
    return load


async def none() -> Callable[[], None]:
    return lambda: None


async def run(args: argparse.Namespace, port: int, tls_port: int, tls: ssl.SSLContext
              ) -> None:
    await situation("no load", port, args.tries, None, none)
    await situation(f"{args.flood} silent connections from one address", port, args.tries,
                    None, silent(port, args.flood, 1))
    await situation(f"{args.flood} silent connections from 20 addresses", port, args.tries,
                    None, silent(port, args.flood, 20))
    await situation("200 clients trickling a byte every 0.2 s", port, args.tries, None,
                    trickling(port, 200))
    await situation("TLS, no load", tls_port, args.tries, tls, none)
    await situation(f"TLS, {args.flood} silent connections from 20 addresses", tls_port,
                    args.tries, tls, silent(tls_port, args.flood, 20))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tries", type=int, default=20, help="at most 50: the accept rate")
    parser.add_argument("--flood", type=int, default=1000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp)
        certs.init_ca(base)
        certs.issue("localhost", server=True, base=base, alt_names=("127.0.0.1",))
        certs.issue("client", server=False, base=base)
        t = base / "tls"
        port, tls_port = free_port(), free_port()
        plain = start(["-t", str(port)], base / "plain.log")
        secure = start(["-t", str(tls_port), "--ktls", "off", "--tls-cert",
                        str(t / "localhost.pem"), "--tls-key", str(t / "localhost-key.pem"),
                        "--tls-ca", str(t / "ca.pem")], base / "tls.log")
        try:
            tls = client_context(TlsFiles(t / "client.pem", t / "client-key.pem",
                                          t / "ca.pem"))
            asyncio.run(run(args, port, tls_port, tls))
        finally:
            for proc in (plain, secure):
                proc.send_signal(signal.SIGTERM)
                proc.wait(timeout=30)
        print("server log lines about the floods:")
        for log in ("plain.log", "tls.log"):
            for line in (base / log).read_text().splitlines():
                if any(w in line for w in ("refused:", "make room", "closing the connection")):
                    print(f"  {log}: {line}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
