"""The blocking userspace client: the same transfers as the asyncio one, no event loop.

For scripts and for the PyUSB backend (:mod:`usbipy.pyusb`)::

    from usbipy.client import sync

    with sync.connect("127.0.0.1", "1-1") as dev:
        descriptor = dev.control(0x80, 6, 0x0100, 0, 18, timeout=1)

It runs on the caller's thread over a blocking socket and the sans-IO codec
(as h11 serves both forms), not through a thread that runs an event loop: a
hop to another thread and back costs more than a URB to a local server.
Several threads may use one device at once: each sends its own URBs, and
whichever is waiting reads the socket for all of them, so a thread that waits
on an interrupt endpoint does not hold up another's control transfers.
:meth:`Device.submit` and :meth:`Device.wait` put many URBs in flight from
one thread.

TLS runs through an :class:`ssl.SSLObject` on memory buffers, so that a read
and a write from two threads never meet inside one OpenSSL object.
"""

from __future__ import annotations

import copy
import logging
import select
import socket
import ssl
import threading
import time
from collections.abc import Callable, Sequence
from types import TracebackType
from typing import NoReturn

from ..keepalive import DEFAULT, Keepalive
from ..protocol import (
    ClientConnection,
    CmdUnlink,
    DeviceInfo,
    Direction,
    IsoPacket,
    OpRepDevlist,
    OpRepImport,
    OpReqDevlist,
    OpReqImport,
    OpStatus,
    RemoteProtocolError,
    RetSubmit,
    RetUnlink,
)
from ..protocol.constants import USBIP_PORT
from ..protocol.messages import OpRepResume
from ..tls import TlsSession, handshake_failure
from ..usb.urb import UrbFlag
from .errors import (
    EARLY_CLOSE,
    ClientError,
    HostUnreachable,
    ImportRefused,
    ServerGone,
    TlsRefused,
    TransferTimeout,
    lost_reason,
)
from .handshake import exchange
from .relay import RelayThread, import_resumable
from .transfers import (
    CONNECT_TIMEOUT,
    UNLINK_TIMEOUT,
    IsoResult,
    after_unlink,
    checked,
    control_request,
    describe,
    iso_layout,
    iso_results,
    unlink_grace,
)

log = logging.getLogger("usbipy.client")

#: Bytes asked of the socket per read: a 64 KiB bulk reply and its header in one.
#: Not more: recv() allocates this much each time, and beyond 128 KiB malloc
#: maps and unmaps it for every read.
READ_SIZE = 64 * 1024 + 48


class _Channel:
    """A connected socket, with or without TLS.

    The socket stays non-blocking, and every wait is a poll() with its own
    deadline: a timeout set on the socket would also bound other threads'
    writes. A writer that cannot write calls ``pump`` while it waits, so
    that replies keep being read even when no thread is waiting for one (a
    server whose replies back up stops reading, and both would wait for ever).
    """

    def __init__(self, sock: socket.socket, host: str, port: int) -> None:
        sock.setblocking(False)
        self.sock = sock
        self.host = host
        self.port = port
        self._readable = select.poll()
        self._readable.register(sock, select.POLLIN)
        self._write_lock = threading.Lock()
        self.tls: TlsSession | None = None
        self._ssl: ssl.SSLObject | None = None
        self._in = ssl.MemoryBIO()
        self._out = ssl.MemoryBIO()
        self._ssl_lock = threading.Lock()

    def start_tls(self, context: ssl.SSLContext, server_hostname: str,
                  deadline: float) -> None:
        self._ssl = context.wrap_bio(self._in, self._out, server_hostname=server_hostname)
        try:
            while True:
                try:
                    self._ssl.do_handshake()
                    break
                except ssl.SSLWantReadError:
                    self._send_raw(self._out.read(), deadline)
                    data = self._recv_raw(deadline)
                    if not data:
                        raise ssl.SSLEOFError("the server closed the connection") from None
                    self._in.write(data)
            self._send_raw(self._out.read(), deadline)
        except (OSError, TimeoutError) as exc:
            raise TlsRefused(self.host, self.port, handshake_failure(exc)) from exc
        self.tls = TlsSession.of(self._ssl, kernel=False)

    def send(self, data: bytes, deadline: float | None = None,
             pump: Callable[[], None] | None = None) -> None:
        """All of ``data``, in order with other threads' sends."""
        with self._write_lock:
            if self._ssl is not None:
                with self._ssl_lock:
                    self._ssl.write(data)
                    data = self._out.read()
            self._send_raw(data, deadline, pump)

    def _send_raw(self, data: bytes, deadline: float | None,
                  pump: Callable[[], None] | None = None) -> None:
        sock = self.sock
        try:
            sent = sock.send(data)  # (the usual case: all of it, at once)
        except BlockingIOError:
            sent = 0
        if sent == len(data):
            return
        view = memoryview(data)[sent:]
        poller = select.poll()
        poller.register(sock, select.POLLOUT | (select.POLLIN if pump else 0))
        while view:
            if deadline is None:
                timeout = None
            else:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError
                timeout = remaining * 1000
            events = 0
            for _fd, event in poller.poll(timeout):
                events |= event
            if events & (select.POLLIN | select.POLLHUP | select.POLLERR) and pump:
                pump()
            if events & (select.POLLOUT | select.POLLHUP | select.POLLERR):
                try:
                    view = view[sock.send(view):]
                except BlockingIOError:
                    pass

    def _recv_raw(self, deadline: float | None) -> bytes:
        """Some bytes (b"" at the end); TimeoutError past ``deadline`` (0: now or never)."""
        while True:
            if deadline is None:
                ready = self._readable.poll()
            else:
                remaining = deadline - time.monotonic()
                ready = self._readable.poll(max(0.0, remaining) * 1000)
            if not ready:
                raise TimeoutError
            try:
                return self.sock.recv(READ_SIZE)
            except BlockingIOError:
                continue  # (a spurious wake-up)

    def recv(self, deadline: float | None) -> bytes:
        """Some bytes from the server (b"" at its end); TimeoutError past ``deadline``."""
        if self._ssl is None:
            return self._recv_raw(deadline)
        while True:
            with self._ssl_lock:
                try:
                    return self._ssl.read(READ_SIZE)
                except ssl.SSLWantReadError:
                    pass
                except ssl.SSLZeroReturnError:
                    return b""
            data = self._recv_raw(deadline)
            with self._ssl_lock:
                if not data:
                    self._in.write_eof()
                else:
                    self._in.write(data)

    def close(self) -> None:
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()


def _open(host: str, port: int, tls: ssl.SSLContext | None, server_hostname: str | None,
          keepalive: Keepalive, timeout: float) -> _Channel:
    try:
        sock = socket.create_connection((host, port), timeout=timeout)
    except OSError as exc:
        raise HostUnreachable(host, port, exc) from exc
    try:
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            keepalive.apply(sock)
        except OSError as exc:
            raise HostUnreachable(host, port, exc) from exc
        channel = _Channel(sock, host, port)
        if tls is not None:
            channel.start_tls(tls, server_hostname or host, time.monotonic() + timeout)
    except BaseException:
        sock.close()
        raise
    return channel


def _op(channel: _Channel, conn: ClientConnection, request: bytes, timeout: float
        ) -> OpRepDevlist | OpRepImport:
    deadline = time.monotonic() + timeout
    reply = exchange(conn, request, lambda data: channel.send(data, deadline),
                     lambda: channel.recv(deadline), channel.tls is None)
    assert not isinstance(reply, OpRepResume)  # (never asked for here)
    return reply


def list_devices(host: str, port: int = USBIP_PORT, *, tls: ssl.SSLContext | None = None,
                 server_hostname: str | None = None, keepalive: Keepalive = DEFAULT,
                 timeout: float = CONNECT_TIMEOUT) -> tuple[DeviceInfo, ...]:
    """OP_REQ_DEVLIST: the devices ``host`` exports (see the asyncio form)."""
    channel = _open(host, port, tls, server_hostname, keepalive, timeout)
    try:
        conn = ClientConnection()
        reply = _op(channel, conn, conn.send(OpReqDevlist()), timeout)
        assert isinstance(reply, OpRepDevlist)
        return reply.devices
    finally:
        channel.close()


def connect(host: str, busid: str, port: int = USBIP_PORT, *,
            tls: ssl.SSLContext | None = None, server_hostname: str | None = None,
            keepalive: Keepalive = DEFAULT, timeout: float = CONNECT_TIMEOUT,
            resume: bool = False) -> Device:
    """OP_REQ_IMPORT: hold ``busid`` and get a :class:`Device` to transfer with.

    ``tls`` (:func:`usbipy.tls.client_context`) for mutual TLS, checking that
    the server's certificate names ``server_hostname`` (default ``host``);
    ``timeout`` bounds the connection, the handshake and the import.

    With ``resume``, a lost connection is resumed in place where the server
    offers it (usbipyd): transfers in flight wait, and go on (see
    :mod:`usbipy.client.relay`, which runs in a thread of its own).
    """
    if resume:
        return _connect_resumable(host, busid, port, tls, server_hostname, keepalive, timeout)
    channel = _open(host, port, tls, server_hostname, keepalive, timeout)
    try:
        conn = ClientConnection()
        reply = _op(channel, conn, conn.send(OpReqImport(busid)), timeout)
        assert isinstance(reply, OpRepImport)
        if reply.status is not OpStatus.OK or reply.device is None:
            raise ImportRefused(busid, reply.status)
    except BaseException:
        channel.close()
        raise
    return Device(channel, conn, reply.device)


def _connect_resumable(host: str, busid: str, port: int, tls: ssl.SSLContext | None,
                       server_hostname: str | None, keepalive: Keepalive, timeout: float
                       ) -> Device:
    conn = ClientConnection()
    sock, info, relay, session = import_resumable(host, busid, port, tls, server_hostname,
                                                  keepalive, timeout, conn)
    device = Device(_Channel(sock, host, port), conn, info)
    device.tls = session
    device._relay = relay
    return device


class Device:
    """An imported device over a blocking connection (from :func:`connect`).

    The transfer methods are those of the asyncio :class:`RemoteDevice`, with
    the same errors: :class:`UrbError` subclasses by status,
    :class:`TransferTimeout` (the URB was unlinked), :class:`ServerGone`.
    """

    def __init__(self, channel: _Channel, conn: ClientConnection, info: DeviceInfo) -> None:
        self.info = info
        #: The TLS session with the server, None for plaintext.
        self.tls = channel.tls
        self._channel = channel
        self._conn = conn
        self._codec = threading.Lock()  # the codec's send and parse, never held over I/O
        #: Guards _reading, _done, _waiters and _orphans (plain Lock: a Condition's
        #: Python-level methods cost a tenth of a local round trip).
        self._state = threading.Lock()
        #: Whether a thread is reading the socket for everyone.
        self._reading = False
        #: Threads waiting while another reads, by the seqnum each waits for.
        self._waiters: dict[int, threading.Event] = {}
        #: Replies read and not yet collected, by seqnum.
        self._done: dict[int, RetSubmit | RetUnlink] = {}
        #: seqnums whose replies no one will collect (an interrupted transfer's and
        #: its unlink's), and each such unlink's target.
        self._orphans: set[int] = set()
        self._orphan_unlinks: dict[int, int] = {}
        self._error: ClientError | None = None
        #: The relay of a resumable connection (connect(resume=True)).
        self._relay: RelayThread | None = None
        #: When the import was answered (time.monotonic()).
        self._imported_at = time.monotonic()
        self._closed = False

    @property
    def closed(self) -> bool:
        return self._closed or self._error is not None

    # --- URBs -------------------------------------------------------------------

    def submit(self, ep: int, direction: Direction, length: int = 0, *, data: bytes = b"",
               setup: bytes = bytes(8), transfer_flags: int = 0,
               iso_packets: list[IsoPacket] | None = None, interval: int = 0) -> int:
        """Send CMD_SUBMIT; its seqnum, for :meth:`wait` (status unchecked there)."""
        return self._submit(ep, direction, length, data, setup, transfer_flags, iso_packets,
                            interval)

    def _submit(self, ep: int, direction: Direction, length: int, data: bytes, setup: bytes,
                transfer_flags: int, iso_packets: list[IsoPacket] | None, interval: int
                ) -> int:
        if direction is Direction.OUT:
            length = len(data)
        with self._codec:
            if self._closed or self._error is not None:
                self._check_open()
            seqnum = self._conn.next_seqnum()
            wire = self._conn.send_submit(seqnum, self.info.devid, direction, ep,
                                          transfer_flags, length, setup, data, 0, 0, interval,
                                          iso_packets)
        self._send(wire)
        return seqnum

    def wait(self, seqnum: int, timeout: float | None = None) -> RetSubmit:
        """The RET_SUBMIT of ``seqnum``; TimeoutError (the URB still in flight)
        when it did not come within ``timeout`` seconds. (After :meth:`unlink`,
        only a URB whose RET_SUBMIT came before the RET_UNLINK has one.)"""
        reply = self._wait(seqnum, None if timeout is None else time.monotonic() + timeout)
        assert isinstance(reply, RetSubmit)
        return reply

    def unlink(self, seqnum: int, timeout: float = UNLINK_TIMEOUT) -> RetUnlink:
        """CMD_UNLINK ``seqnum`` and its RET_UNLINK (status -ECONNRESET when the URB
        was cancelled, 0 when it had completed: its RET_SUBMIT, if any, came first).
        A server that does not answer within ``timeout`` seconds has lost track of
        it: the connection is closed (ClientError)."""
        with self._codec:
            self._check_open()
            unlink_seqnum = self._conn.next_seqnum()
            wire = self._conn.send(CmdUnlink(unlink_seqnum, self.info.devid, seqnum))
        self._send(wire)
        try:
            reply = self._wait(unlink_seqnum, time.monotonic() + timeout)
        except TimeoutError:
            self._fail(ClientError(f"the server did not answer the unlink of URB {seqnum} "
                                   f"within {timeout:g} s; the connection was closed"))
            self._check_open()
            raise  # (unreachable: _check_open raised)
        assert isinstance(reply, RetUnlink)
        return reply

    def transfer(self, ep: int, direction: Direction, length: int = 0, *, data: bytes = b"",
                 setup: bytes = bytes(8), transfer_flags: int = 0,
                 iso_packets: list[IsoPacket] | None = None, interval: int = 0,
                 timeout: float | None = None) -> RetSubmit:
        """One URB to its end within ``timeout`` seconds, as the asyncio form's.

        After the time runs out the URB is unlinked, and the server has up to
        ``max(1 s, timeout)`` more to answer that; one that does not has lost
        track of the URB, and the connection is closed. An exception that
        interrupts the wait (KeyboardInterrupt) unlinks it too, without waiting.
        """
        seqnum = self._submit(ep, direction, length, data, setup, transfer_flags, iso_packets,
                              interval)
        try:
            ret = self._wait(seqnum, None if timeout is None else time.monotonic() + timeout)
        except TimeoutError:
            assert timeout is not None
            ret = self._after_timeout(seqnum, ep, direction, setup, iso_packets, timeout)
        except BaseException:
            self._abandon(seqnum)
            raise
        assert isinstance(ret, RetSubmit)
        return checked(ret, ep, direction, setup, iso_packets)

    def _after_timeout(self, seqnum: int, ep: int, direction: Direction, setup: bytes,
                       iso_packets: list[IsoPacket] | None, timeout: float) -> RetSubmit:
        """Unlink a URB that timed out: its RET_SUBMIT if it came first, else the
        error that says how it ended."""
        what = describe(ep, direction, setup, iso_packets)
        try:
            unlinked = self.unlink(seqnum, unlink_grace(timeout))
        except ClientError:
            raise TransferTimeout(what, timeout) from None  # (and the connection is closed)
        with self._state:  # a RET_SUBMIT that came before the RET_UNLINK
            raced = self._done.pop(seqnum, None)
        return after_unlink(seqnum, raced if isinstance(raced, RetSubmit) else None,
                            unlinked, what, timeout)

    def _abandon(self, seqnum: int) -> None:
        """Unlink ``seqnum`` without waiting, and drop its replies when they come."""
        try:
            with self._codec:
                if self.closed:
                    return
                unlink_seqnum = self._conn.next_seqnum()
                wire = self._conn.send(CmdUnlink(unlink_seqnum, self.info.devid, seqnum))
            with self._state:
                self._orphans.update((seqnum, unlink_seqnum))
                self._orphan_unlinks[unlink_seqnum] = seqnum
                self._done.pop(seqnum, None)
            self._send(wire)
        except Exception:  # noqa: BLE001 (best effort, on the way out of an exception)
            pass

    # --- the transfers, as in the asyncio client ---------------------------------

    def control(self, bmRequestType: int, bRequest: int, wValue: int, wIndex: int,
                wLength_or_data: int | bytes, *, timeout: float | None = None) -> bytes:
        """A control transfer on endpoint 0: IN data, or b"" for OUT."""
        direction, length, setup, data = control_request(bmRequestType, bRequest, wValue,
                                                          wIndex, wLength_or_data)
        return self.transfer(0, direction, length, data=data, setup=setup,
                             timeout=timeout).data

    def bulk_read(self, ep: int, length: int, *, timeout: float | None = None,
                  short_not_ok: bool = False) -> bytes:
        flags = UrbFlag.SHORT_NOT_OK if short_not_ok else 0
        return self.transfer(ep & 0x7F, Direction.IN, length, transfer_flags=flags,
                             timeout=timeout).data

    def bulk_write(self, ep: int, data: bytes, *, timeout: float | None = None,
                   zero_packet: bool = False) -> int:
        flags = UrbFlag.ZERO_PACKET if zero_packet else 0
        return self.transfer(ep & 0x7F, Direction.OUT, data=bytes(data), transfer_flags=flags,
                             timeout=timeout).actual_length

    def interrupt_read(self, ep: int, length: int, *, timeout: float | None = None) -> bytes:
        return self.transfer(ep & 0x7F, Direction.IN, length, timeout=timeout).data

    def interrupt_write(self, ep: int, data: bytes, *, timeout: float | None = None) -> int:
        return self.transfer(ep & 0x7F, Direction.OUT, data=bytes(data),
                             timeout=timeout).actual_length

    def iso_read(self, ep: int, packet_lengths: Sequence[int], *,
                 timeout: float | None = None, interval: int = 1) -> list[IsoResult]:
        packets = iso_layout(packet_lengths)
        ret = self.transfer(ep & 0x7F, Direction.IN, sum(packet_lengths), iso_packets=packets,
                            transfer_flags=UrbFlag.ISO_ASAP, interval=interval,
                            timeout=timeout)
        return iso_results(ret, packets, Direction.IN)

    def iso_write(self, ep: int, packets: Sequence[bytes], *, timeout: float | None = None,
                  interval: int = 1) -> list[IsoResult]:
        layout = iso_layout([len(p) for p in packets])
        ret = self.transfer(ep & 0x7F, Direction.OUT, data=b"".join(packets),
                            iso_packets=layout, transfer_flags=UrbFlag.ISO_ASAP,
                            interval=interval, timeout=timeout)
        return iso_results(ret, layout, Direction.OUT)

    # --- the connection ---------------------------------------------------------

    def _check_open(self) -> None:
        # (a copy each time: one exception object raised in many threads would
        # gather every traceback and keep every frame alive)
        if self._closed:
            raise ClientError("the device is closed")
        if self._error is not None:
            raise copy.copy(self._error)

    def _send(self, wire: bytes) -> None:
        try:
            self._channel.send(wire, None, self._pump)
        except (OSError, ssl.SSLError, ValueError) as exc:  # (ValueError: closed here)
            self._lost(exc)

    def _pump(self) -> None:
        """Read what has come, for everyone, if no thread reads now: called by a
        sender whose writes wait for the server, which may wait for us to read."""
        with self._state:
            if self._reading:
                return
            self._reading = True
        try:
            self._read_once(None, 0.0)
        except TimeoutError:
            pass
        finally:
            with self._state:
                self._reading = False
                if self._waiters:
                    self._wake_all()

    def _wait(self, seqnum: int, deadline: float | None) -> RetSubmit | RetUnlink:
        """The reply to ``seqnum``: read by this thread, or by the one reading now."""
        while True:
            with self._state:
                reply = self._done.pop(seqnum, None)
                if reply is not None:
                    return reply
                if self._closed or self._error is not None:
                    self._check_open()
                if not self._reading:
                    self._reading = True
                    event = None
                else:
                    event = self._waiters.setdefault(seqnum, threading.Event())
                    event.clear()
            if event is None:
                try:
                    while True:
                        mine = self._read_once(seqnum, deadline)
                        if mine is not None:
                            return mine
                finally:
                    with self._state:
                        self._reading = False
                        if self._waiters:
                            self._wake_all()  # (one of them reads next)
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0 or not event.wait(remaining):
                with self._state:
                    self._waiters.pop(seqnum, None)
                    reply = self._done.pop(seqnum, None)
                if reply is not None:
                    return reply
                raise TimeoutError

    def _wake_all(self) -> None:
        for event in self._waiters.values():
            event.set()
        self._waiters.clear()

    def _read_once(self, seqnum: int | None, deadline: float | None
                   ) -> RetSubmit | RetUnlink | None:
        """Read one chunk and hand out its replies; the one for ``seqnum``, if it
        came (the reader's own, returned rather than stored)."""
        try:
            data = self._channel.recv(deadline)
        except TimeoutError:
            raise
        except (OSError, ssl.SSLError, ValueError) as exc:  # (ValueError: closed here)
            self._lost(exc)
        if not data:
            self._lost(None)
        try:
            with self._codec:
                self._conn.receive_data(data)
                replies = list(self._conn.events())
        except RemoteProtocolError as exc:
            self._fail(ClientError(f"the server broke the protocol: {exc}"))
            self._check_open()
        if len(replies) == 1 and not self._orphans:  # (the usual case: the one reply, ours)
            first = replies[0]
            if isinstance(first, (RetSubmit, RetUnlink)) and first.seqnum == seqnum:
                return first
        mine = None
        with self._state:
            for reply in replies:
                if not isinstance(reply, (RetSubmit, RetUnlink)):
                    continue
                if reply.seqnum in self._orphans:
                    if isinstance(reply, RetUnlink):  # (no RET_SUBMIT comes after it)
                        self._orphans.discard(reply.seqnum)
                        self._orphans.discard(self._orphan_unlinks.pop(reply.seqnum, -1))
                    continue
                if reply.seqnum == seqnum:
                    mine = reply
                    continue
                self._done[reply.seqnum] = reply
                event = self._waiters.pop(reply.seqnum, None)
                if event is not None:
                    event.set()
        return mine

    def _lost(self, exc: BaseException | None) -> NoReturn:
        self._check_open()  # closed by us (from another thread): not a loss
        early = time.monotonic() - self._imported_at < EARLY_CLOSE
        self._fail(ServerGone(self._channel.host, self._channel.port,
                              lost_reason(exc, early=early)))
        self._check_open()
        raise AssertionError("unreachable")

    def _fail(self, error: ClientError) -> None:
        with self._state:
            if self._error is None:
                self._error = error
            self._wake_all()
        self._channel.close()

    def close(self) -> None:
        """Close the connection: the server releases the device."""
        with self._state:
            self._closed = True
            self._wake_all()
        relay, self._relay = self._relay, None
        if relay is not None:
            relay.stop()  # (its FIN first: the server releases the device at once)
        self._channel.close()

    def __enter__(self) -> Device:
        return self

    def __exit__(self, et: type[BaseException] | None, e: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()
