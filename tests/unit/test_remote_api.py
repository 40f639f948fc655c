"""The userspace client's API, both forms, against a live usbipyd: transfers with
timeouts that unlink, errors by errno, many URBs in flight, threads, TLS."""

from __future__ import annotations

import asyncio
import errno
import struct
import threading
import time
from collections.abc import Iterator

import pytest

import usbipy
from usbipy.backends import ExportedDevice
from usbipy.client import sync
from usbipy.client.errors import (
    Cancelled,
    ClientError,
    DeviceGone,
    Overflow,
    ServerGone,
    Stalled,
    TransferTimeout,
    UrbError,
    urb_error,
)
from usbipy.client.transfers import IsoResult, iso_layout, iso_results
from usbipy.client.userspace import connect
from usbipy.devices import CdcAcm, HidKeyboard, ImageFile, MassStorage
from usbipy.protocol import Direction, IsoPacket, RetSubmit
from usbipy.server import ServerThread, UsbipServer

from ..helpers import scsi

HOST = "127.0.0.1"
GET_DEVICE = (0x80, 6, 0x0100, 0, 18)
KEY_A = bytes((0, 0, 0x04, 0, 0, 0, 0, 0))


def demo() -> list[ExportedDevice]:
    return [HidKeyboard(), MassStorage(ImageFile.scratch(1 << 20)), CdcAcm()]


@pytest.fixture
def server() -> Iterator[ServerThread]:
    with ServerThread(demo(), port=0) as srv:
        yield srv


# --- errors ------------------------------------------------------------------------


@pytest.mark.parametrize(("status", "kind"), [
    (-32, Stalled), (-2, Cancelled), (-104, Cancelled), (-75, Overflow), (-19, DeviceGone),
    (-108, DeviceGone), (-71, UrbError),
])
def test_a_status_becomes_the_error_for_its_errno(status: int, kind: type) -> None:
    error = urb_error(RetSubmit(7, status), "bulk read")
    assert type(error) is kind
    assert error.errno == -status and error.status == status
    assert str(error).startswith(f"bulk read failed with status {status} (")
    assert errno.errorcode[-status] in str(error)


def test_a_transfer_timeout_is_a_timeout_error_with_etimedout() -> None:
    error = TransferTimeout("bulk read", 0.5)
    assert isinstance(error, TimeoutError) and isinstance(error, ClientError)
    assert error.errno == errno.ETIMEDOUT
    assert str(error) == "bulk read timed out after 0.5 s"


def test_iso_packets_are_laid_back_to_back_and_results_cut_by_actual_length() -> None:
    packets = iso_layout([192, 192, 0, 100])
    assert [(p.offset, p.length) for p in packets] == [(0, 192), (192, 192), (384, 0),
                                                      (384, 100)]
    # RET_SUBMIT's data holds only the actual bytes, packet after packet (stub_tx.c)
    got = [IsoPacket(0, 192, 10, 0), IsoPacket(192, 192, 0, -18), IsoPacket(384, 0, 0, 0),
           IsoPacket(384, 100, 3, 0)]
    ret = RetSubmit(1, 0, 13, b"A" * 10 + b"xyz", 0, 4, 1, got, Direction.IN)
    assert iso_results(ret, packets, Direction.IN) == [
        IsoResult(0, b"A" * 10, 10), IsoResult(-18, b"", 0), IsoResult(0, b"", 0),
        IsoResult(0, b"xyz", 3)]
    with pytest.raises(ValueError, match="at least one packet"):
        iso_layout([])
    with pytest.raises(ValueError, match="negative"):
        iso_layout([-1])


# --- the asyncio form --------------------------------------------------------------


def test_async_connect_reads_stalls_and_closes(serve) -> None:
    async def test(server: UsbipServer) -> None:
        async with connect(HOST, "1-1", server.port) as dev:
            descriptor = await dev.control(*GET_DEVICE, timeout=5)
            assert descriptor[:2] == b"\x12\x01" and descriptor[8:12] == b"\x09\x12\x01\x00"
            with pytest.raises(Stalled) as stall:
                await dev.control(0xC0, 0x42, 0, 0, 4, timeout=5)  # unknown vendor request
            assert stall.value.errno == errno.EPIPE
            assert "control request 0xc0 0x42" in str(stall.value)
            with pytest.raises(TypeError):
                await dev.control(0x80, 6, 0x0100, 0, b"data")
        assert dev.closed
        # the form that is awaited, and the name at the top of the package
        dev = await usbipy.connect(HOST, "1-1", server.port)
        assert (await dev.control(*GET_DEVICE))[:2] == b"\x12\x01"
        await dev.close()
        # a URL, with a busid or with the device's ids
        for url in (f"usbip://{HOST}:{server.port}/1-1",
                    f"usbip://{HOST}:{server.port}/1209:0001"):
            async with usbipy.connect(url) as dev:
                assert dev.info.busid == "1-1"

    serve(test)


def test_async_timeout_unlinks_so_the_next_key_press_is_not_eaten(serve) -> None:
    keyboard = HidKeyboard()

    async def test(server: UsbipServer) -> None:
        async with connect(HOST, "1-1", server.port) as dev:
            await dev.control(0x00, 9, 1, 0, b"")
            started = time.monotonic()
            with pytest.raises(TransferTimeout, match="from endpoint 0x81 timed out"):
                await dev.interrupt_read(0x81, 8, timeout=0.2)
            assert time.monotonic() - started < 5
            # Had the URB stayed on the server, the key press would complete it
            # and the reply would go nowhere.
            keyboard.type_text("a")  # a press and a release
            assert await dev.interrupt_read(0x81, 8, timeout=5) == KEY_A
            assert await dev.interrupt_read(0x81, 8, timeout=5) == bytes(8)

    serve(test, [keyboard])


def test_async_cancelled_task_unlinks_its_urb(serve) -> None:
    keyboard = HidKeyboard()

    async def test(server: UsbipServer) -> None:
        async with connect(HOST, "1-1", server.port) as dev:
            await dev.control(0x00, 9, 1, 0, b"")
            task = asyncio.ensure_future(dev.interrupt_read(0x81, 8))
            await asyncio.sleep(0.1)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            await dev.control(*GET_DEVICE, timeout=5)  # (the unlink reached the server)
            keyboard.press(0x04)
            assert await dev.interrupt_read(0x81, 8, timeout=5) == KEY_A

    serve(test, [keyboard])


def test_async_many_transfers_in_flight(serve) -> None:
    async def test(server: UsbipServer) -> None:
        async with connect(HOST, "1-3", server.port) as dev:
            await dev.control(0x00, 9, 1, 0, b"")
            strings = await asyncio.gather(*(
                dev.control(0x80, 6, 0x0300 | (i % 3 + 1), 0x0409, 255, timeout=5)
                for i in range(48)))
            assert len({s for s in strings}) == 3
            # the echo port: 16 reads in flight, then one write feeds them all
            payload = bytes(range(256)) * 64
            reads = [asyncio.ensure_future(dev.bulk_read(0x81, 1024, timeout=10))
                     for _ in range(16)]
            await asyncio.sleep(0)
            assert await dev.bulk_write(0x02, payload, timeout=10) == len(payload)
            assert b"".join(await asyncio.gather(*reads)) == payload

    serve(test)


def test_async_bulk_on_an_unconfigured_device_is_device_gone(serve) -> None:
    async def test(server: UsbipServer) -> None:
        async with connect(HOST, "1-2", server.port) as dev:
            with pytest.raises(DeviceGone) as gone:  # no endpoint before SET_CONFIGURATION
                await dev.bulk_read(0x81, 512, timeout=5)
            assert gone.value.errno == errno.ESHUTDOWN

    serve(test)


# --- the blocking form -------------------------------------------------------------


def test_sync_reads_stalls_and_times_out_with_an_unlink(server: ServerThread) -> None:
    keyboard = server._devices[0]
    assert isinstance(keyboard, HidKeyboard)
    with sync.connect(HOST, "1-1", server.port) as dev:
        assert dev.info.busid == "1-1" and dev.tls is None
        assert dev.control(*GET_DEVICE, timeout=5)[:2] == b"\x12\x01"
        with pytest.raises(Stalled) as stall:
            dev.control(0xC0, 0x42, 0, 0, 4, timeout=5)
        assert stall.value.errno == errno.EPIPE
        dev.control(0x00, 9, 1, 0, b"")
        with pytest.raises(TransferTimeout):
            dev.interrupt_read(0x81, 8, timeout=0.2)
        keyboard.press(0x04)
        assert dev.interrupt_read(0x81, 8, timeout=5) == KEY_A
    assert dev.closed
    with pytest.raises(ClientError, match="closed"):
        dev.control(*GET_DEVICE)
    assert [d.busid for d in sync.list_devices(HOST, server.port)] == ["1-1", "1-2", "1-3"]


def test_sync_threads_share_a_device(server: ServerThread) -> None:
    """A thread that waits on the keyboard does not hold up another's requests."""
    keyboard = server._devices[0]
    assert isinstance(keyboard, HidKeyboard)
    with sync.connect(HOST, "1-1", server.port) as dev:
        dev.control(0x00, 9, 1, 0, b"")
        got: list[bytes] = []
        reader = threading.Thread(target=lambda: got.append(
            dev.interrupt_read(0x81, 8, timeout=20)))
        reader.start()
        time.sleep(0.1)
        started = time.monotonic()
        for _ in range(50):
            assert dev.control(*GET_DEVICE, timeout=5)[:2] == b"\x12\x01"
        assert time.monotonic() - started < 10
        assert reader.is_alive()  # still waiting for a key
        keyboard.press(0x04)
        reader.join(10)
        assert got == [KEY_A]


def test_sync_many_in_flight_from_one_thread(server: ServerThread) -> None:
    with sync.connect(HOST, "1-3", server.port) as dev:
        dev.control(0x00, 9, 1, 0, b"")
        reads = [dev.submit(1, Direction.IN, 1024) for _ in range(8)]
        payload = bytes(range(256)) * 32
        dev.bulk_write(0x02, payload, timeout=10)
        assert b"".join(dev.wait(s, timeout=10).data for s in reads) == payload
        with pytest.raises(TimeoutError):  # nothing more to echo: still in flight
            dev.wait(dev.submit(1, Direction.IN, 64), timeout=0.1)


def test_sync_disk_round_trip_through_bulk_endpoints(server: ServerThread) -> None:
    with sync.connect(HOST, "1-2", server.port) as dev:
        dev.control(0x00, 9, 1, 0, b"")
        block = bytes(range(256)) * 2
        scsi(dev, 1, struct.pack(">BBIBHB", 0x2A, 0, 7, 0, 1, 0), data_out=block)  # WRITE(10)
        assert scsi(dev, 2, struct.pack(">BBIBHB", 0x28, 0, 7, 0, 1, 0), data_in=512) == block


def test_sync_server_gone_is_named(server: ServerThread) -> None:
    dev = sync.connect(HOST, "1-1", server.port)
    dev.control(0x00, 9, 1, 0, b"")
    server.stop()
    with pytest.raises(ServerGone, match=r"127\.0\.0\.1:\d+ was lost"):
        dev.interrupt_read(0x81, 8, timeout=10)
    with pytest.raises(ServerGone):  # and it stays gone
        dev.control(*GET_DEVICE)
    dev.close()


def test_sync_a_server_that_never_answers_an_unlink_closes_the_connection() -> None:
    """A transfer's timeout bounds the whole call, unlink included."""
    import socket

    from usbipy.protocol import OpRepImport, OpStatus, ServerConnection

    from ..helpers import KEYBOARD

    listener = socket.create_server((HOST, 0))
    port = listener.getsockname()[1]

    def silent_server() -> None:
        sock, _ = listener.accept()
        conn = ServerConnection()
        conn.receive_data(sock.recv(40))
        list(conn.events())
        sock.sendall(conn.send(OpRepImport(OpStatus.OK, KEYBOARD)))
        time.sleep(3)  # reads nothing more, answers nothing
        sock.close()

    thread = threading.Thread(target=silent_server)
    thread.start()
    try:
        with sync.connect(HOST, "3-2", port) as dev:
            with pytest.raises(ClientError, match="did not answer the unlink"):
                dev.unlink(dev.submit(1, Direction.IN, 8), timeout=0.3)
            assert dev.closed
    finally:
        thread.join()
        listener.close()


def test_sync_over_mutual_tls(tmp_path) -> None:
    from usbipy.server.tls import ServerTls
    from usbipy.tls import TlsFiles, certs, client_context, server_context

    certs.init_ca(tmp_path)
    issued = certs.issue("usbipy-test", server=True, base=tmp_path, alt_names=("127.0.0.1",))
    client = certs.issue("alice", server=False, base=tmp_path)
    tls = ServerTls(server_context(TlsFiles(issued.cert, issued.key, issued.ca), kernel=False),
                    kernel=False, handshake_timeout=10)
    context = client_context(TlsFiles(client.cert, client.key, client.ca))
    with ServerThread(demo(), port=0, tls=tls) as srv:
        assert [d.busid for d in sync.list_devices(HOST, srv.port, tls=context)] == [
            "1-1", "1-2", "1-3"]
        with sync.connect(HOST, "1-3", srv.port, tls=context) as dev:
            assert dev.tls is not None and dev.tls.version.startswith("TLSv1.")
            dev.control(0x00, 9, 1, 0, b"")
            payload = bytes(range(256)) * 300  # many TLS records each way
            reads = [dev.submit(1, Direction.IN, 16384) for _ in range(5)]
            dev.bulk_write(0x02, payload, timeout=10)
            assert b"".join(dev.wait(s, timeout=10).data for s in reads) == payload
        with pytest.raises(ClientError, match="closed the connection|TLS"):
            sync.list_devices(HOST, srv.port)  # plaintext to a TLS server: refused, said so


def test_a_timeout_covers_the_wait_for_a_connection_made_again() -> None:
    from usbipy.client import Backoff

    srv = ServerThread(demo(), port=0).start()

    async def test() -> None:
        dev = await connect(HOST, "1-1", srv.port, reconnect=Backoff(initial=30, maximum=30))
        srv.stop()
        for _ in range(100):  # (bounded: the loss is seen at once, the FIN is local)
            if dev.closed:
                break
            await asyncio.sleep(0.05)
        assert dev.closed
        started = time.monotonic()
        with pytest.raises(TransferTimeout):
            await dev.control(*GET_DEVICE, timeout=0.3)
        assert time.monotonic() - started < 5  # not the 15 to 30 s until the next attempt
        await dev.close()

    try:
        asyncio.run(asyncio.wait_for(test(), 60))
    finally:
        srv.stop()


# --- what the review found: a scripted server -------------------------------------------


class ScriptedServer:
    """A USB/IP server on a thread that imports KEYBOARD (3-2) and then answers
    URBs as told: ``on_submit(cmd) -> RetSubmit args or None`` (None: no answer),
    ``on_unlink(cmd) -> (status, answer_submit_first) or None``; it starts reading
    URBs only after ``read_delay`` seconds."""

    def __init__(self, *, on_submit=None, on_unlink=None, read_delay: float = 0.0) -> None:
        import socket as socket_module

        self.on_submit = on_submit or (lambda cmd: None)
        self.on_unlink = on_unlink or (lambda cmd: (-104, False))
        self.read_delay = read_delay
        self.listener = socket_module.create_server((HOST, 0))
        self.port = self.listener.getsockname()[1]
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        from usbipy.protocol import (
            CmdSubmit,
            CmdUnlink,
            OpRepImport,
            OpStatus,
            ServerConnection,
        )

        from ..helpers import KEYBOARD

        sock, _ = self.listener.accept()
        conn = ServerConnection()
        with sock:
            conn.receive_data(sock.recv(40))
            list(conn.events())
            sock.sendall(conn.send(OpRepImport(OpStatus.OK, KEYBOARD)))
            time.sleep(self.read_delay)
            pending: dict[int, CmdSubmit] = {}
            while True:
                data = sock.recv(1 << 20)
                if not data:
                    return
                conn.receive_data(data)
                for event in conn.events():
                    if isinstance(event, CmdSubmit):
                        answer = self.on_submit(event)
                        if answer is None:
                            pending[event.seqnum] = event
                        else:
                            sock.sendall(bytes(conn.reply_submit(event, *answer)))
                    elif isinstance(event, CmdUnlink):
                        how = self.on_unlink(event)
                        if how is None:
                            continue
                        status, submit_first = how
                        target = pending.pop(event.unlink_seqnum, None)
                        if submit_first and target is not None:
                            sock.sendall(bytes(conn.reply_submit(target, 0, b"late")))
                        sock.sendall(conn.reply_unlink(event, status))

    def close(self) -> None:
        self.listener.close()
        self.thread.join(10)


def test_sync_a_read_timeout_does_not_bound_a_later_write() -> None:
    """The socket's timeout was the last read's: a big write to a server slow to read
    failed after it (the connection lost for nothing)."""
    server = ScriptedServer(read_delay=0.6, on_submit=lambda cmd: (
        (0, b"", len(cmd.data)) if cmd.direction is Direction.OUT else None))
    try:
        with sync.connect(HOST, "3-2", server.port) as dev:
            with pytest.raises(TimeoutError):
                dev.wait(dev.submit(1, Direction.IN, 8), timeout=0.05)
            assert dev.bulk_write(2, bytes(16 << 20)) == 16 << 20
    finally:
        server.close()


def test_sync_many_reads_in_flight_and_big_writes_do_not_deadlock(
        server: ServerThread) -> None:
    """Replies pile up while one thread writes: it reads them meanwhile."""
    with sync.connect(HOST, "1-3", server.port) as dev:
        dev.control(0x00, 9, 1, 0, b"")
        # 32 MiB echoed: more than the socket buffers both ways hold
        reads = [dev.submit(1, Direction.IN, 64 << 10) for _ in range(512)]
        payload = bytes(range(256)) * 4096  # 1 MiB
        started = time.monotonic()
        writes = [dev.submit(2, Direction.OUT, data=payload) for _ in range(32)]  # no waits
        assert time.monotonic() - started < 15  # (the dead-peer timeout is 15 s)
        assert all(dev.wait(s, timeout=20).actual_length == len(payload) for s in writes)
        got = b"".join(dev.wait(s, timeout=20).data for s in reads)
        assert got == payload * 32


class Interrupted(BaseException):
    pass


def test_sync_an_interrupted_transfer_is_unlinked(server: ServerThread) -> None:
    import signal

    keyboard = server._devices[0]
    assert isinstance(keyboard, HidKeyboard)

    def interrupt(signum: int, frame: object) -> None:
        raise Interrupted

    previous = signal.signal(signal.SIGALRM, interrupt)
    try:
        with sync.connect(HOST, "1-1", server.port) as dev:
            dev.control(0x00, 9, 1, 0, b"")
            signal.setitimer(signal.ITIMER_REAL, 0.2)
            with pytest.raises(Interrupted):
                dev.interrupt_read(0x81, 8, timeout=10)  # (Ctrl-C, say)
            # (a round trip: the unlink, sent before it, has reached the server)
            assert dev.control(*GET_DEVICE, timeout=5)[:2] == b"\x12\x01"
            keyboard.type_text("a")
            assert dev.interrupt_read(0x81, 8, timeout=5) == KEY_A  # not eaten
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def test_sync_timeout_bounds_the_unlink_too() -> None:
    server = ScriptedServer(on_unlink=lambda cmd: None)  # never answers an unlink
    try:
        with sync.connect(HOST, "3-2", server.port) as dev:
            started = time.monotonic()
            with pytest.raises(TransferTimeout):
                dev.interrupt_read(0x81, 8, timeout=0.2)
            assert time.monotonic() - started < 3  # 0.2 s, and 1 s for the unlink
            assert dev.closed
            with pytest.raises(ClientError, match="did not answer the unlink"):
                dev.control(*GET_DEVICE)
    finally:
        server.close()


@pytest.mark.parametrize(("unlink", "expected"), [
    ((0, False), "completed"),  # usbip-host: it completed as the unlink came
    ((-32, False), "stalled"),
    ((-104, False), "timeout"),
    ((0, True), "data"),  # its RET_SUBMIT came first: the result is kept
])
def test_both_forms_say_how_an_unlinked_urb_ended(unlink: tuple[int, bool],
                                                  expected: str) -> None:
    def check(run) -> None:
        if expected == "data":
            assert run() == b"late"
        elif expected == "stalled":
            with pytest.raises(Stalled):
                run()
        else:
            with pytest.raises(TransferTimeout) as timed_out:
                run()
            assert timed_out.value.completed == (expected == "completed")

    server = ScriptedServer(on_unlink=lambda cmd: unlink)
    try:
        with sync.connect(HOST, "3-2", server.port) as dev:
            check(lambda: dev.interrupt_read(0x81, 8, timeout=0.1))
    finally:
        server.close()
    server = ScriptedServer(on_unlink=lambda cmd: unlink)
    try:
        async def main() -> None:
            async with connect(HOST, "3-2", server.port) as dev:
                try:
                    result = await dev.interrupt_read(0x81, 8, timeout=0.1)
                except (TransferTimeout, Stalled) as exc:
                    error: BaseException = exc

                    def again() -> bytes:
                        raise error
                    check(again)
                else:
                    check(lambda: result)

        asyncio.run(main())
    finally:
        server.close()


def test_errors_are_fresh_each_time_and_pickle(server: ServerThread) -> None:
    import pickle

    dev = sync.connect(HOST, "1-1", server.port)
    server.stop()
    errors = []
    for _ in range(3):
        with pytest.raises(ClientError) as caught:
            dev.control(*GET_DEVICE, timeout=5)
        errors.append(caught.value)
    assert len({id(e) for e in errors}) == 3
    assert all(len(list(_frames(e))) < 20 for e in errors)
    dev.close()
    for error in [*errors, TransferTimeout("x", 1.0, completed=True),
                  urb_error(RetSubmit(1, -75), "bulk")]:
        copy = pickle.loads(pickle.dumps(error))
        assert type(copy) is type(error) and str(copy) == str(error)
        assert copy.__dict__ == error.__dict__


def _frames(error: BaseException) -> Iterator[object]:
    tb = error.__traceback__
    while tb is not None:
        yield tb
        tb = tb.tb_next


def test_statuses_are_linux_errnos_on_any_host() -> None:
    from usbipy.protocol.constants import LINUX_ERRNO, LINUX_ERRNO_NAME

    assert (LINUX_ERRNO["EOVERFLOW"], LINUX_ERRNO["ECONNRESET"], LINUX_ERRNO["ESHUTDOWN"]) == (
        75, 104, 108)
    error = urb_error(RetSubmit(1, -75))
    assert type(error) is Overflow and error.errno_name == "EOVERFLOW"
    assert type(urb_error(RetSubmit(1, -108))) is DeviceGone
    assert LINUX_ERRNO_NAME[121] == "EREMOTEIO"


def test_seqnums_wrap_and_skip_those_in_flight() -> None:
    from ..helpers import imported_client

    client = imported_client()
    client.send_submit(1, 0x30002, Direction.IN, 1, 0, 8)
    client._last_seqnum = 0xFFFFFFFE
    assert client.next_seqnum() == 0xFFFFFFFF
    assert client.next_seqnum() == 2  # (1 is in flight)
