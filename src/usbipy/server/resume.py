"""Resumable attachments: a connection whose TCP connection may be lost and
replaced, under one :class:`~.connection.UsbipServerProtocol`.

A :class:`Resumable` is both sides of an adapter. To the connection's
protocol it is its transport, one that lives as long as the attachment; to
each TCP (or TLS) transport in turn it is the protocol, speaking the framed
stream of :mod:`usbipy.protocol.resume`. When the TCP connection is lost
without the client's FIN, the attachment waits ``resume_window`` seconds: the
device stays held, and URBs in flight complete into the stream's buffer. A
client that comes back with the token (OP_REQ_RESUME) on a new connection gets
what it missed, and the protocol never knew.

Who may resume: the token is 128 random bits, issued at the import. Over TLS
it is bound to the client certificate's SHA-256 fingerprint and the access
policy is asked again; in plaintext only the same address may resume.

What it may hold: ``resume_buffer`` bytes per attachment and ``resume_buffers``
for all. While connected, reaching the bound stops the protocol's writes
until the client acknowledges (flow control); while away, it ends the
attachment, with a log line that says so.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import secrets
from collections import deque
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

from ..escape import printable
from ..protocol import OpStatus, RemoteProtocolError
from ..protocol.resume import ResumableStream
from ..tls import TlsSession

if TYPE_CHECKING:
    from .connection import UsbipServerProtocol

log = logging.getLogger("usbipy.server")

#: The metrics' histogram of how long resumed connections were down (seconds).
DOWN_BUCKETS = (1.0, 5.0, 15.0, 30.0, 60.0, 120.0, 300.0, float("inf"))

#: Payload bytes held for a protocol that paused its reading, before the TCP
#: connection is paused too (the ACKs and the FIN behind them are read meanwhile:
#: pausing the connection at once would hold the ACKs that let the protocol go on).
HOLD = 1 << 20
#: Seconds a closing attachment has for its last bytes (a client that sent FIN
#: and reads no more must not hold the device).
CLOSE_TIMEOUT = 30.0

#: Seconds between ACKs sent for what came since the last one (a trickle never
#: reaches ACK_EVERY, and the client's buffer would keep it).
ACK_INTERVAL = 0.5


def fingerprint(tls: TlsSession | None) -> bytes | None:
    """The SHA-256 of the client's certificate, which a token is bound to."""
    if tls is None or tls.certificate is None:
        return None
    return hashlib.sha256(tls.certificate).digest()


class Resumables:
    """The server's resumable attachments, by token; their buffers in total."""

    def __init__(self) -> None:
        self._by_token: dict[bytes, Resumable] = {}
        #: Counters for the metrics: resumptions, how long each was down (a
        #: histogram: counts at or below each of DOWN_BUCKETS, and the sum), and
        #: attachments whose window passed.
        self.resumed = 0
        self.expired = 0
        self.down_buckets = [0] * len(DOWN_BUCKETS)
        self.down_sum = 0.0

    def __len__(self) -> int:
        return len(self._by_token)

    @property
    def buffered(self) -> int:
        return sum(r.stream.unacked for r in self._by_token.values())

    @property
    def waiting(self) -> int:
        """Attachments whose client is away now."""
        return sum(not r.connected for r in self._by_token.values())

    def count_resumption(self, down: float) -> None:
        self.resumed += 1
        self.down_sum += down
        for i, bound in enumerate(DOWN_BUCKETS):
            if down <= bound:
                self.down_buckets[i] += 1

    def new_token(self, resumable: Resumable) -> bytes:
        token = secrets.token_bytes(16)
        self._by_token[token] = resumable
        return token

    def get(self, token: bytes) -> Resumable | None:
        return self._by_token.get(token)

    def forget(self, token: bytes) -> None:
        self._by_token.pop(token, None)


class Resumable(asyncio.Protocol):
    """One resumable attachment: the protocol's transport, each TCP transport's
    protocol."""

    def __init__(self, protocol: UsbipServerProtocol, transport: asyncio.Transport,
                 resumables: Resumables, *, window: float, buffer: int, buffers: int,
                 address: str | None, tls: TlsSession | None,
                 reading_paused: bool = False) -> None:
        self.protocol = protocol
        self.stream = ResumableStream()
        self._resumables = resumables
        self.window = window
        self._buffer = buffer
        self._buffers = buffers
        #: Who may resume: the address (plaintext) or the certificate (TLS).
        self.address = address
        self.fingerprint = fingerprint(tls)
        self.token = resumables.new_token(self)
        self._raw: asyncio.Transport | None = None
        self._raw_paused = False  # the TCP transport asked us to stop writing
        #: Payload for the protocol while its reading is paused; whether the TCP
        #: transport's reading is paused (only for a full hold).
        self._held: deque[memoryview] = deque()
        self._held_size = 0
        self._raw_reading_paused = False
        self._close_timer: asyncio.TimerHandle | None = None
        self._full = False  # our buffer is at its bound
        self._protocol_paused = False
        self._reading_paused = reading_paused
        self._closing = False
        self._ended = False
        #: When the TCP connection was lost (loop time), while it is.
        self.down_since: float | None = None
        #: The bytes it kept when the connection was lost.
        self._at_loss = 0
        self._window_timer: asyncio.TimerHandle | None = None
        self._ack_timer: asyncio.TimerHandle | None = None
        self._extra: dict[str, Any] = {}
        self._attach(transport)

    # --- the TCP transport, replaced on each resume ------------------------------

    def _attach(self, transport: asyncio.Transport) -> None:
        self._raw = transport
        self._raw_paused = False
        self._raw_reading_paused = False
        self._extra = {name: transport.get_extra_info(name)
                       for name in ("socket", "peername", "sockname", "ssl_object")}
        transport.set_protocol(self)
        if self._held_size > HOLD:
            self._raw_reading_paused = True
            transport.pause_reading()
        else:
            # (the first one comes paused by the import's OP phase: from now on the
            # protocol's pauses hold payload here, and the connection is read on)
            transport.resume_reading()
        loop = asyncio.get_running_loop()
        if self._ack_timer is None:
            self._ack_timer = loop.call_later(ACK_INTERVAL, self._tick)

    @property
    def connected(self) -> bool:
        return self._raw is not None

    def can_resend(self, peer_has: int) -> bool:
        """Whether a client may have ``peer_has`` bytes of our stream."""
        return self.stream.acked <= peer_has <= self.stream.sent

    def resume(self, transport: asyncio.Transport, peer_has: int, leftover: bytes,
               by: str) -> None:
        """The client (``by``, in the log's words) is back on ``transport``, with
        ``peer_has`` bytes of our stream (checked by :meth:`can_resend`); the
        reply is sent already."""
        frames = self.stream.resend_from(peer_has)
        old = self._raw
        if old is not None:  # (the old connection looked alive to us: a NAT rebinding)
            self._raw = None
            old.set_protocol(asyncio.Protocol())  # (its end is not ours to hear)
            old.abort()
        down = (asyncio.get_running_loop().time() - self.down_since
                if self.down_since is not None else 0.0)
        self.down_since = None
        if self._window_timer is not None:
            self._window_timer.cancel()
            self._window_timer = None
        self._resumables.count_resumption(down)
        self.stream.restart()
        self._attach(transport)
        self.protocol.transport_replaced()
        if frames:
            transport.writelines(frames)
        transport.write(self.stream.ack())
        log.info("%s: resumed %s of %s after %.1f s down (%d bytes sent again)", by,
                 printable(self.protocol.device.busid) if self.protocol.device else "?",
                 self.protocol.peer, down, self.stream.sent - peer_has)
        self._check_pause()
        if leftover:
            self.data_received(leftover)

    # --- asyncio.Protocol, for the TCP transport ----------------------------------

    def data_received(self, data: bytes) -> None:
        stream = self.stream
        acked = stream.acked
        try:
            payload = stream.receive(data)
        except RemoteProtocolError as exc:
            log.warning("%s: closing the connection: %s: %s", self.protocol.peer,
                        type(exc).__name__, printable(str(exc)))
            self.abort()
            return
        if self._reading_paused or self._held:
            for piece in payload:
                self._held.append(piece)
                self._held_size += len(piece)
            if self._held_size > HOLD and self._raw is not None and (
                    not self._raw_reading_paused):
                self._raw_reading_paused = True
                self._raw.pause_reading()
        elif payload:
            # All of one read at once, as a plain connection's read: one round of
            # replies, in one write (a write per frame would be a system call each).
            self.protocol.pieces_received(payload)
            if self._ended:
                return
        if stream.ack_due and self._raw is not None:
            self._raw.write(stream.ack())
        if stream.acked != acked:  # (an ACK: what it frees may let the protocol go on)
            self._check_pause()
        if stream.finished and not self._ended:
            # The client detached: the attachment ends now, not after a window.
            log.debug("%s: the client ended the resumable stream", self.protocol.peer)
            self.close()

    def eof_received(self) -> bool | None:
        return None  # (a FIN without the stream's FIN: a loss, see connection_lost)

    def connection_lost(self, exc: Exception | None) -> None:
        self._raw = None
        self._extra = {}
        if self._ended:
            return
        if self._closing:
            self._end(exc)
            return
        # Lost without the client's FIN: keep the attachment for the window.
        loop = asyncio.get_running_loop()
        self.down_since = loop.time()
        why = (getattr(exc, "strerror", None) or str(exc)) if exc is not None else "closed"
        log.warning("%s: connection lost (%s); %s kept for %g s for the client to resume",
                    self.protocol.peer, printable(why),
                    printable(self.protocol.device.busid) if self.protocol.device else "?",
                    self.window)
        self._window_timer = loop.call_later(self.window, self._expired)
        # What it holds already was let in while connected (a reply larger than the
        # bound, the replies of URBs under way when it paused): only growth counts.
        self._at_loss = self.stream.unacked
        self._check_bounds()

    def pause_writing(self) -> None:
        self._raw_paused = True
        self._check_pause()

    def resume_writing(self) -> None:
        self._raw_paused = False
        self._check_pause()

    def _expired(self) -> None:
        self._window_timer = None
        self._resumables.expired += 1
        log.warning("%s: not resumed within %g s (resume_window): %s released",
                    self.protocol.peer, self.window,
                    printable(self.protocol.device.busid) if self.protocol.device else "?")
        self._end(TimeoutError("not resumed within the resume window"))

    def _tick(self) -> None:
        self._ack_timer = None
        if self._ended:
            return
        if self._raw is not None and self.stream.ack_pending:
            self._raw.write(self.stream.ack())
        self._ack_timer = asyncio.get_running_loop().call_later(ACK_INTERVAL, self._tick)

    # --- bounds and flow control ---------------------------------------------------

    def _check_bounds(self) -> bool:
        """While away: the buffer past a bound ends the attachment. True if it did."""
        if self._raw is not None or self._ended:
            return False
        unacked = self.stream.unacked
        if unacked <= self._at_loss:
            return False
        if unacked > max(self._buffer, self._at_loss):
            why = f"its resume buffer is full ({unacked} bytes, resume_buffer)"
        elif self._resumables.buffered > self._buffers:
            why = (f"the resume buffers are full ({self._resumables.buffered} bytes, "
                   "resume_buffers)")
        else:
            return False
        log.warning("%s: %s while the client was away: %s released", self.protocol.peer, why,
                    printable(self.protocol.device.busid) if self.protocol.device else "?")
        self._end(MemoryError(why))
        return True

    def _check_pause(self) -> None:
        """While connected: stop the protocol's writes at half the bound, go on at a
        quarter. (Half: the replies of URBs in flight still come after the pause, and a
        loss then must find them within the bound, not end the attachment.)"""
        unacked = self.stream.unacked
        if unacked > self._buffer // 2 or (unacked > self._buffer // 4
                                           and self._resumables.buffered > self._buffers):
            self._full = True
        elif unacked <= self._buffer // 4:
            self._full = False
        paused = self._full or self._raw_paused or self._raw is None
        if paused != self._protocol_paused and not self._ended:
            self._protocol_paused = paused
            if paused:
                self.protocol.pause_writing()
            else:
                self.protocol.resume_writing()

    # --- asyncio.Transport, for the protocol ----------------------------------------

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.writelines((data,))

    def writelines(self, pieces: Iterable[bytes | bytearray | memoryview]) -> None:
        if self._ended or self._closing:
            return
        frames = self.stream.send(pieces)
        if self._raw is not None:
            self._raw.writelines(frames)
            if self._full or self.stream.unacked > self._buffer // 4:
                self._check_pause()
        elif not self._check_bounds():
            self._check_pause()

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        if self._raw is not None and name not in self._extra:
            return self._raw.get_extra_info(name, default)
        value = self._extra.get(name)
        return default if value is None else value

    def get_write_buffer_size(self) -> int:
        return self._raw.get_write_buffer_size() if self._raw is not None else self.stream.unacked

    def is_closing(self) -> bool:
        return self._closing or self._ended

    def pause_reading(self) -> None:
        # (the TCP connection is read on: its ACKs may be what the protocol waits for;
        # the payload is held, up to HOLD)
        self._reading_paused = True

    def resume_reading(self) -> None:
        self._reading_paused = False
        held = self._held
        while held and not self._reading_paused and not self._ended:
            piece = held.popleft()
            self._held_size -= len(piece)
            self.protocol.data_received(piece)  # type: ignore[arg-type]
        if (self._raw_reading_paused and self._held_size <= HOLD // 2
                and self._raw is not None):
            self._raw_reading_paused = False
            self._raw.resume_reading()

    def is_reading(self) -> bool:
        return not self._reading_paused

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        raise NotImplementedError("a resumable attachment keeps its protocol")

    def get_protocol(self) -> asyncio.BaseProtocol:
        return self.protocol

    def close(self) -> None:
        """The protocol is done (a detach, a device gone): FIN, then close."""
        if self._closing or self._ended:
            return
        raw = self._closing_connection()
        if raw is None:
            return
        raw.write(self.stream.fin())
        raw.close()  # (connection_lost ends it)
        self._close_timer = asyncio.get_running_loop().call_later(CLOSE_TIMEOUT, self.abort)

    def drop(self) -> None:
        """The TCP connection is dead (seen by the protocol's watch): the window
        starts, as for a loss the transport reports."""
        raw = self._raw
        if raw is not None and not self._closing and not self._ended:
            raw.abort()  # (connection_lost: away)

    def abort(self) -> None:
        """A protocol error, or the server's end: no resume."""
        if self._ended:
            return
        raw = self._closing_connection()
        if raw is not None:
            raw.abort()

    def _closing_connection(self) -> asyncio.Transport | None:
        """Ending from now on, with no resume: the TCP connection to end, or None
        when the client is away (and then it has ended already)."""
        self._closing = True
        raw = self._raw
        if raw is None:
            self._end(None)
        return raw

    def _end(self, exc: Exception | None) -> None:
        if self._ended:
            return
        self._ended = True
        self._resumables.forget(self.token)
        for timer in (self._window_timer, self._ack_timer, self._close_timer):
            if timer is not None:
                timer.cancel()
        self._window_timer = self._ack_timer = self._close_timer = None
        self._held.clear()
        self._held_size = 0
        # what it kept goes now, not when a cycle collection finds this and its protocol
        self.stream = ResumableStream()
        raw, self._raw = self._raw, None
        if raw is not None:
            raw.abort()
        self.protocol.connection_lost(exc)


def may_resume(resumable: Resumable, address: str | None, tls: TlsSession | None,
               allowed: Callable[[], bool]) -> tuple[OpStatus, str | None]:
    """Whether a client at ``address`` with ``tls`` may take ``resumable`` over:
    (OK, None) or (the status to answer, the reason to log)."""
    if resumable.fingerprint is not None:
        if fingerprint(tls) != resumable.fingerprint:
            return OpStatus.NODEV, "the token was issued to another certificate"
    elif tls is not None:
        return OpStatus.NODEV, "the token was issued to a plaintext connection"
    elif address != resumable.address:
        return OpStatus.NODEV, (f"the token was issued to {resumable.address}: in plaintext "
                                "only the same address may resume")
    if not allowed():
        return OpStatus.NODEV, "the access policy now refuses this client the device"
    return OpStatus.OK, None
