"""A client whose connection is paused by flow control still leaves: usbipyd notices
its FIN, its reset and its silence, releases the device and gives back what it held.

Each test runs its own usbipyd (the demo devices, in a process of its own, so
that its memory and descriptors can be read from /proc) and attacks it as a
hostile client would: it fills one of the server's flow-control caps so that
the server stops reading, then leaves. The device must import again within
the dead-peer bound (RELEASED_WITHIN), and the server's RSS and descriptors
come back.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import ssl
import struct
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from usbipy.protocol import (
    ClientConnection,
    Direction,
    OpRepImport,
    OpReqImport,
    OpStatus,
    RetSubmit,
)
from usbipy.server.connection import PAUSED_WATCH_INTERVAL
from usbipy.tls import TlsFiles, certs

from ..helpers import free_port, wait_for_log

HOST = "127.0.0.1"
#: The dead-peer bound usbipyd runs with in these tests (its default)...
BOUND = 15.0
#: ... and a shorter one, where a test waits for all of it.
DEAD_PEER_TIMEOUT = 4.0
#: How soon a paused client that left has its device released, at the latest: a FIN
#: queued behind URBs the server does not read may never reach it (the server's
#: window is shut), and then the stall rule takes the whole dead-peer bound, seen
#: by a look at the socket once a second; and the slack of a slow host.
RELEASED_WITHIN = BOUND + PAUSED_WATCH_INTERVAL + 5.0
SET_CONFIGURATION_1 = bytes.fromhex("0009010000000000")


@dataclass(frozen=True)
class Pki:
    server: TlsFiles
    client: TlsFiles


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    base = tmp_path_factory.mktemp("pki")
    certs.init_ca(base)
    server = certs.issue("usbipy-test", server=True, base=base, alt_names=("127.0.0.1",))
    client = certs.issue("alice", server=False, base=base)
    return Pki(TlsFiles(server.cert, server.key, server.ca),
               TlsFiles(client.cert, client.key, client.ca))


@dataclass
class Daemon:
    proc: subprocess.Popen[bytes]
    port: int
    log: Path
    connect: Callable[[], socket.socket]

    def rss_kib(self) -> int:
        status = Path(f"/proc/{self.proc.pid}/status").read_text()
        return int(next(line for line in status.splitlines()
                        if line.startswith("VmRSS:")).split()[1])

    def fds(self) -> int:
        return len(os.listdir(f"/proc/{self.proc.pid}/fd"))


@pytest.fixture(params=[("plaintext", "asyncio"), ("tls", "asyncio"), ("plaintext", "uvloop"),
                        ("tls", "uvloop")], ids="-".join)
def daemon(request: pytest.FixtureRequest, tmp_path: Path, pki: Pki) -> Iterator[Daemon]:
    protection, loop = request.param
    port = free_port()
    log = tmp_path / "usbipyd.log"
    args = [sys.executable, "-m", "usbipy.cli.usbipyd", "-c", os.devnull, "--demo",
            "--disk-size", "1048576", "-t", str(port), "-a", HOST, "--no-usbip-host",
            "--no-libusb", "--loop", loop, "-d"]
    if (marker := request.node.get_closest_marker("dead_peer_timeout")) is not None:
        args += ["--dead-peer-timeout", str(marker.args[0])]
    context: ssl.SSLContext | None = None
    if protection == "tls":
        args += ["--tls-cert", str(pki.server.cert), "--tls-key", str(pki.server.key),
                 "--tls-ca", str(pki.server.ca), "--ktls", "off"]
        context = ssl.create_default_context(cafile=str(pki.client.ca))
        context.load_cert_chain(str(pki.client.cert), str(pki.client.key))

    def connect() -> socket.socket:
        sock = socket.create_connection((HOST, port))
        return context.wrap_socket(sock, server_hostname=HOST) if context else sock

    with open(log, "w") as out:
        proc = subprocess.Popen(args, stderr=out)
    try:
        wait_for_log(proc, log, "exporting 1-3")
        yield Daemon(proc, port, log, connect)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)


def _recv_exactly(sock: socket.socket, n: int) -> bytes:
    data = bytearray()
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise ConnectionError("the server closed the connection")
        data += chunk
    return bytes(data)


def _events(sock: socket.socket, client: ClientConnection, n: int) -> list[object]:
    """The next ``n`` messages from the server."""
    events: list[object] = []
    while len(events) < n:
        events += client.events()
        if len(events) < n:
            chunk = sock.recv(65536)
            if not chunk:
                raise ConnectionError("the server closed the connection")
            client.receive_data(chunk)
    return events


def _import(daemon: Daemon, busid: str) -> tuple[socket.socket, ClientConnection, int]:
    """A connection that has imported ``busid`` and set its configuration 1."""
    sock = daemon.connect()
    sock.settimeout(30)
    client = ClientConnection()
    sock.sendall(client.send(OpReqImport(busid)))
    [reply] = _events(sock, client, 1)
    assert isinstance(reply, OpRepImport) and reply.status == OpStatus.OK, reply
    assert reply.device is not None
    devid = reply.device.busnum << 16 | reply.device.devnum
    sock.sendall(client.send_submit(client.next_seqnum(), devid, Direction.OUT, 0, 0, 0,
                                    SET_CONFIGURATION_1))
    [done] = _events(sock, client, 1)
    assert isinstance(done, RetSubmit) and done.status == 0, done
    return sock, client, devid


def _interrupt_ins(sock: socket.socket, client: ClientConnection, devid: int) -> None:
    """4096 interrupt IN URBs to the keyboard, which nobody types on: the server's
    cap of URBs in flight, so it stops reading."""
    sock.sendall(b"".join(client.send_submit(client.next_seqnum(), devid, Direction.IN, 1,
                                             0, 8)
                          for _ in range(4096 + 64)))  # (and some it will not read)


def _bulk_outs(sock: socket.socket, client: ClientConnection, devid: int) -> None:
    """16 MiB bulk OUT URBs to the echoing serial port, never read back: past the
    server's cap of OUT bytes held (the first is taken at once), so it stops reading."""
    data = bytes(16 << 20)
    sock.settimeout(5)
    try:
        for _ in range(6):
            sock.sendall(client.send_submit(client.next_seqnum(), devid, Direction.OUT, 2,
                                            0, len(data), data=data))
    except TimeoutError:
        pass  # the server stopped reading, as it should: enough is held


def _leave(sock: socket.socket, how: str) -> None:
    if how == "reset":  # SO_LINGER 0: close() sends a RST
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    else:
        # A FIN, and only a FIN: every reply read first (close() with unread data
        # would send a RST). Queued behind URBs the server does not read, it may
        # never reach the server at all.
        sock.setblocking(False)
        try:
            while sock.recv(65536):
                pass
        except (BlockingIOError, ssl.SSLWantReadError):
            pass
        sock.setblocking(True)
        if not isinstance(sock, ssl.SSLSocket):
            sock.shutdown(socket.SHUT_WR)
    sock.close()


def _imports_again(daemon: Daemon, busid: str, within: float) -> float:
    """Seconds until ``busid`` imports again (DEV_BUSY meanwhile)."""
    start = time.monotonic()
    while True:
        sock = daemon.connect()
        try:
            sock.settimeout(10)
            client = ClientConnection()
            sock.sendall(client.send(OpReqImport(busid)))
            [reply] = _events(sock, client, 1)
        finally:
            sock.close()
        assert isinstance(reply, OpRepImport)
        if reply.status == OpStatus.OK:
            return time.monotonic() - start
        assert reply.status == OpStatus.DEV_BUSY, reply
        assert time.monotonic() - start < within, (
            f"{busid} still busy after {within:g} s:\n{daemon.log.read_text()[-3000:]}")
        time.sleep(0.2)


def _settled(read: Callable[[], int], target: int, slack: int, within: float) -> int:
    """``read()`` once it is at most ``target + slack`` (polled up to ``within`` s)."""
    deadline = time.monotonic() + within
    while (value := read()) > target + slack and time.monotonic() < deadline:
        time.sleep(0.2)
    return value


@pytest.mark.parametrize("how", ["fin", "reset"])
@pytest.mark.parametrize(("busid", "attack"), [("1-1", _interrupt_ins), ("1-3", _bulk_outs)],
                         ids=["4096-interrupt-ins", "16MiB-bulk-outs"])
def test_a_paused_client_that_leaves_releases_its_device_and_what_it_held(
        daemon: Daemon, busid: str, attack: Callable[[socket.socket, ClientConnection, int],
                                                     None], how: str) -> None:
    # the baseline: after one import, so that what an import loads once is counted
    sock, _client, _devid = _import(daemon, busid)
    sock.close()
    _imports_again(daemon, busid, BOUND)
    rss, fds = daemon.rss_kib(), daemon.fds()

    sock, client, devid = _import(daemon, busid)
    attack(sock, client, devid)
    # the server holds the device while the client is there
    probe = daemon.connect()
    probe.settimeout(10)
    probe.sendall(ClientConnection().send(OpReqImport(busid)))
    assert _recv_exactly(probe, 8)[4:8] == struct.pack(">I", OpStatus.DEV_BUSY)
    probe.close()
    _leave(sock, how)

    took = _imports_again(daemon, busid, RELEASED_WITHIN)
    assert took < RELEASED_WITHIN
    log = daemon.log.read_text()
    assert "while its reading was paused" in log, log[-3000:]
    # every byte and descriptor the connection held is given back
    assert _settled(daemon.fds, fds, 0, 10) <= fds
    assert _settled(daemon.rss_kib, rss, 8 << 10, 10) <= rss + (8 << 10)


@pytest.mark.dead_peer_timeout(DEAD_PEER_TIMEOUT)
def test_a_client_that_stops_reading_its_replies_is_dead_after_the_bound(
        daemon: Daemon) -> None:
    """Flow control is no way to hold a device: a client that takes none of its
    replies is dropped after dead_peer_timeout, however alive its TCP stack is."""
    sock, client, devid = _import(daemon, "1-3")
    data = bytes(1 << 20)
    sock.settimeout(5)
    sent = 0
    try:
        for _ in range(64):  # 64 MiB echoed back, none of it read
            sock.sendall(client.send_submit(client.next_seqnum(), devid, Direction.OUT, 2,
                                            0, len(data), data=data))
            sock.sendall(client.send_submit(client.next_seqnum(), devid, Direction.IN, 1,
                                            0, len(data)))
            sent += 1
    except (TimeoutError, ConnectionError, ssl.SSLError):
        pass  # the server stopped reading (its replies wait for us), or dropped us
    assert sent < 64, "the server never stopped reading"
    _imports_again(daemon, "1-3", DEAD_PEER_TIMEOUT + BOUND)
    log = daemon.log.read_text()
    # (TCP_USER_TIMEOUT may say it first: Linux applies it to a zero window too)
    stalled = re.search(r"1-3 lost while its reading was paused: it took none of its "
                        r"replies for (\d+) s \(dead_peer_timeout\)", log)
    timed_out = "1-3 lost: the client stopped answering (dead_peer_timeout)" in log
    assert stalled is not None or timed_out, log[-3000:]
    if stalled is not None:
        assert int(stalled[1]) >= DEAD_PEER_TIMEOUT  # not before its time
    sock.close()
