"""One client connection: the OP handshake, then URB dispatch with UNLINK.

Each URB in flight is a future or task, completed in any order. A URB that a
device finishes at once is answered without creating a task at all. Every
reply's bytes come from the codec (:class:`ServerConnection`); this layer
only decides when to send them. Whatever may block (listing devices,
opening a libusb device, writing usbip_sockfd) runs as a task, with reading
paused until it is done, so other clients are served meanwhile. What an import
does, and what it checks after each wait, is :mod:`.importing`'s.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import math
import socket
import time
from collections.abc import Awaitable, Coroutine, Sequence
from typing import Any, cast

from ..backends.base import Completion, ExportedDevice, HandOffDevice
from ..capture import Capture, UrbRecorder
from ..escape import printable
from ..protocol import (
    CmdSubmit,
    CmdUnlink,
    DeviceInfo,
    Direction,
    OpRepDevlist,
    OpRepImport,
    OpReqDevlist,
    OpReqImport,
    OpStatus,
    RemoteProtocolError,
    ServerConnection,
    SubmitReply,
)
from ..protocol.constants import ECONNRESET, EPROTO
from ..protocol.messages import OpRepResume, OpReqResume, ResumeGrant
from ..protocol.wire import RESUME_GRANT_AT
from ..tls import TlsSession
from .access import Access, client_of
from .importing import import_device
from .limits import Slot, client_key
from .memory import give_back
from .peerwatch import bytes_acked, peer_gone
from .registry import DeviceRegistry
from .resume import Resumable, may_resume
from .stats import ServerStats, status_name

log = logging.getLogger("usbipy.server")

#: Beyond this many URBs in flight on one connection, stop reading from it.
MAX_IN_FLIGHT = 4096
#: Beyond this many bytes of OUT data held by pending URBs (a device that takes the
#: data and completes the URB later, as a serial port that waits for its reader),
#: stop reading: the URB count alone would let 4096 x 16 MiB pile up.
MAX_PENDING_OUT_BYTES = 64 << 20

#: Seconds a closing connection has to take its last replies before it is cut.
CLOSE_TIMEOUT = 30.0

#: Seconds between looks at a paused connection's socket for its client's leaving
#: (see _watch_paused and :mod:`.peerwatch`).
PAUSED_WATCH_INTERVAL = 1.0

#: Seconds the answer to an UNLINK waits for its URB to come (ServerConnection.
#: hold_unlink): vhci_hcd sends it within its next round, milliseconds later.
EARLY_UNLINK_HOLD = 2.0

#: A TLS record of type handshake (22), version 3.x: a ClientHello's first bytes.
TLS_HANDSHAKE_RECORD = b"\x16\x03"

#: Releases of devices whose clients left, until each is done.
_releasing: set[asyncio.Task[None]] = set()


class UsbipServerProtocol(asyncio.Protocol):
    """asyncio protocol for one client; the codec is a :class:`ServerConnection`."""

    def __init__(self, registry: DeviceRegistry, *, max_transfer_length: int,
                 connections: set[UsbipServerProtocol], tls: TlsSession | None = None,
                 access: Access | None = None, capture: Capture | None = None,
                 stats: ServerStats | None = None) -> None:
        self.registry = registry
        #: The server's counters, when it serves metrics; and the keys this
        #: connection's URBs count under (set at the import).
        self._stats = stats
        self._key_in = self._key_out = ("", "")
        #: The server's capture file, if any, and this connection's recorder in it
        #: (made at the import of a device whose URBs Python handles).
        self._capture = capture
        self._recorder: UrbRecorder | None = None
        #: The policy and limits in force (shared by the server's connections).
        self.access = access if access is not None else Access()
        #: Who the policy judges (set when connected).
        self.client = client_of(None, None)
        #: This connection's place in the server's count, if it is counted.
        self.slot: Slot | None = None
        self._client_key = "?"
        #: The client's TLS session (a kernel TLS one is passed in; a userspace
        #: one is read off the transport), None for plaintext.
        self.tls = tls
        self.conn = ServerConnection(max_transfer_length=max_transfer_length)
        self.device: ExportedDevice | None = None
        #: When the device was imported (time.time()), and the bytes of its URBs
        #: from and to the client (counted with the metrics: the status page's).
        self.imported_at: float | None = None
        self.bytes_in = self.bytes_out = 0
        self.peer = "?"
        #: The client's address (None: not an IP connection).
        self._address: str | None = None
        #: The client offered a resumable stream with its import; and the
        #: attachment that is this protocol's transport when it was granted.
        self._resume_offered = False
        self._resumable: Resumable | None = None
        self._connections = connections
        self._transport: asyncio.Transport | None = None
        #: seqnum -> a URB the device did not finish at once, and its pending outcome
        self._futures: dict[int, tuple[CmdSubmit, asyncio.Future[Completion]]] = {}
        #: OUT bytes of the URBs in _futures
        self._pending_out = 0
        self._paused_reading = False
        self._paused_writing = False
        #: Reading is paused while an OP request is being answered.
        self._op_pending = False
        self._closed = False
        #: What the client sent first: a TLS ClientHello on a plaintext port is told apart.
        self._first_bytes = b""
        self._task: asyncio.Task[None] | None = None
        #: Until the OP request is whole: the time left for it, and for silence.
        self._request_timer: asyncio.TimerHandle | None = None
        self._idle_timer: asyncio.TimerHandle | None = None
        #: Set when a close waits for replies to be flushed: the time they have.
        self._close_timer: asyncio.TimerHandle | None = None
        self._release_timer: asyncio.TimerHandle | None = None
        #: While reading is paused: the next look at the socket (_watch_paused),
        #: what the connection held (URBs in flight, OUT bytes, and minus the reply
        #: bytes the client acked) when something last moved, and since when.
        self._watch_timer: asyncio.TimerHandle | None = None
        self._held = (0, 0, 0)
        self._stall_since: float | None = None
        #: Whether the connection ever reached its caps (URBs in flight, OUT bytes):
        #: then it held tens of MiB, given back to the system when it ends
        #: (:mod:`.memory`).
        self._throttled = False
        #: The seqnums of held UNLINKs' URBs (ServerConnection.hold_unlink), and
        #: until when (loop time) each answer waits.
        self._held_until: dict[int, float] = {}
        #: Resolved once the connection is gone and its device released.
        self.finished: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        #: Replies made while one batch of input is handled, sent with one write:
        #: at depth 32 one recv carries many URBs, and one send per reply would
        #: cost more than the URBs themselves.
        self._batch: list[bytes] | None = None

    @property
    def in_flight(self) -> int:
        """URBs the device has not finished yet."""
        return len(self._futures)

    # --- asyncio.Protocol --------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # (uvloop's transports do not derive from asyncio.Transport)
        self._transport = cast(asyncio.Transport, transport)
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            # URBs are small and latency-bound: never wait for Nagle.
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        peer = transport.get_extra_info("peername")
        self.peer = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer)
        ssl_object = transport.get_extra_info("ssl_object")
        if ssl_object is not None:
            self.tls = TlsSession.of(ssl_object, kernel=False)
        if self.tls is not None:
            # the verified identity, in every line about this client
            self.peer = f"{self.peer} {self.tls.peer}"
        self._address = peer[0] if isinstance(peer, tuple) else None
        self.client = client_of(self._address, self.tls)
        self._client_key = client_key(peer)
        self._connections.add(self)
        if self._stats is not None:
            self._stats.connections += 1
        limits = self.access.limits
        loop = asyncio.get_running_loop()
        self._request_timer = loop.call_later(
            limits.request_timeout, self._timed_out,
            f"no complete request in {limits.request_timeout:g} s (request_timeout)")
        self._idle_timer = loop.call_later(limits.idle_timeout, self._idle)
        if self.slot is not None:  # (the server may close it to make room for another)
            self.access.admission.waiting(self.slot, self._abort)
        log.debug("%s: connected%s", self.peer, f" ({self.tls.protection})" if self.tls else "")

    def data_received(self, data: bytes) -> None:
        if self._idle_timer is not None:  # (the OP phase: a byte restarts the idle clock)
            self._idle_timer.cancel()
            self._idle_timer = asyncio.get_running_loop().call_later(
                self.access.limits.idle_timeout, self._idle)
        if len(self._first_bytes) < 2:
            self._first_bytes += data[:2 - len(self._first_bytes)]
        self.conn.receive_data(data)
        self._process()

    def pieces_received(self, pieces: Sequence[memoryview]) -> None:
        """Consecutive pieces of the stream, handled as one read, their replies in one
        write: a resumable stream's payload of several frames (server/resume.py). Only
        after the import, where no idle clock runs."""
        if len(pieces) == 1:
            self.conn.receive_data(pieces[0])
        elif pieces:  # (one copy of them all, not a copy grown piece by piece)
            self.conn.receive_data(b"".join(pieces))
        self._process()

    def _process(self) -> None:
        """Handle every whole message buffered, replies batched into one write."""
        self._batch = []
        try:
            self._dispatch()
        finally:
            self._flush()
            self._batch = None

    def _dispatch(self) -> None:
        try:
            for event in self.conn.events():
                if type(event) is CmdSubmit:
                    self._submit(event)
                elif type(event) is CmdUnlink:
                    self._unlink(event)
                elif type(event) is OpReqDevlist:
                    self._start_op(self._devlist())
                    return  # the rest waits for the reply
                elif type(event) is OpReqImport:
                    self._resume_offered = event.resume
                    self._start_op(import_device(self, event.busid))
                    return
                elif type(event) is OpReqResume:
                    self._resume(event)
                    return
                if self._closed:
                    return
        except RemoteProtocolError as exc:
            hint = ""
            if self._first_bytes.startswith(TLS_HANDSHAKE_RECORD) and self.tls is None:
                hint = " (a TLS handshake: this port serves plaintext USB/IP)"
            log.warning("%s: closing the connection: %s: %s%s", self.peer,
                        type(exc).__name__, printable(str(exc)), hint)
            self._abort()
            return
        if (self.conn.in_flight >= MAX_IN_FLIGHT or self._pending_out > MAX_PENDING_OUT_BYTES
                ) and not self._paused_reading:
            self._throttled = True
            self._pause_reading()

    def eof_received(self) -> bool | None:
        return None  # close our side too

    # --- OP-phase time limits ------------------------------------------------------

    def _stop_timers(self) -> None:
        for timer in (self._request_timer, self._idle_timer):
            if timer is not None:
                timer.cancel()
        self._request_timer = self._idle_timer = None
        if self.slot is not None:
            self.access.admission.served(self.slot)

    def _idle(self) -> None:
        self._timed_out(f"nothing sent for {self.access.limits.idle_timeout:g} s in the "
                        "OP phase (idle_timeout)")

    def _timed_out(self, why: str) -> None:
        self._stop_timers()
        if not self._closed:
            self.access.log.warning("timeout", f"{self.peer}: closing the connection: {why}")
            self._abort()

    # --- the end: the device released once the client is gone -----------------------

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_timers()
        if self.slot is not None:  # (the socket is closed: it counts no more)
            self.slot.release()
        if self._close_timer is not None:
            self._close_timer.cancel()
        if self._release_timer is not None:
            self._release_timer.cancel()
        if self._watch_timer is not None:
            self._watch_timer.cancel()
            self._watch_timer = None
        self._closed = True
        self._resumable = None
        self._connections.discard(self)
        for _urb, future in self._futures.values():
            future.cancel()
        self._futures.clear()
        self._pending_out = 0
        device, self.device = self.device, None
        if device is not None and exc is not None:
            why = ("the client stopped answering (dead_peer_timeout)"
                   if getattr(exc, "errno", None) == errno.ETIMEDOUT else
                   (getattr(exc, "strerror", None) or str(exc) or type(exc).__name__))
            log.warning("%s: %s lost: %s; the device is released", self.peer,
                        printable(device.busid), why)
        if device is not None:
            # Released only once detach is done: until then the device stays held,
            # so no other client imports it half released.
            task = asyncio.ensure_future(self._release(device))
            _releasing.add(task)  # (the loop keeps only a weak reference to a task)
            task.add_done_callback(_releasing.discard)
        elif self._task is None or self._task.done():
            self._finish()
        # else an OP request is being answered: not cancelled (a libusb open in a
        # worker thread cannot be), it sees the connection gone, releases what it
        # claimed, and _op_done finishes.
        log.debug("%s: disconnected (%s)", self.peer, exc or "closed")

    async def _release(self, device: ExportedDevice) -> None:
        device.drop_client = None
        try:
            await device.detach()
        except Exception:
            log.exception("%s: releasing %s failed", self.peer, printable(device.busid))
        finally:
            self.registry.release(device.busid, self)
            self._finish()
        log.info("%s: released %s", self.peer, printable(device.busid))

    def _finish(self) -> None:
        if not self.finished.done():
            self.finished.set_result(None)
            if self._throttled:
                # what it held is garbage now (its URBs, its buffer): return the pages
                give_back()

    # --- flow control: reading paused while the client or the device lags ------------

    def pause_writing(self) -> None:
        # The client does not read its replies: stop taking new URBs from it (if it
        # takes none of them for dead_peer_timeout, it is dead: _watch_paused).
        self._paused_writing = True
        self._pause_reading()

    def resume_writing(self) -> None:
        self._paused_writing = False
        self._maybe_resume_reading()

    def _pause_reading(self) -> None:
        if self._transport is not None and not self._paused_reading and not self._closed:
            self._paused_reading = True
            self._transport.pause_reading()
            if self._watch_timer is None:
                self._watch_timer = asyncio.get_running_loop().call_later(
                    PAUSED_WATCH_INTERVAL, self._watch_paused)

    def _watch_paused(self) -> None:
        """While reading is paused, the loop no longer sees the client's FIN, reset
        or dead-peer timeout: look for them on the socket once a second (poll(2),
        reading nothing; :mod:`.peerwatch` says why so).

        A FIN queued behind URBs that the server is not reading never arrives at
        all, and a client that takes none of its replies looks alive to TCP. So a
        paused connection on which nothing moves (no URB completes, no reply is
        taken) for dead_peer_timeout is taken for dead too, whatever it still
        sends: flow control is no way to hold a device."""
        self._watch_timer = None
        transport = self._transport
        if not self._paused_reading or self._closed or transport is None:
            return
        loop = asyncio.get_running_loop()
        self._watch_timer = loop.call_later(PAUSED_WATCH_INTERVAL, self._watch_paused)
        if self._op_pending:
            # An OP request is being answered (the socket may be on its way to
            # usbip-host): its task decides what becomes of the connection.
            return
        if self._resumable is not None and not self._resumable.connected:
            self._stall_since = None  # (what the old connection held says nothing now)
            return  # (the client is away: the resume window decides, not this)
        if transport.is_closing():
            return
        sock = transport.get_extra_info("socket")
        try:
            gone = peer_gone(sock) if sock is not None else None
        except OSError:  # (the socket went meanwhile: connection_lost will say)
            return
        if gone is not None:
            self._lost_while_paused("the client stopped answering (dead_peer_timeout)"
                                    if gone.errno == errno.ETIMEDOUT else
                                    gone.strerror or str(gone))
            return
        now = loop.time()
        # What moves: a URB completes (fewer in flight, fewer OUT bytes held), or the
        # client's TCP takes more of the replies (bytes acked: what the client reads,
        # through TLS too); without TCP_INFO, the write buffer shrinking.
        acked = bytes_acked(sock) if sock is not None else None
        held = (len(self._futures), self._pending_out,
                -acked if acked is not None else transport.get_write_buffer_size())
        if self._stall_since is None or any(n < m for n, m in zip(held, self._held, strict=True)):
            self._held, self._stall_since = held, now
        elif now - self._stall_since >= self.access.limits.dead_peer_timeout:
            what = ("it took none of its replies" if self._paused_writing else
                    "none of its URBs completed")
            self._lost_while_paused(f"{what} for {now - self._stall_since:.0f} s "
                                    "(dead_peer_timeout)")

    def transport_replaced(self) -> None:
        """A resumable attachment's new connection: the paused watch starts afresh
        (the bytes the old socket acked say nothing of the new one)."""
        self._stall_since = None

    def _lost_while_paused(self, why: str) -> None:
        if self._resumable is not None:
            # the connection is dead, not the attachment: its window starts
            log.warning("%s: connection lost while its reading was paused: %s", self.peer, why)
            self._resumable.drop()
            return
        device = self.device
        log.warning("%s: %s while its reading was paused: %s%s", self.peer,
                    f"{printable(device.busid)} lost" if device is not None else "connection lost",
                    why, "; the device is released" if device is not None else "")
        self._abort()

    def _maybe_resume_reading(self) -> None:
        if (self._paused_reading and not self._paused_writing and not self._closed
                and not self._op_pending and self.conn.in_flight < MAX_IN_FLIGHT // 2
                and self._pending_out <= MAX_PENDING_OUT_BYTES // 2):
            self._paused_reading = False
            self._stall_since = None
            if self._watch_timer is not None:
                self._watch_timer.cancel()
                self._watch_timer = None
            assert self._transport is not None
            self._transport.resume_reading()

    # --- OP phase: answered by a task, reading paused meanwhile ----------------------

    def _start_op(self, work: Coroutine[Any, Any, None]) -> None:
        self._stop_timers()  # (the request is whole: the OP phase ends with its answer)
        self._op_pending = True
        self._pause_reading()
        self._task = asyncio.ensure_future(work)
        self._task.add_done_callback(self._op_done)

    def _op_done(self, task: asyncio.Task[None]) -> None:
        self._op_pending = False
        if self._closed and self.device is None:
            self._finish()
        if task.cancelled():
            return
        exc = task.exception()
        if exc is not None:
            log.error("%s: answering the request failed", self.peer, exc_info=exc)
            self._abort()
            return
        if not self._closed:
            self._maybe_resume_reading()
            if self.conn.buffered:
                self._process()

    async def _devlist(self) -> None:
        available = await self.registry.available()
        decide, client = self.access.decide, self.client
        # Only what this client may import: the others are not shown at all.
        devices = tuple(d.info for d in available if decide(client, d).allowed)
        self._write(self.conn.send(OpRepDevlist(devices)))
        hidden = len(available) - len(devices)
        log.info("%s: sent the list of %d devices%s", self.peer, len(devices),
                 f" ({hidden} not shown by the access policy)" if hidden else "")
        self._close()

    # --- the import (importing.py decides; these are what it asks of the connection) ---

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def client_key(self) -> str:
        return self._client_key

    def client_socket(self) -> socket.socket:
        assert self._transport is not None
        sock: socket.socket = self._transport.get_extra_info("socket")
        return sock

    def refuse(self, status: OpStatus) -> None:
        self._write(self.conn.send(OpRepImport(status)))
        self._close()

    def serve(self, device: ExportedDevice, info: DeviceInfo) -> None:
        self.device = device
        self.imported_at = time.time()
        device.drop_client = self._close
        if self._capture is not None:
            self._recorder = self._capture.recorder(info.busnum, info.devnum)
        if self._stats is not None:
            self._stats.imported(device.busid, self.client)
            self._key_in, self._key_out = (device.busid, "in"), (device.busid, "out")
        window = self.access.limits.resume_window
        grant = None
        if (self._resume_offered and window > 0 and not self.conn.buffered
                and len(info.path.encode()) < RESUME_GRANT_AT and self._transport is not None):
            resumable = Resumable(self, self._transport, self.access.resumables,
                                  window=window, buffer=self.access.limits.resume_buffer,
                                  buffers=self.access.limits.resume_buffers,
                                  address=self._address, tls=self.tls,
                                  reading_paused=self._paused_reading)
            self._resumable = resumable
            grant = ResumeGrant(resumable.token, math.ceil(window))
            # the reply on the TCP connection itself; from then on, frames
            self._transport.write(self.conn.send(OpRepImport(OpStatus.OK, info, grant)))
            self._transport = cast(asyncio.Transport, resumable)
            return
        self._write(self.conn.send(OpRepImport(OpStatus.OK, info)))

    def _resume(self, request: OpReqResume) -> None:
        """OP_REQ_RESUME: give this connection to the attachment of the token, or
        refuse (NODEV: unknown, expired, or not this client's)."""
        self._stop_timers()
        target = self.access.resumables.get(request.token)
        if target is not None and target.is_closing():
            target = None  # (ending already: nothing to resume)
        why: str | None
        if target is None:
            status, why = OpStatus.NODEV, "unknown or expired token"
        else:
            device = target.protocol.device
            status, why = may_resume(
                target, self._address, self.tls,
                lambda: device is not None and self.access.decide(self.client, device).allowed)
            if why is None and not target.can_resend(request.received):
                status, why = OpStatus.ERROR, (
                    f"it says it has {request.received} bytes of the stream, which cannot be")
        if why is not None or target is None:
            self.access.log.warning(f"resume {self._client_key}",
                                    f"{self.peer}: resume refused: {why}")
            self._write(self.conn.send(OpRepResume(status)))
            self._close()
            return
        transport = self._transport
        assert transport is not None
        leftover = self.conn.take_buffered()
        # (past the batch: the frames the attachment sends again come after it)
        transport.write(self.conn.send(OpRepResume(OpStatus.OK, target.stream.received)))
        # This connection is the attachment's now: this protocol is done, unheard.
        self._closed = True
        self._transport = None
        self._connections.discard(self)
        if self.slot is not None:  # (the attachment's own connection holds one)
            self.slot.release()
        self._finish()
        target.resume(transport, request.received, leftover, self.peer)

    def served_by_kernel(self, device: HandOffDevice) -> None:
        self._write(self.conn.send(OpRepImport(OpStatus.OK, device.info)))
        if self._stats is not None:
            self._stats.imported(device.busid, self.client)
        self._close()

    def hang_up(self) -> None:
        self._close()

    async def release(self, device: ExportedDevice) -> None:
        await self._release(device)

    # --- URB phase ---------------------------------------------------------------

    def _submit(self, urb: CmdSubmit) -> None:
        conn = self.conn
        if conn.holding:
            replies, unlinked = conn.submit_after_unlinks(urb)
            if replies:
                self._write(replies)
            if not conn.holding:
                self._held_until.clear()
                if self._release_timer is not None:
                    self._release_timer.cancel()
                    self._release_timer = None
            if unlinked:
                log.debug("%s: seqnum %d was unlinked before it came", self.peer, urb.seqnum)
                if self._stats is not None:
                    self._stats.urbs[self._key_in if urb.direction is Direction.IN
                                     else self._key_out] += 1
                    self._stats.errors[(self._key_in[0], status_name(ECONNRESET))] += 1
                return
        stats = self._stats
        if stats is not None:
            stats.urbs[self._key_in if urb.direction is Direction.IN else self._key_out] += 1
        # (the comparison first: admit() decides, but most URBs need not ask it)
        if urb.transfer_buffer_length > conn.max_transfer_length:
            refusal = conn.admit(urb)
            if refusal is not None:
                self._client_fault(f"{refusal.fault}: refused with -ENOMEM")
                refusal.fault = None  # (the client's mistake, not the device's)
                if self._recorder is not None or stats is not None:
                    self._observe(urb, refusal, at_once=True)
                self._send_reply(refusal)
                return
        device = self.device
        assert device is not None
        if stats is not None and urb.direction is Direction.OUT:
            stats.bytes[self._key_out] += len(urb.data)
            self.bytes_in += len(urb.data)
        try:
            result = device.submit(urb)
        except Exception:
            log.exception("%s: %s failed on seqnum %d", self.peer, printable(device.busid),
                          urb.seqnum)
            result = Completion(status=EPROTO)
        if type(result) is Completion:
            self._reply(urb, result, at_once=True)
            return
        if self._recorder is not None:
            self._recorder.submitted(urb)
        assert isinstance(result, Awaitable)
        future: asyncio.Future[Completion] = asyncio.ensure_future(result)
        self._futures[urb.seqnum] = (urb, future)
        self._pending_out += len(urb.data)
        future.add_done_callback(lambda f: self._completed(urb, f))

    def _completed(self, urb: CmdSubmit, future: asyncio.Future[Completion]) -> None:
        entry = self._futures.get(urb.seqnum)
        if entry is None or entry[1] is not future:
            # Unlinked (RET_UNLINK answered it) or answered by _unlink already; the
            # seqnum may even be in use again by a newer URB, which is not ours.
            return
        self._forget(urb.seqnum)
        self._reply_from(urb, future)
        self._maybe_resume_reading()

    def _reply_from(self, urb: CmdSubmit, future: asyncio.Future[Completion]) -> None:
        if future.cancelled():
            result = Completion(status=ECONNRESET)
        elif (exc := future.exception()) is not None:
            log.error("%s: seqnum %d failed", self.peer, urb.seqnum, exc_info=exc)
            result = Completion(status=EPROTO)
        else:
            result = future.result()
        self._reply(urb, result)

    def _reply(self, urb: CmdSubmit, result: Completion, at_once: bool = False) -> None:
        """RET_SUBMIT for ``urb``; ``at_once``: the device finished it in submit()."""
        if self._closed:
            return
        if result.refused is not None:
            self._client_fault(f"{result.refused}: refused with -{status_name(result.status)}")
        reply = self.conn.reply_submit(
            urb, result.status, result.data, result.actual_length, result.start_frame,
            result.error_count, result.iso_packets)
        if self._recorder is not None or self._stats is not None:
            # what the client gets (the codec may have made a babble -EOVERFLOW, say),
            # not what the device answered
            self._observe(urb, reply, at_once)
        self._send_reply(reply)

    def _observe(self, urb: CmdSubmit, reply: SubmitReply, at_once: bool) -> None:
        """The capture's records and the metrics' counts of one RET_SUBMIT."""
        recorder = self._recorder
        if recorder is not None:
            if at_once and reply.iso_packets is None:
                recorder.exchanged(urb, reply.status, reply.data, reply.actual_length)
            else:
                if at_once:
                    recorder.submitted(urb)
                recorder.completed(urb, reply.status, reply.data, reply.actual_length,
                                   reply.iso_packets, reply.error_count, reply.start_frame)
        stats = self._stats
        if stats is not None:
            if reply.data:
                stats.bytes[self._key_in] += len(reply.data)
                self.bytes_out += len(reply.data)
            if reply.status:
                stats.errors[(self._key_in[0], status_name(reply.status))] += 1

    def _client_fault(self, what: str) -> None:
        """A URB the client should not have sent: its mistake, not the server's, so
        a WARNING at most once per 10 s per client address, with a count of the
        rest (a client must not be able to fill the log)."""
        self.access.log.warning(f"bad URB {self._client_key}", f"{self.peer}: {what}")

    def _send_reply(self, reply: SubmitReply) -> None:
        if reply.fault is not None:
            log.error("%s: %s", self.peer, reply.fault)
        batch = self._batch
        if batch is not None:
            batch.append(reply.header)  # the pieces joined once, with the whole batch
            if reply.data:
                batch.append(reply.data)
            if reply.iso_descriptors:
                batch.append(reply.iso_descriptors)
        elif self._transport is not None and not self._closed:
            if reply.data or reply.iso_descriptors:
                # (uvloop sends the pieces with one writev: no copy of the data)
                self._transport.writelines((reply.header, reply.data, reply.iso_descriptors))
            else:
                self._transport.write(reply.header)

    def _unlink(self, cmd: CmdUnlink) -> None:
        pending = self._forget(cmd.unlink_seqnum)
        if pending is None:
            if self.conn.hold_unlink(cmd):
                # its URB has not come yet: the answer waits for it (hold_unlink),
                # EARLY_UNLINK_HOLD at most, counted for each UNLINK from its own coming
                loop = asyncio.get_running_loop()
                self._held_until[cmd.unlink_seqnum] = loop.time() + EARLY_UNLINK_HOLD
                if self._release_timer is None:
                    self._release_timer = loop.call_later(EARLY_UNLINK_HOLD,
                                                          self._release_unlinks)
                return
            # Already answered, or never seen: usbip-host answers 0 (stub_rx.c).
            status = 0
        elif pending[1].done():
            # Finished, but its done-callback has not run yet: usbip-host would have
            # its RET_SUBMIT queued already, and sends that before this RET_UNLINK(0)
            # (stub_tx.c sends RET_SUBMITs first).
            self._reply_from(*pending)
            status = 0
        else:
            pending[1].cancel()
            status = ECONNRESET
            if self._recorder is not None:  # (usbmon shows an unlinked URB completed so)
                self._recorder.completed(pending[0], ECONNRESET, b"", 0)
            if self._stats is not None:
                self._stats.errors[(self._key_in[0], status_name(ECONNRESET))] += 1
        self._write(self.conn.reply_unlink(cmd, status))
        self._maybe_resume_reading()

    def _release_unlinks(self) -> None:
        """UNLINKs held for URBs that did not come in time: answered 0, as for URBs
        done. The timer then waits for the next one's time."""
        self._release_timer = None
        loop = asyncio.get_running_loop()
        now = loop.time()
        held = self._held_until
        for target in [t for t, until in held.items() if until <= now]:
            del held[target]
            replies = self.conn.release_unlink(target)
            if replies:
                self._write(replies)
        if held and self.conn.holding:
            self._release_timer = loop.call_later(max(0.0, min(held.values()) - now),
                                                  self._release_unlinks)
        else:
            held.clear()

    def _forget(self, seqnum: int) -> tuple[CmdSubmit, asyncio.Future[Completion]] | None:
        entry = self._futures.pop(seqnum, None)
        if entry is not None:
            self._pending_out -= len(entry[0].data)
        return entry

    # --- transport ---------------------------------------------------------------

    def _write(self, data: bytes) -> None:
        if self._batch is not None:
            self._batch.append(data)
        elif self._transport is not None and not self._closed:
            self._transport.write(data)

    def _flush(self) -> None:
        batch = self._batch
        if batch:
            self._batch = []
            if self._transport is not None and not self._closed:
                # uvloop sends the pieces with one writev; asyncio joins them first;
                # the TLS transport packs them into as few records as it can
                self._transport.writelines(batch)

    def _close(self) -> None:
        self._flush()  # the last replies go out before the FIN
        self._closed = True
        if self._transport is not None:
            self._transport.close()
            if self._close_timer is None and self._transport.get_write_buffer_size():
                # A client that never reads its last replies would hold the socket
                # (and escape every limit) for ever.
                self._close_timer = asyncio.get_running_loop().call_later(
                    CLOSE_TIMEOUT, self._transport.abort)

    def _abort(self) -> None:
        self._closed = True
        if self._transport is not None:
            self._transport.abort()

    def close(self) -> None:
        """Drop this client (server shutdown)."""
        self._abort()
