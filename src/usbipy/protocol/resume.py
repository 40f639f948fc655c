"""The resumable stream under USB/IP, sans-IO: a connection that outlives its TCP
connection.

Each direction is a byte stream counted from its first byte. The sender keeps
what it sent until the peer acknowledges it (a cumulative count, as TCP's);
after a reconnect each side says how much of the other's stream it has
(OP_REQ_RESUME / OP_REP_RESUME), and each sends the rest again. The USB/IP
codec above, the server's devices and the kernel's vhci-hcd see one unbroken
stream; this layer never parses a URB.

On the wire, after an OP_REP_IMPORT that granted it, and after OP_REP_RESUME(OK),
both ways carry frames::

    frame := kind u8 | length u32 | offset u64 | payload (length bytes, DATA only)

    DATA 'D'  payload; its first byte is byte ``offset`` of the sender's stream
    ACK  'A'  length 0; the receiver has ``offset`` bytes of the sender's stream
    FIN  'F'  length 0; the sender is done, after ``offset`` bytes: the attachment
              ends now (a detach), not after a resume window (a lost network)

A DATA frame's offset lets the receiver drop bytes it has already (a resent
frame that overlaps), and refuse a gap (bytes lost) rather than deliver a
corrupted stream: :class:`BadFrame`.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from struct import Struct

from .errors import BadFrame

FRAME = Struct("!BIQ")
_HEAD = FRAME.size
_pack, _unpack, _unpack_from = FRAME.pack, FRAME.unpack, FRAME.unpack_from
DATA, ACK, FIN = 0x44, 0x41, 0x46
_KIND_NAMES = {DATA: "DATA", ACK: "ACK", FIN: "FIN"}
#: A DATA frame carries at most this much (a sender splits); more is refused.
MAX_FRAME = 1 << 20
#: The receiver acknowledges at least every this many bytes, with the data it sends
#: anyway when it can (and when idle: the I/O layers send :meth:`ResumableStream.ack`
#: on a timer). An ACK alone costs the sender a wake-up: not one per reply.
ACK_EVERY = 512 << 10

Bytes = bytes | bytearray | memoryview


class ResumableStream:
    """One end of a resumable stream: frames out, payload in, and what is kept
    for a resend. The same for the client and the server."""

    def __init__(self) -> None:
        #: Bytes of our stream framed so far, and how many of them the peer has.
        self.sent = 0
        self.acked = 0
        #: Bytes of the peer's stream delivered, and the count our last ACK said.
        self.received = 0
        self._ack_said = 0
        #: The peer said FIN: it is done.
        self.finished = False
        #: Our bytes [acked, sent), as the frames they were sent in: each frame's
        #: offset and payload pieces (the first frame's bytes before ``acked`` are
        #: acked already). Whole frames: an ACK drops a reply batch at once.
        self._kept: deque[tuple[int, tuple[bytes | memoryview, ...]]] = deque()
        #: A frame header cut by a read, and the payload bytes of the current DATA
        #: frame still to come, of which the first _skip are ones we have already.
        self._partial = bytearray()
        self._left = 0
        self._skip = 0
        #: A bad frame breaks the stream for good (as the codec's ERROR): what came
        #: with it is not delivered, and no count after it can be trusted.
        self._error: BadFrame | None = None

    @property
    def unacked(self) -> int:
        """Bytes sent and kept until the peer has them: this end's buffer."""
        return self.sent - self.acked

    # --- sending ------------------------------------------------------------------

    def send(self, pieces: Iterable[Bytes]) -> list[bytes | memoryview]:
        """Frame ``pieces`` (consecutive bytes of our stream) and keep them; returns
        what to write, headers and payload (the payload is not copied when it is
        bytes; other buffers are copied once, since they may be reused)."""
        kept = tuple(pieces)
        total = 0
        for piece in kept:
            if type(piece) is not bytes:
                break
            total += len(piece)
        else:  # the usual case: bytes, one frame's worth; no copy, one header
            if 0 < total <= MAX_FRAME:
                at = self.sent
                # (every piece is bytes, checked above: no cast() call on this path)
                self._kept.append((at, kept))  # type: ignore[arg-type]
                self.sent = at + total
                return [_pack(DATA, total, at), *kept]  # type: ignore[list-item]
        out: list[bytes | memoryview] = []
        frame: list[bytes | memoryview] = []
        size = 0
        for piece in kept:
            if not piece:
                continue
            data = piece if type(piece) is bytes else bytes(piece)
            view = memoryview(data) if len(data) > MAX_FRAME - size else None
            at = 0
            while at < len(data):
                take = min(len(data) - at, MAX_FRAME - size)
                chunk = data if view is None else view[at:at + take]
                frame.append(chunk)
                size += take
                at += take
                if size == MAX_FRAME:
                    self._frame(frame, size, out)
                    frame, size = [], 0
        if size:
            self._frame(frame, size, out)
        return out

    def _frame(self, pieces: list[bytes | memoryview], size: int,
               out: list[bytes | memoryview]) -> None:
        out.append(FRAME.pack(DATA, size, self.sent))
        out.extend(pieces)
        self._kept.append((self.sent, tuple(pieces)))
        self.sent += size

    def ack(self) -> bytes:
        """An ACK of everything received."""
        self._ack_said = self.received
        return FRAME.pack(ACK, 0, self.received)

    @property
    def ack_due(self) -> bool:
        """Whether enough arrived since the last ACK to send one now."""
        return self.received - self._ack_said >= ACK_EVERY

    @property
    def ack_pending(self) -> bool:
        """Whether anything arrived since the last ACK."""
        return self.received != self._ack_said

    def fin(self) -> bytes:
        return FRAME.pack(FIN, 0, self.sent)

    def resend_from(self, peer_has: int) -> list[bytes | memoryview]:
        """After a reconnect: the peer has ``peer_has`` bytes of our stream; the frames
        of the rest. BadFrame when that count cannot be (bytes it acknowledged,
        or never sent)."""
        if not self.acked <= peer_has <= self.sent:
            raise BadFrame(f"the peer has {peer_has} bytes of our stream, but "
                           + (f"acknowledged {self.acked} before" if peer_has < self.acked
                              else f"only {self.sent} were sent"))
        self._drop_to(peer_has)
        out: list[bytes | memoryview] = []
        for start, pieces in self._kept:
            skip = max(0, peer_has - start)  # (the first frame's bytes the peer has)
            chunks: list[bytes | memoryview] = []
            for piece in pieces:
                if skip >= len(piece):
                    skip -= len(piece)
                    continue
                chunks.append(memoryview(piece)[skip:] if skip else piece)
                skip = 0
            size = sum(len(c) for c in chunks)
            out.append(FRAME.pack(DATA, size, max(start, peer_has)))
            out.extend(chunks)
        return out

    def _drop_to(self, count: int) -> None:
        """Forget our frames that end at or before ``count``: the peer has them."""
        kept = self._kept
        while kept:
            end = kept[1][0] if len(kept) > 1 else self.sent
            if end > count:
                break
            kept.popleft()
        self.acked = count

    # --- receiving ----------------------------------------------------------------

    def restart(self) -> None:
        """A new connection: a frame the old one cut is forgotten (its sender sends
        from our count again)."""
        self._partial.clear()
        self._left = self._skip = 0
        self._ack_said = -1  # (say where we are on the new connection soon)

    def receive(self, data: Bytes) -> list[memoryview]:
        """The payload in ``data``, in order, as views of it (use them before
        ``data`` is reused); ACKs and FIN are taken in. BadFrame for a frame that
        cannot be."""
        if self._error is not None:
            raise self._error
        received = self.received
        try:
            return self._receive(data)
        except BadFrame as exc:
            self.received = received  # (nothing of this call was delivered)
            self._error = exc
            raise

    def _receive(self, data: Bytes) -> list[memoryview]:
        out: list[memoryview] = []
        view = memoryview(data)
        end = len(view)
        pos = 0
        partial = self._partial
        while pos < end:
            if self._left:
                take = min(self._left, end - pos)
                self._left -= take
                skip = min(self._skip, take)
                self._skip -= skip
                if take > skip:
                    out.append(view[pos + skip:pos + take])
                    self.received += take - skip
                pos += take
                continue
            if partial or end - pos < _HEAD:
                need = _HEAD - len(partial)
                partial += view[pos:pos + need]
                pos += min(need, end - pos)
                if len(partial) < _HEAD:
                    break
                kind, length, offset = _unpack(partial)
                partial.clear()
            else:
                kind, length, offset = _unpack_from(view, pos)
                pos += _HEAD
                if (kind == DATA and offset == self.received and 0 < length <= end - pos
                        and length <= MAX_FRAME and not self.finished):
                    # The usual frame: whole in this read, nothing of it had before.
                    out.append(view[pos:pos + length])
                    self.received += length
                    pos += length
                    continue
            self._header(kind, length, offset)
        return out

    def _header(self, kind: int, length: int, offset: int) -> None:
        if self.finished:
            raise BadFrame(f"a {_KIND_NAMES.get(kind, 'frame')} after FIN")
        if kind == DATA:
            if not 0 < length <= MAX_FRAME:
                raise BadFrame(f"a DATA frame of {length} bytes (1 to {MAX_FRAME})")
            if offset > self.received:
                raise BadFrame(f"DATA at byte {offset}, but only {self.received} came: "
                               f"{offset - self.received} bytes were lost")
            self._left = length
            self._skip = self.received - offset  # (a resent frame: what we have already)
            return
        if length:
            raise BadFrame(f"a {_KIND_NAMES.get(kind, 'frame')} frame with {length} bytes "
                           "of payload")
        if kind == ACK:
            if offset > self.sent:
                raise BadFrame(f"an ACK of {offset} bytes, but only {self.sent} were sent")
            if offset > self.acked:  # (an older ACK, resent, says nothing new)
                self._drop_to(offset)
            return
        if kind == FIN:
            if offset != self.received:
                raise BadFrame(f"FIN after {offset} bytes, but {self.received} came")
            self.finished = True
            return
        raise BadFrame(f"unknown frame kind {kind:#04x}")
