"""Connection limits: caps, the accept rate, the OP-phase time limits, and floods that
must leave real clients served."""

from __future__ import annotations

import asyncio
import functools
import logging
import resource
import socket
import time
import types

import pytest

from usbipy.client import import_device, list_devices
from usbipy.config import Limits
from usbipy.server import UsbipServer
from usbipy.server import limits as limits_module
from usbipy.server.limits import Admission, Slot


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    fake = Clock()
    monkeypatch.setattr(limits_module, "time", types.SimpleNamespace(monotonic=fake))
    return fake


def test_every_decision_on_a_new_connection_is_the_admissions(
        clock: Clock, caplog: pytest.LogCaptureFixture) -> None:
    """accept(): the handshake cap per address first (a refused newcomer makes no one
    room), then the rate and the caps; each refusal logged; handshakes capped in all,
    the oldest ended to make room."""
    admission = Admission(Limits(accept_burst=10_000, max_connections=10_000,
                                 max_connections_per_address=10_000))
    ended: list[int] = []
    per_address = limits_module.MAX_HANDSHAKES_PER_ADDRESS
    with caplog.at_level(logging.WARNING, logger="usbipy.server"):
        for i in range(per_address):
            slot = admission.accept("10.0.0.1", f"10.0.0.1:{i}", handshake=True)
            assert isinstance(slot, Slot)
            admission.handshaking(slot, functools.partial(ended.append, i))
        assert admission.accept("10.0.0.1", "10.0.0.1:99", handshake=True) is None
        assert "10.0.0.1: too many TLS handshakes in progress" in caplog.text
        assert admission.connections == per_address  # (counted nowhere)
        # a plaintext connection is no handshake; another address has its own count
        assert admission.accept("10.0.0.1", "10.0.0.1:100") is not None
        others = 0
        while admission.handshakes < limits_module.MAX_HANDSHAKES:
            client = f"10.1.{others // per_address}.1"
            slot = admission.accept(client, client, handshake=True)
            assert slot is not None
            admission.handshaking(slot, lambda: None)
            others += 1
        assert ended == []
        newest = admission.accept("10.9.9.9", "10.9.9.9:1", handshake=True)
        assert newest is not None
        admission.handshaking(newest, lambda: None)
        assert ended == [0] and admission.handshakes == limits_module.MAX_HANDSHAKES
        assert "TLS handshakes in progress: the oldest was closed to make room" in caplog.text
        admission.handshake_over(newest)
        assert admission.handshakes == limits_module.MAX_HANDSHAKES - 1


def test_the_accept_rate_is_a_token_bucket_per_address(clock: Clock) -> None:
    admission = Admission(Limits(accept_rate=2, accept_burst=3))
    slots = [admission.admit("10.0.0.1") for _ in range(3)]
    assert all(isinstance(s, Slot) for s in slots)
    assert admission.admit("10.0.0.1") == ("more than 2 new connections a second "
                                           "(accept_rate)")
    assert isinstance(admission.admit("10.0.0.2"), Slot)  # another address has its own
    clock.now += 0.5  # one token back
    assert isinstance(admission.admit("10.0.0.1"), Slot)
    assert isinstance(admission.admit("10.0.0.1"), str)
    clock.now += 60  # refilled up to the burst, no further
    assert sum(isinstance(admission.admit("10.0.0.1"), Slot) for _ in range(10)) == 3


def test_connection_caps_and_their_release(clock: Clock) -> None:
    admission = Admission(Limits(max_connections=4, max_connections_per_address=2,
                                 accept_burst=100))
    a1, a2 = admission.admit("a"), admission.admit("a")
    assert admission.admit("a") == ("2 connections from this address "
                                    "(max_connections_per_address)")
    b1, b2 = admission.admit("b"), admission.admit("b")
    assert admission.admit("c") == "4 connections in all (max_connections)"
    assert isinstance(a1, Slot) and isinstance(b1, Slot)
    a1.release()
    a1.release()  # (idempotent: a connection leaves once)
    assert admission.connections == 3 and admission.held("a") == 1
    assert isinstance(admission.admit("c"), Slot)
    del a2, b2


def test_at_the_cap_the_longest_waiting_connection_makes_room(clock: Clock) -> None:
    admission = Admission(Limits(max_connections=3, accept_burst=100))
    closed: list[str] = []
    slots = []
    for name in ("old", "middle", "served"):
        slot = admission.admit(name)
        assert isinstance(slot, Slot)
        admission.waiting(slot, functools.partial(closed.append, name))
        slots.append(slot)
    admission.served(slots[2])  # sent its request: no longer a candidate
    assert isinstance(admission.admit("new"), Slot)
    assert closed == ["old"] and admission.connections == 3 and admission.evicted == 1
    assert admission.held("old") == 0
    assert isinstance(admission.admit("newer"), Slot)
    assert closed == ["old", "middle"]
    assert admission.admit("newest") == "3 connections in all (max_connections)"


def test_rate_buckets_stay_bounded(clock: Clock, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(Admission, "MAX_BUCKETS", 100)
    admission = Admission(Limits(accept_burst=5, max_connections=10_000))
    for n in range(1000):
        slot = admission.admit(f"10.0.{n // 256}.{n % 256}")
        assert isinstance(slot, Slot)
        slot.release()
        clock.now += 0.01
    assert len(admission._buckets) <= 100


# --- the server ---------------------------------------------------------------------


async def _connect(port: int, source: str) -> socket.socket:
    sock = socket.socket()
    sock.setblocking(False)
    sock.bind((source, 0))
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
    return sock


async def _closed_by_server(sock: socket.socket, ceiling: float) -> float:
    """Seconds until the server closes ``sock``."""
    loop = asyncio.get_running_loop()
    start = time.monotonic()
    async with asyncio.timeout(ceiling):
        while True:
            try:
                if await loop.sock_recv(sock, 1) == b"":
                    break
            except ConnectionResetError:
                break
    return time.monotonic() - start


def test_a_silent_connection_is_closed_after_the_idle_timeout(serve, caplog) -> None:
    caplog.set_level(logging.INFO, "usbipy.server")

    async def test(server: UsbipServer) -> None:
        silent = await _connect(server.port, "127.0.0.2")
        try:
            waited = await _closed_by_server(silent, 30)
        finally:
            silent.close()
        assert waited >= 0.4 * 0.9
        assert server.access.admission.connections == 0

    serve(test, limits=Limits(idle_timeout=0.4, request_timeout=30))
    assert "nothing sent for 0.4 s in the OP phase (idle_timeout)" in caplog.text


def test_a_trickling_connection_is_closed_after_the_request_timeout(serve, caplog) -> None:
    caplog.set_level(logging.INFO, "usbipy.server")

    async def test(server: UsbipServer) -> None:
        loop = asyncio.get_running_loop()
        slow = await _connect(server.port, "127.0.0.2")

        async def trickle() -> None:
            # an OP_REQ_IMPORT header, a byte every 0.1 s: never idle, never done
            for byte in bytes.fromhex("01118003000000000000000031"):
                await loop.sock_sendall(slow, bytes([byte]))
                await asyncio.sleep(0.1)

        sender = asyncio.create_task(trickle())
        try:
            waited = await _closed_by_server(slow, 30)
            # meanwhile and after, a real client is served
            assert len(await list_devices("127.0.0.1", server.port)) == 3
        finally:
            sender.cancel()
            slow.close()
        assert waited >= 0.8 * 0.9

    serve(test, limits=Limits(idle_timeout=0.5, request_timeout=0.8))
    assert "no complete request in 0.8 s (request_timeout)" in caplog.text


def _room_for(descriptors: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < descriptors:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, descriptors), hard))
        soft = min(hard, descriptors)
    assert soft >= descriptors, f"this test needs {descriptors} file descriptors (ulimit -n)"


#: How fast a real client must list and import with the flood held (the claim is 100 ms;
#: the ceiling allows for a loaded machine and asyncio's debug mode in these tests).
CEILING = 0.5


async def _list_and_import(port: int) -> tuple[float, float]:
    start = time.perf_counter()
    assert len(await list_devices("127.0.0.1", port)) == 3
    listed = time.perf_counter() - start
    start = time.perf_counter()
    device = await import_device("127.0.0.1", "1-2", port)
    imported = time.perf_counter() - start
    await device.close()
    return listed, imported


@pytest.mark.parametrize("addresses", [1, 20])
def test_a_thousand_silent_connections_keep_no_real_client_out(serve, addresses: int,
                                                               caplog) -> None:
    caplog.set_level(logging.INFO, "usbipy.server")
    flood = 1000
    _room_for(2 * flood + 200)

    async def test(server: UsbipServer) -> None:
        idle: list[socket.socket] = []
        try:
            for n in range(flood):  # (from 127.0.1.x: the real client is 127.0.0.1)
                idle.append(await _connect(server.port, f"127.0.1.{1 + n % addresses}"))
            admission = server.access.admission
            for _ in range(500):  # until the server has taken them all in (10 s at most)
                if admission.connections >= min(flood, 64 * addresses) - 5:
                    break
                await asyncio.sleep(0.02)
            times = [await _list_and_import(server.port) for _ in range(5)]
            print(f"\n{addresses} addresses, {admission.connections} silent connections "
                  f"held, {admission.evicted} closed to make room: list "
                  f"{max(t[0] for t in times) * 1000:.1f} ms, import "
                  f"{max(t[1] for t in times) * 1000:.1f} ms at most")
            assert max(max(t) for t in times) < CEILING
        finally:
            for sock in idle:
                sock.close()

    serve(test)
    if addresses == 1:  # the cap per address turned most away
        assert "connection refused: 64 connections from this address" in caplog.text
    else:  # all were taken; at the total cap the oldest silent ones made room
        assert "the one that waited longest for its request was closed" in caplog.text


def test_new_limits_apply_to_new_connections(serve) -> None:
    async def test(server: UsbipServer) -> None:
        first = await _connect(server.port, "127.0.0.2")
        await server.reconfigure(server.access.policy, Limits(max_connections_per_address=1))
        second = await _connect(server.port, "127.0.0.2")
        try:
            assert await _closed_by_server(second, 10) < 5
        finally:
            first.close()
            second.close()

    serve(test)
