"""Dead peers: the socket options that notice them, the userspace client's loss and
reconnect, and the keeper behind `usbipy attach --persistent`.

What a silent network does to these options is checked in the real kernel
(tests/kernel/test_dead_peers.py); here, that every socket gets them and that
each loss is handled as it should be.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import random
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from usbipy.client import Backoff, ServerGone, import_device
from usbipy.client import persistent as keeper_mod
from usbipy.client.attach import Attached
from usbipy.client.errors import ClientError, HostUnreachable, ImportRefused
from usbipy.config import Limits
from usbipy.devices import HidKeyboard
from usbipy.keepalive import DEFAULT, Keepalive
from usbipy.linux import vhci
from usbipy.protocol import DeviceInfo, Direction, OpStatus, Speed
from usbipy.server import UsbipServer

from ..helpers import free_port

HOST = "127.0.0.1"
GET_DEVICE_DESCRIPTOR = (0x80, 6, 0x0100, 0, 18)


def options(sock: socket.socket) -> tuple[int, int, int, int, int]:
    return (sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE),
            sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE),
            sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL),
            sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT),
            sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT))


# --- the options -------------------------------------------------------------------------


def test_the_default_gives_a_silent_peer_up_after_about_15_seconds() -> None:
    assert (DEFAULT.idle, DEFAULT.interval, DEFAULT.count, DEFAULT.user_timeout_ms) == (
        5, 2, 5, 15000)
    # idle time plus every probe: the keepalive alone ends within the timeout too
    for timeout in (1, 2.5, 7, 15, 60, 3600):
        k = Keepalive(timeout)
        assert k.idle + k.interval * k.count >= min(timeout, k.idle + k.interval)
        assert k.idle + k.interval * (k.count - 1) < max(timeout, 2)
    with pytest.raises(ValueError, match="out of range"):
        Keepalive(0)


def test_apply_sets_the_options_on_a_tcp_socket_only() -> None:
    with socket.socket() as tcp:
        Keepalive(9).apply(tcp)
        assert options(tcp) == (1, 3, 1, 6, 9000)
    left, right = socket.socketpair()
    with left, right:
        Keepalive(9).apply(left)  # a Unix socket: nothing to set, no error
        assert left.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 0


def test_the_server_sets_them_on_every_accepted_socket(serve) -> None:
    async def test(server: UsbipServer) -> None:
        async with await import_device(HOST, "1-1", server.port):
            [conn] = server.connections
            assert conn._transport is not None
            served = conn._transport.get_extra_info("socket")
            assert options(served) == (1, 2, 1, 5, 7000)

    serve(test, limits=Limits(dead_peer_timeout=7))


def test_the_client_sets_them_before_the_import(serve) -> None:
    async def test(server: UsbipServer) -> None:
        async with await import_device(HOST, "1-1", server.port,
                                       keepalive=Keepalive(12)) as dev:
            transport = dev._protocol.transport
            assert transport is not None
            assert options(transport.get_extra_info("socket")) == (1, 4, 2, 4, 12000)

    serve(test)


def test_usbipyd_takes_the_timeout_from_the_file_and_the_option(tmp_path: Path) -> None:
    from tests.helpers import daemon_settings

    config = tmp_path / "usbipyd.toml"
    config.write_text("[limits]\ndead_peer_timeout = 8\n")
    settings = daemon_settings("-c", str(config))
    assert settings.limits.dead_peer_timeout == 8.0
    settings = daemon_settings("-c", str(config), "--dead-peer-timeout", "20")
    assert settings.limits.dead_peer_timeout == 20.0
    config.write_text("[limits]\ndead_peer_timeout = 0\n")
    with pytest.raises(Exception, match=r"usbipyd.toml:2: limits.dead_peer_timeout: 0 is out"):
        daemon_settings("-c", str(config))


# --- the userspace client ------------------------------------------------------------------


def test_a_server_that_goes_raises_server_gone(serve) -> None:
    async def test(server: UsbipServer) -> None:
        dev = await import_device(HOST, "1-1", server.port)
        [conn] = server.connections
        assert conn._transport is not None
        conn._transport.abort()  # the server goes: a reset, not a goodbye
        await dev.wait_closed()
        with pytest.raises(ServerGone, match=rf"connection to 127.0.0.1:{server.port} was "
                                             r"lost: the server (reset|closed) the connection"):
            await dev.control(*GET_DEVICE_DESCRIPTOR)
        await dev.close()

    serve(test)


def test_the_reasons_a_connection_was_lost_read_as_words() -> None:
    from usbipy.client.errors import lost_reason

    assert "stopped answering" in lost_reason(TimeoutError(110, "Connection timed out"))
    assert lost_reason(ConnectionResetError(104, "reset")) == "the server reset the connection"
    assert lost_reason(None) == "the server closed the connection"
    # usbipyd ends a TLS session with a FIN: OpenSSL's "UNEXPECTED_EOF_WHILE_READING"
    eof = ssl.SSLEOFError(8, "[SSL: UNEXPECTED_EOF_WHILE_READING] EOF occurred in violation "
                             "of protocol (_ssl.c:2427)")
    assert lost_reason(eof) == "the server closed the connection"
    assert lost_reason(eof, early=True) == (
        "the server closed the connection right after the handshake or the import: its "
        "access policy may refuse this identity (its log says why)")
    assert "stopped answering" in lost_reason(TimeoutError(110, "x"), early=True)


SERVERS: list[UsbipServer] = []


def _serve_keyboard(port: int, stop: asyncio.Event) -> asyncio.Task[None]:
    async def run() -> None:
        server = UsbipServer(port=port)
        server.add(HidKeyboard())
        async with server:
            SERVERS.append(server)
            try:
                await stop.wait()
            finally:
                SERVERS.remove(server)

    return asyncio.ensure_future(run())


def test_a_reconnecting_device_comes_back_after_a_server_restart() -> None:
    port = free_port()

    async def main() -> None:
        stop = asyncio.Event()
        first = _serve_keyboard(port, stop)
        await asyncio.sleep(0.1)
        dev = await import_device(HOST, "1-1", port, reconnect=Backoff(
            initial=0.05, maximum=0.2, rng=random.Random(1)))
        assert len(await dev.control(*GET_DEVICE_DESCRIPTOR)) == 18
        await dev.control(0x00, 9, 1, 0, b"")  # SET_CONFIGURATION 1
        # an interrupt IN URB waits for a key press that never comes ...
        _seqnum, in_flight = dev.submit_nowait(1, Direction.IN, 8)
        await asyncio.sleep(0.05)
        assert not in_flight.done()
        [conn] = [c for server in SERVERS for c in server.connections]
        assert conn._transport is not None
        conn._transport.abort()  # ... when the connection is reset
        with pytest.raises(ServerGone):  # whether the device did it is unknown
            await in_flight
        # the next URB, at once, waits for the device to be imported again (the
        # server is there: it is at once)
        # (awaited directly: no loop turn between the failure and the next URB)
        descriptor = await dev.control(*GET_DEVICE_DESCRIPTOR)
        assert len(descriptor) == 18 and dev.reconnects == 1
        stop.set()  # the server goes away ...
        await first
        await dev.wait_closed()
        assert dev.closed
        # ... a URB now waits for the connection to be back ...
        later = asyncio.ensure_future(dev.control(*GET_DEVICE_DESCRIPTOR))
        await asyncio.sleep(0.4)  # ... not listening: attempts fail and are retried
        assert not later.done() and dev.reconnects == 1
        stop = asyncio.Event()
        second = _serve_keyboard(port, stop)  # ... and it is back
        descriptor = await asyncio.wait_for(later, 10)
        assert descriptor[:2] == b"\x12\x01" and dev.reconnects == 2
        assert not dev.closed
        await dev.close()
        stop.set()
        await second

    asyncio.run(main())


def test_a_reconnecting_device_gives_up_when_its_retries_run_out() -> None:
    port = free_port()

    async def main() -> None:
        stop = asyncio.Event()
        server = _serve_keyboard(port, stop)
        await asyncio.sleep(0.1)
        dev = await import_device(HOST, "1-1", port,
                                  reconnect=Backoff(initial=0.01, maximum=0.02, retries=3))
        stop.set()
        await server
        await dev.wait_closed()
        with pytest.raises(ServerGone):
            await asyncio.wait_for(dev.wait_connected(), 10)
        with pytest.raises(ServerGone):
            await dev.control(*GET_DEVICE_DESCRIPTOR)
        await dev.close()

    asyncio.run(main())


# --- backoff ---------------------------------------------------------------------------


def test_backoff_doubles_to_its_ceiling_with_jitter_and_counts_retries() -> None:
    backoff = Backoff(initial=1, maximum=60, retries=9, rng=random.Random(7))
    delays = [backoff.next_delay() for _ in range(9)]
    steps = [1, 2, 4, 8, 16, 32, 60, 60, 60]
    assert all(step / 2 <= d <= step for d, step in zip(delays, steps, strict=True))
    assert len(set(delays)) == 9  # jittered: no two clients in lockstep
    with pytest.raises(StopIteration):
        backoff.next_delay()
    backoff.reset()
    assert backoff.next_delay() <= 1
    # after a success, retries count again from 0 but the delays go on growing
    backoff = Backoff(initial=1, maximum=60, retries=2, rng=random.Random(7))
    backoff.next_delay(), backoff.next_delay()
    backoff.reset_count()
    assert 2 <= backoff.next_delay() <= 4 and not backoff.exhausted
    with pytest.raises(ValueError, match="first delay"):
        Backoff(initial=5, maximum=1)


# --- the keeper (usbipy attach --persistent) ----------------------------------------------

DEVICE = DeviceInfo("/sys/devices/fake/1-1", "1-1", 1, 2, Speed.HIGH, 0x1209, 0x0002, 0,
                    0, 0, 0, 1, 1, 1, ())


class FakeVhci:
    """vhci-hcd's ports as a keeper sees them, and the sockets it was handed."""

    def __init__(self) -> None:
        self.used: dict[int, int] = {}  # port -> devid
        self.peers: list[socket.socket] = []  # the server ends of each attachment
        self.failures: list[Exception] = []
        self.attached = 0
        self.detached: list[int] = []

    def attach(self, before_hand_off: Any = None) -> Attached:
        if self.failures:
            raise self.failures.pop(0)
        if before_hand_off is not None:
            before_hand_off()
        ours, theirs = socket.socketpair()
        self.peers.append(theirs)
        port = len(self.peers) - 1
        self.used[port] = DEVICE.devid
        vhci.write_record(port, vhci.Record(HOST, "3240", "1-1"))
        self.attached += 1
        return Attached(port, HOST, 3240, DEVICE, None, ours)

    def read_ports(self) -> list[vhci.VhciPort]:
        return [vhci.VhciPort(p, "hs", vhci.PortStatus.USED if p in self.used
                              else vhci.PortStatus.NULL, Speed.HIGH, self.used.get(p, 0),
                              f"3-{p}") for p in range(8)]

    def detach(self, port: int) -> None:
        vhci.remove_record(port)
        self.used.pop(port, None)
        self.detached.append(port)

    def lose(self, port: int) -> None:
        """The kernel's side of the connection fails: vhci frees the port."""
        self.used.pop(port, None)
        self.peers[port].close()


@pytest.fixture
def fake_vhci(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeVhci]:
    monkeypatch.setattr(vhci, "VHCI_STATE_DIR", tmp_path / "vhci_hcd")
    fake = FakeVhci()
    yield fake
    for peer in fake.peers:
        peer.close()


def keeper_for(fake: FakeVhci, **backoff: object) -> keeper_mod.Keeper:
    return keeper_mod.Keeper(HOST, 3240, "1-1", fake.attach,
                             backoff=Backoff(initial=0.01, maximum=0.05,
                                             **backoff),  # type: ignore[arg-type]
                             backstop=0.05, read_ports=fake.read_ports, detach=fake.detach)


def run_in_thread(keeper: keeper_mod.Keeper) -> tuple[list[int], Any]:
    import threading

    result: list[int] = []
    thread = threading.Thread(target=lambda: result.append(keeper.run()))
    thread.start()
    return result, thread


def until(condition: Any, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_the_keeper_attaches_again_after_a_loss_and_detaches_when_stopped(
        fake_vhci: FakeVhci) -> None:
    keeper = keeper_for(fake_vhci)
    result, thread = run_in_thread(keeper)
    # (the file, not the attribute: the keeper sets that a moment before it writes it)
    until(lambda: [s.state for s in keeper_mod.read_states()] == ["attached"])
    [state] = keeper_mod.read_states()
    assert (state.state, state.port, state.pid) == ("attached", 0, os.getpid())
    fake_vhci.lose(0)  # the server restarted, or the network dropped
    until(lambda: fake_vhci.attached == 2 and keeper.state.state == "attached")
    assert keeper.state.port == 1 and keeper.state.reattached == 1
    assert not vhci.record_path(0).exists()  # the lost port's record went with it
    keeper.stop()
    thread.join(10)
    assert result == [0] and fake_vhci.detached == [1]
    assert keeper_mod.read_states() == []  # its file went with it


def test_the_keeper_retries_through_refusals_and_says_what_it_waits_for(
        fake_vhci: FakeVhci) -> None:
    fake_vhci.failures = [HostUnreachable(HOST, 3240, "Connection refused"),
                          ImportRefused("1-1", OpStatus.DEV_BUSY)]
    keeper = keeper_for(fake_vhci)
    keeper.backoff.initial = keeper.backoff.maximum = 0.5
    result, thread = run_in_thread(keeper)
    until(lambda: keeper.state.state == "waiting")
    [state] = keeper_mod.read_states()
    assert "Connection refused" in (state.last_error or "") and state.attempts == 1
    assert state.retry_at is not None and state.retry_at > time.time()
    until(lambda: keeper.state.state == "attached")
    assert fake_vhci.attached == 1
    keeper.stop()
    thread.join(10)
    assert result == [0]


def test_the_keeper_gives_up_after_its_retries(fake_vhci: FakeVhci) -> None:
    fake_vhci.failures = [ClientError("no") for _ in range(5)]
    keeper = keeper_for(fake_vhci, retries=2)
    assert keeper.run() == 1
    assert len(fake_vhci.failures) == 2  # the first attempt and two retries
    assert keeper_mod.read_states() == []


def test_a_port_detached_by_someone_else_is_not_attached_again(fake_vhci: FakeVhci) -> None:
    keeper = keeper_for(fake_vhci)
    result, thread = run_in_thread(keeper)
    until(lambda: keeper.state.state == "attached")
    vhci.remove_record(0)  # as `usbip detach -p 0` does, before it detaches
    fake_vhci.lose(0)
    thread.join(10)
    assert result == [0] and fake_vhci.attached == 1


def test_the_backstop_notices_a_freed_port_with_no_event_on_the_socket(
        fake_vhci: FakeVhci) -> None:
    keeper = keeper_for(fake_vhci)
    result, thread = run_in_thread(keeper)
    until(lambda: keeper.state.state == "attached")
    fake_vhci.used.pop(0)  # freed, but the socket says nothing
    until(lambda: fake_vhci.attached == 2)
    keeper.stop()
    thread.join(10)
    assert result == [0]


# --- usbipy port and usbipy detach ---------------------------------------------------------


@pytest.fixture
def keeper_process() -> Iterator[subprocess.Popen[bytes]]:
    """A process that looks like a keeper (its command line says usbipy) and ends on
    SIGTERM."""
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", "usbipy"])
    yield proc
    proc.kill()
    proc.wait()


def test_port_shows_a_waiting_persistent_attachment(fake, capsys, keeper_process) -> None:
    from .test_cli_usbipy import usbipy

    fake.load_vhci()
    fake.set_vhci_status({})
    keeper_mod.write_state(keeper_mod.KeeperState(
        keeper_process.pid, "10.0.0.7", 3240, "1-2", "waiting", port=3,
        retry_at=time.time() + 30, attempts=4, last_error="cannot connect\x1b[2J"))
    rc, out, _ = usbipy(capsys, "port")
    assert rc == 0
    assert out.endswith(
        "Persistent attachments waiting\n"
        "==============================\n"
        "usbip://10.0.0.7:3240/1-2: <waiting>\n"
        f"           -> persistent (pid {keeper_process.pid}, retry in 30 s, attempt 4, "
        "was port 3)\n"
        "           -> last error: cannot connect\\x1b[2J\n"), out
    rc, out, _ = usbipy(capsys, "port", "--json")
    [entry] = json.loads(out)
    assert (entry["port"], entry["status"], entry["url"]) == (
        None, "waiting", "usbip://10.0.0.7:3240/1-2")
    assert entry["persistent"]["attempts"] == 4


def test_detach_stops_the_keeper_for_good(fake, capsys, keeper_process) -> None:
    from .test_cli_usbipy import usbipy

    fake.load_vhci()
    fake.set_vhci_status({})
    keeper_mod.write_state(keeper_mod.KeeperState(
        keeper_process.pid, "10.0.0.7", 3240, "1-2", "waiting", port=None))
    rc, out, err = usbipy(capsys, "detach", "-b", "1-2")
    assert rc == 0, err
    assert keeper_process.wait(10) != 0  # SIGTERM
    assert "no longer kept attached" in out
    rc, _, err = usbipy(capsys, "detach", "-b", "1-2")
    assert rc == 1 and "no persistent attachment of 1-2" in err


def test_dead_keepers_are_not_shown(fake, capsys) -> None:
    proc = subprocess.Popen([sys.executable, "-c", "pass", "usbipy"])
    proc.wait()
    keeper_mod.write_state(keeper_mod.KeeperState(proc.pid, "h", 1, "1-1", "waiting"))
    assert keeper_mod.read_states() == []
    assert list(keeper_mod.run_dir().glob("*.json")) == []


def test_the_systemd_unit_runs_a_persistent_attach() -> None:
    from usbipy.cli import usbipy as cli

    unit = (Path(__file__).parents[2] / "systemd/usbipy-attach@.service").read_text()
    settings = dict(line.split("=", 1) for line in unit.splitlines()
                    if "=" in line and not line.startswith("#"))
    command = settings["ExecStart"].split()
    assert command[0] == "/opt/usbipy/bin/usbipy"
    env = {"${HOST}": "lab1", "${BUSID}": "1-2", "$OPTIONS": "--max-delay=30"}
    args = cli.build_parser().parse_args([env.get(word, word) for word in command[1:]])
    assert (args.command, args.remote, args.busid, args.persistent, args.max_delay) == (
        "attach", ["lab1"], "1-2", True, 30.0)
    assert settings["EnvironmentFile"] == "/etc/usbipy/attach/%i.env"


def test_detach_by_port_leaves_a_waiting_keeper_whose_last_port_it_was(
        fake, capsys, keeper_process) -> None:
    from .test_cli_usbipy import usbipy

    fake.load_vhci()
    fake.add_device("3-1", 0x1209, 0x0002, parent="platform/vhci_hcd.0")
    fake.set_vhci_status({0: (3, 0x10003, "3-1")})  # someone else's device, on port 0
    keeper_mod.write_state(keeper_mod.KeeperState(
        keeper_process.pid, "10.0.0.7", 3240, "1-2", "waiting", port=0))
    rc, out, err = usbipy(capsys, "detach", "-p", "0")
    assert rc == 0, err
    assert out == "usbipy: info: port 0 is now detached\n"
    assert keeper_process.poll() is None  # still waiting to attach its own device


def test_retries_count_failures_in_a_row_and_giving_up_after_a_loss_fails(
        fake_vhci: FakeVhci) -> None:
    # one failure, an attachment, then a loss and failures: with retries=2 the keeper
    # tries twice after the loss (the failure before the attachment no longer
    # counts), then gives up with exit status 1
    fake_vhci.failures = [ClientError("refused")]
    keeper = keeper_for(fake_vhci, retries=2)
    result, thread = run_in_thread(keeper)
    until(lambda: keeper.state.state == "attached")
    fake_vhci.failures = [ClientError("refused")] * 3
    fake_vhci.lose(0)
    thread.join(10)
    assert result == [1]
    assert len(fake_vhci.failures) == 1  # two attempts after the loss, then it gave up


def test_a_record_removed_means_detached_even_before_vhci_frees_the_port(
        fake_vhci: FakeVhci) -> None:
    keeper = keeper_for(fake_vhci)
    result, thread = run_in_thread(keeper)
    until(lambda: keeper.state.state == "attached")
    vhci.remove_record(0)  # `usbip detach`: the record first ...
    fake_vhci.peers[0].close()  # ... then the socket, while the port still shows USED
    thread.join(10)
    assert result == [0] and fake_vhci.attached == 1


def test_a_port_still_being_set_up_is_not_taken_for_lost(fake_vhci: FakeVhci) -> None:
    keeper = keeper_for(fake_vhci)
    setting_up = [vhci.VhciPort(0, "hs", vhci.PortStatus.NOTASSIGNED, Speed.HIGH, 0, "0-0")]
    keeper._read_ports = lambda: setting_up
    assert keeper._port_holds(0, DEVICE.devid) is True
    keeper._read_ports = lambda: [vhci.VhciPort(0, "hs", vhci.PortStatus.USED, Speed.HIGH,
                                                0x20005, "3-0")]
    assert keeper._port_holds(0, DEVICE.devid) is False  # another device there now


def test_a_stop_during_an_attach_ends_it_at_once(fake_vhci: FakeVhci) -> None:
    keeper: keeper_mod.Keeper

    def slow_attach(before_hand_off: Any) -> Attached:
        keeper.interrupt()  # SIGTERM while connecting: no waiting for the timeouts
        raise AssertionError("not reached")

    keeper = keeper_mod.Keeper(HOST, 3240, "1-1", slow_attach, read_ports=fake_vhci.read_ports,
                               detach=fake_vhci.detach)
    assert keeper.run() == 0 and keeper.stopped
    keeper.interrupt()  # outside an attach: a stop, nothing raised


def test_a_stop_once_the_kernel_has_the_port_detaches_it(fake_vhci: FakeVhci) -> None:
    keeper: keeper_mod.Keeper

    def attach_then_signal(before_hand_off: Any) -> Attached:
        attached = fake_vhci.attach(before_hand_off)
        keeper.interrupt()  # SIGTERM just after vhci-hcd took the socket
        return attached

    keeper = keeper_mod.Keeper(HOST, 3240, "1-1", attach_then_signal, backstop=0.05,
                               read_ports=fake_vhci.read_ports, detach=fake_vhci.detach)
    assert keeper.run() == 0
    assert fake_vhci.detached == [0]  # not left attached with no process to own it


def test_a_state_file_with_wrong_types_is_ignored(keeper_process) -> None:
    directory = keeper_mod.run_dir()
    directory.mkdir(parents=True)
    good = keeper_mod.KeeperState(keeper_process.pid, "h", 1, "1-1", "waiting").as_dict()
    changes: list[dict[str, object]] = [{"pid": -1}, {"pid": "x"}, {"port": "0"}, {"extra": 1},
                                        {"pid": True}]
    for n, change in enumerate(changes):
        (directory / f"{n}.json").write_text(json.dumps({**good, **change}))
    (directory / "9.json").write_text("[1, 2]")
    assert keeper_mod.read_states() == []
    (directory / "ok.json").write_text(json.dumps(good))
    assert [s.pid for s in keeper_mod.read_states()] == [keeper_process.pid]


def test_detach_by_busid_says_which_when_two_servers_have_it(fake, capsys) -> None:
    from .test_cli_usbipy import usbipy

    procs = [subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
             for _ in range(2)]
    try:
        for proc, host in zip(procs, ("lab1", "lab2"), strict=True):
            keeper_mod.write_state(keeper_mod.KeeperState(proc.pid, host, 3240, "1-2",
                                                          "waiting"))
        rc, _, err = usbipy(capsys, "detach", "-b", "1-2")
        assert rc == 1 and err == ("usbipy: error: 2 persistent attachments of 1-2 (from "
                                   "lab1:3240, lab2:3240): say which with -r HOST, or "
                                   "detach by -p PORT\n")
        assert all(p.poll() is None for p in procs)
        rc, _, err = usbipy(capsys, "detach", "-b", "1-2", "-r", "lab2")
        assert rc == 0, err
        assert procs[1].wait(10) != 0 and procs[0].poll() is None
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()


def test_a_background_keeper_starts_waits_and_stops_for_good(fake, capsys) -> None:
    from .test_cli_usbipy import usbipy

    fake.load_vhci()
    fake.set_vhci_status({})
    nobody = free_port()  # nothing listens there: the keeper waits and retries
    rc, out, err = usbipy(capsys, "attach", "-r", HOST, "-t", str(nobody), "-b", "1-1",
                          "--persistent", "--background", "--max-delay", "1", "--json")
    assert rc == 0, err
    started = json.loads(out)
    pid, log = started["pid"], Path(started["log"])
    until(lambda: any(s.pid == pid and s.state == "waiting" and s.attempts >= 2
                      for s in keeper_mod.read_states()))
    assert "connection refused: nothing listens on" in log.read_text()
    rc, out, err = usbipy(capsys, "detach", "-b", "1-1")
    assert rc == 0, err
    assert f"(pid {pid} stopped)" in out
    assert keeper_mod.read_states() == [] and not log.exists()


def test_a_connection_lost_before_the_device_is_handed_over_is_made_again() -> None:
    """The import's reply and the end of its connection can arrive together, before
    the device is handed to its caller: the loss is still caught."""
    from usbipy.client import userspace

    port = free_port()

    async def main() -> None:
        stop = asyncio.Event()
        server = _serve_keyboard(port, stop)
        await asyncio.sleep(0.1)
        protocol, info = await userspace._import(HOST, "1-1", port, None, None, DEFAULT)
        assert protocol.transport is not None
        protocol.transport.abort()  # lost before RemoteDevice watches it
        await protocol.closed
        target = userspace._Target(HOST, "1-1", port, None, None, DEFAULT)
        dev = userspace.RemoteDevice(protocol, info, target=target,
                                     reconnect=Backoff(initial=0.01, maximum=0.02))
        descriptor = await asyncio.wait_for(dev.control(*GET_DEVICE_DESCRIPTOR), 10)
        assert len(descriptor) == 18 and dev.reconnects == 1
        await dev.close()
        stop.set()
        await server

    asyncio.run(main())


def test_port_shows_a_resuming_attachment_on_its_port(fake, capsys, keeper_process) -> None:
    """A resumable attachment whose network is down keeps its port; `usbipy port`
    says since when it is down, and how often it was resumed."""
    from .test_cli_usbipy import usbipy

    fake.load_vhci()
    fake.set_vhci_status({0: (3, 0x10002, "3-1")})
    keeper_mod.write_state(keeper_mod.KeeperState(
        keeper_process.pid, "10.0.0.7", 3240, "1-2", "attached", port=0, devid=0x10002,
        since=time.time() - 600, resumable=True, down_since=time.time() - 12, resumed=2))
    rc, out, _ = usbipy(capsys, "port")
    assert rc == 0
    assert (f"-> persistent (pid {keeper_process.pid}, attached 10 min ago, resuming, down "
            "12 s, resumed 2 times)") in out, out
    keeper_mod.write_state(dataclasses.replace(keeper_mod.read_states()[0], down_since=None))
    rc, out, _ = usbipy(capsys, "port")
    assert "attached 10 min ago, resumable, resumed 2 times)" in out, out
    rc, out, _ = usbipy(capsys, "port", "--json")
    [entry] = json.loads(out)
    assert entry["persistent"]["resumable"] is True and entry["persistent"]["resumed"] == 2


def test_port_shows_how_an_attachment_by_identity_is_matched(fake, capsys, keeper_process
                                                             ) -> None:
    from .test_cli_usbipy import usbipy

    fake.load_vhci()
    fake.set_vhci_status({})
    match = "device 0483:df11:SER on 10.0.0.7:3240, 10.0.0.8:3240"
    keeper_mod.write_state(keeper_mod.KeeperState(
        keeper_process.pid, "10.0.0.7", 3240, "0483:df11:SER", "waiting", match=match,
        retry_at=time.time() + 30, attempts=2, last_error="no device 0483:df11:SER on ..."))
    rc, out, _ = usbipy(capsys, "port")
    assert rc == 0
    assert (f"-> persistent (pid {keeper_process.pid}, by {match}, retry in 30 s, attempt 2"
            ")") in out, out
    rc, out, _ = usbipy(capsys, "port", "--json")
    assert json.loads(out)[0]["persistent"]["match"] == match


def test_the_systemd_unit_runs_a_persistent_attach_by_identity() -> None:
    from usbipy.cli import usbipy as cli

    unit = (Path(__file__).parents[2] / "systemd/usbipy-attach-device@.service").read_text()
    settings = dict(line.split("=", 1) for line in unit.splitlines()
                    if "=" in line and not line.startswith("#"))
    command = settings["ExecStart"].split()
    env = {"${HOST}": "lab1", "${DEVICE}": "0483:374b:0671FF", "$OPTIONS": "-r lab2"}
    # (systemd splits an unbraced $OPTIONS into words; ${NAME} stays one)
    args = cli.build_parser().parse_args([part for word in command[1:]
                                          for part in env.get(word, word).split()])
    assert (args.command, args.remote, args.device, args.busid, args.persistent) == (
        "attach", ["lab1", "lab2"], "0483:374b:0671FF", None, True)
