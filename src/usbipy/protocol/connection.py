"""Sans-IO USB/IP connections: bytes in, typed messages out; messages in, bytes out.

A connection goes through two phases. In the OP phase one request and one
reply are exchanged (a device list, or an import). After a successful import
the URB phase begins and lasts until the TCP connection ends. The moves are
the table in :mod:`.states`.

Use :meth:`receive_data` to feed bytes in any split (``b""`` means EOF),
:meth:`next_event` to take whole messages out, and :meth:`send` to encode.
The server answers URBs with :meth:`ServerConnection.reply_submit`, the fast
path that decides every byte of RET_SUBMIT from what the device returned.
No I/O happens here.
"""

from __future__ import annotations

import dataclasses
import struct
from collections.abc import Iterator
from enum import Enum, auto
from typing import Final

from . import wire
from .constants import (
    ECONNRESET,
    ENOMEM,
    EOVERFLOW,
    EPROTO,
    MAX_ISO_PACKETS,
    NON_ISO_PACKETS,
    USBIP_VERSION,
    Direction,
    OpCode,
    OpStatus,
    UrbCommand,
)
from .errors import (
    BadDevid,
    BadIsoDescriptors,
    BadLength,
    DuplicateSeqnum,
    LocalProtocolError,
    RemoteProtocolError,
    TooManyIsoPackets,
    UnexpectedMessage,
    UnknownCommand,
    UnsupportedVersion,
)
from .messages import (
    CmdSubmit,
    CmdUnlink,
    DeviceInfo,
    IsoPacket,
    Message,
    OpRepDevlist,
    OpRepImport,
    OpRepResume,
    OpReqDevlist,
    OpReqImport,
    OpReqResume,
    RetSubmit,
    RetUnlink,
    SubmitReply,
)
from .states import SENDER, Kind, Phase, Role, describe, next_phase


class _Sentinel(Enum):
    NEED_DATA = auto()
    EOF = auto()


#: next_event(): no whole message is buffered yet.
NEED_DATA: Final = _Sentinel.NEED_DATA
#: next_event(): the peer closed and every buffered message was taken.
EOF: Final = _Sentinel.EOF

Event = Message | _Sentinel


#: Default cap on any one transfer buffer (OUT payload, IN reply): 16 MiB.
#: Linux's usb-storage never moves more than a few hundred KiB per URB.
DEFAULT_MAX_TRANSFER = 16 * 1024 * 1024
#: A device list larger than this is hostile (the kernel's devlist is one record per bus port).
MAX_DEVLIST_DEVICES = 4096
#: UNLINKs a server holds for URBs that have not come yet (hold_unlink).
MAX_EARLY_UNLINKS = 64
#: Compact the receive buffer once this many consumed bytes sit in front of it.
_COMPACT_AT = 1 << 16

# The hot path's names, bound once: a module global is cheaper to read than a
# module's attribute, and a URB reads several.
_CMD_SUBMIT_UNPACK = wire.CMD_SUBMIT.unpack_from
_RET_SUBMIT_UNPACK = wire.RET_SUBMIT.unpack_from
_ISO_UNPACK = wire.ISO_PACKET.unpack_from
_ISO_SIZE = wire.ISO_PACKET_SIZE
#: command, seqnum, devid, direction, ep: the five fields every URB header starts with
_URB_BASIC_UNPACK = wire.URB_BASIC.unpack_from
_HDR = wire.URB_HEADER_SIZE
_CMD_SUBMIT = wire.CMD_SUBMIT_CODE
_CMD_UNLINK = wire.CMD_UNLINK_CODE
_RET_SUBMIT = wire.RET_SUBMIT_CODE
_RET_UNLINK = wire.RET_UNLINK_CODE
_IN = Direction.IN
_OUT = Direction.OUT
_URB_PHASE = Phase.URB
_RET_SUBMIT_PACK = wire.RET_SUBMIT.pack
_URB_KINDS = {int(c): Kind[c.name] for c in UrbCommand}
_OP_KINDS = {OpCode.REQ_DEVLIST: Kind.OP_REQ_DEVLIST, OpCode.REQ_IMPORT: Kind.OP_REQ_IMPORT,
             OpCode.REP_DEVLIST: Kind.OP_REP_DEVLIST, OpCode.REQ_RESUME: Kind.OP_REQ_RESUME}
#: The replies whose kind depends on their status: (OK, error).
_REPLY_KINDS = {OpCode.REP_IMPORT: (Kind.OP_REP_IMPORT_OK, Kind.OP_REP_IMPORT_ERROR),
                OpCode.REP_RESUME: (Kind.OP_REP_RESUME_OK, Kind.OP_REP_RESUME_ERROR)}


def _kind_of(message: Message) -> Kind:
    if isinstance(message, OpRepImport | OpRepResume):
        ok, error = _REPLY_KINDS[OpCode.REP_IMPORT if isinstance(message, OpRepImport)
                                 else OpCode.REP_RESUME]
        return ok if message.status == OpStatus.OK else error
    return _MESSAGE_KINDS[type(message)]


_MESSAGE_KINDS: dict[type, Kind] = {
    OpReqDevlist: Kind.OP_REQ_DEVLIST, OpRepDevlist: Kind.OP_REP_DEVLIST,
    OpReqImport: Kind.OP_REQ_IMPORT, CmdSubmit: Kind.CMD_SUBMIT, CmdUnlink: Kind.CMD_UNLINK,
    OpReqResume: Kind.OP_REQ_RESUME,
    RetSubmit: Kind.RET_SUBMIT, RetUnlink: Kind.RET_UNLINK,
}


def _failed(requested: list[IsoPacket]) -> list[IsoPacket]:
    """The URB's own iso packets, each failed with -EPROTO: the answer to a device
    whose iso reply cannot be sent (the client expects as many as it sent)."""
    return [IsoPacket(p.offset, p.length, 0, EPROTO) for p in requested]


class _Connection:
    """The receive buffer, the phase and the sticky error state shared by both roles."""

    role: Role

    def __init__(self, *, max_transfer_length: int = DEFAULT_MAX_TRANSFER) -> None:
        self.max_transfer_length = max_transfer_length
        self.phase = Phase.OP
        #: What is received and not yet parsed starts at _pos. A bytes chunk that
        #: arrives when nothing is pending is parsed in place, without a copy (an
        #: OUT payload is then copied once, into its message); a partial message
        #: is kept in a bytearray that the next chunks are appended to.
        self._buf: bytes | bytearray = bytearray()
        self._pos = 0
        self._eof = False
        self._error: RemoteProtocolError | None = None

    # --- the state machine (states.py) --------------------------------------------

    def _phase_after(self, kind: Kind) -> Phase:
        """The phase after receiving ``kind``; UnexpectedMessage for an illegal move."""
        after = next_phase(self.role, self.phase, kind)
        if after is None or SENDER[kind] is self.role:
            raise UnexpectedMessage(describe(self.role, self.phase, kind, sending=False))
        return after

    def _received(self, kind: Kind) -> None:
        """Move on a message received (and consumed)."""
        self.phase = self._phase_after(kind)

    def _sending(self, kind: Kind) -> None:
        """Move on a message sent; an illegal one breaks the connection for good."""
        if self.phase is Phase.ERROR:
            raise LocalProtocolError("the connection is broken by an earlier protocol error")
        after = next_phase(self.role, self.phase, kind)
        if after is None or SENDER[kind] is not self.role:
            self._local_error(describe(self.role, self.phase, kind, sending=True))
        self.phase = after  # type: ignore[assignment]

    def _local_error(self, text: str) -> None:
        self.phase = Phase.ERROR
        raise LocalProtocolError(text)

    @property
    def buffered(self) -> int:
        """Bytes received and not yet turned into messages."""
        return len(self._buf) - self._pos

    def take_buffered(self) -> bytes:
        """The bytes received and not parsed, taken out: what follows a message that
        gives the connection to another layer (OP_REQ_RESUME's frames)."""
        data = bytes(self._buf[self._pos:])
        self._buf = bytearray()
        self._pos = 0
        return data

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        """Feed received bytes; ``b""`` means the peer closed its side."""
        if not data:
            self._eof = True
            return
        if self._eof:
            raise LocalProtocolError("data received after EOF")
        buf = self._buf
        if self._pos == len(buf):  # everything before was parsed
            # (a view, as the resumable stream's payload, is copied once either way:
            # as bytes, its messages are sliced out the cheap way, as a read's are)
            self._buf = data if type(data) is bytes else bytes(data)
            self._pos = 0
            return
        if type(buf) is bytes:  # a partial message left in a chunk: keep only that
            buf = self._buf = bytearray(memoryview(buf)[self._pos:])
            self._pos = 0
        elif self._pos >= _COMPACT_AT:
            assert isinstance(buf, bytearray)
            del buf[: self._pos]
            self._pos = 0
        assert isinstance(buf, bytearray)
        buf += data

    def next_event(self) -> Event:
        """The next whole message, or NEED_DATA, or EOF.

        Raises a RemoteProtocolError subclass when the peer broke the protocol;
        the connection stays broken afterwards.
        """
        if self._error is not None:
            raise self._error
        try:
            event = self._parse()
        except RemoteProtocolError as exc:
            self.phase = Phase.ERROR
            self._error = exc
            raise
        if event is NEED_DATA and self._eof:
            if self.buffered:
                error = BadLength(f"connection closed inside a message ({self.buffered} bytes)")
                self.phase = Phase.ERROR
                self._error = error
                raise error
            return EOF
        return event

    def events(self) -> Iterator[Message]:
        """Every whole message buffered now."""
        while True:
            if self.phase is Phase.URB and self._error is None:
                # The hot path: URBs back to back, without the per-message dispatch.
                parse = self._parse_urb
                try:
                    # (the length test spares a call that would only say NEED_DATA)
                    while len(self._buf) - self._pos >= _HDR and (
                            urb := parse()) is not NEED_DATA:
                        yield urb  # type: ignore[misc]
                except RemoteProtocolError as exc:
                    self.phase = Phase.ERROR
                    self._error = exc
                    raise
                if not self._eof:  # (the end of the stream is next_event's to judge)
                    return
            event = self.next_event()  # EOF, errors, and the OP phase
            if isinstance(event, _Sentinel):
                return
            yield event

    def _parse(self) -> Event:
        if self.phase is Phase.URB:
            return self._parse_urb()
        if not self.buffered:
            return NEED_DATA
        head = self._op_header()
        if head is None:
            return NEED_DATA
        return self._parse_op(*head)

    def _parse_op(self, op: OpCode, status: int) -> Event:
        """The OP message whose header (``op``, ``status``) is in front."""
        raise NotImplementedError

    def _parse_urb(self) -> Event:
        raise NotImplementedError

    def _copy(self, start: int, n: int) -> bytes:
        """``n`` buffered bytes at ``start``, copied once (the buffer is reused)."""
        buf = self._buf
        if type(buf) is bytes:  # a slice of bytes is one copy already, and cheaper
            return buf[start : start + n]
        with memoryview(buf) as view:
            return view[start : start + n].tobytes()

    def _op_header(self) -> tuple[OpCode, int] | None:
        """The OP header in front, moved past in the state machine; None if incomplete."""
        if self.buffered < wire.OP_HEADER.size:
            return None
        version, code, status = wire.OP_HEADER.unpack_from(self._buf, self._pos)
        if version == 0 and code in _URB_KINDS:
            # A URB header where an OP message belongs: its command's high half is
            # where the version would be. Name the message, not a "version 0x0000".
            raise UnexpectedMessage(describe(self.role, self.phase, _URB_KINDS[code],
                                             sending=False))
        if version != USBIP_VERSION:
            raise UnsupportedVersion(
                f"USB/IP version {version:#06x}, expected {USBIP_VERSION:#06x}"
            )
        try:
            op = OpCode(code)
        except ValueError:
            raise UnknownCommand(f"unknown OP code {code:#06x}") from None
        if op in _REPLY_KINDS:
            ok, error = _REPLY_KINDS[op]
            kind = ok if status == OpStatus.OK else error
        else:
            kind = _OP_KINDS[op]
        self._phase_after(kind)  # refused at its header, before the rest arrives
        return op, status

    def _iso_packets(
        self, offset: int, count: int, buffer_length: int
    ) -> list[IsoPacket]:
        """Decode and check ``count`` descriptors that must fit ``buffer_length``."""
        packets = []
        buf = self._buf
        for i in range(count):
            p_off, p_len, p_actual, p_status = _ISO_UNPACK(buf, offset + _ISO_SIZE * i)
            if p_off + p_len > buffer_length:
                raise BadIsoDescriptors(
                    f"iso packet {i}: offset {p_off} + length {p_len} is past the "
                    f"{buffer_length}-byte buffer"
                )
            if p_actual > p_len:
                raise BadIsoDescriptors(
                    f"iso packet {i}: actual_length {p_actual} is above its length {p_len}"
                )
            packets.append(IsoPacket(p_off, p_len, p_actual, p_status))
        return packets

    def _check_packets(self, number_of_packets: int) -> int:
        """How many iso descriptors follow: 0 for a non-iso URB."""
        if number_of_packets == NON_ISO_PACKETS:
            return 0
        if number_of_packets > MAX_ISO_PACKETS:
            raise TooManyIsoPackets(
                f"number_of_packets {number_of_packets} is above the limit of {MAX_ISO_PACKETS}"
            )
        return number_of_packets

    def _not_expected(self, command: int) -> RemoteProtocolError:
        kind = _URB_KINDS.get(command)
        if kind is None:
            return UnknownCommand(f"unknown URB command {command:#010x}")
        return UnexpectedMessage(describe(self.role, self.phase, kind, sending=False))


class ServerConnection(_Connection):
    """The server side: decodes requests, encodes replies.

    It keeps every submitted URB until it is answered, so a reply is framed
    from the URB it answers (direction, buffer size, iso layout) and a seqnum
    can never be in flight twice nor be answered twice.
    """

    role = Role.SERVER

    def __init__(self, *, max_transfer_length: int = DEFAULT_MAX_TRANSFER) -> None:
        super().__init__(max_transfer_length=max_transfer_length)
        #: The imported device's devid, once the import succeeded.
        self.devid: int | None = None
        #: seqnum -> the URB, from CMD_SUBMIT until its RET_SUBMIT (or a RET_UNLINK
        #: that cancelled it).
        self._in_flight: dict[int, CmdSubmit] = {}
        #: The newest seqnum a CMD_SUBMIT carried (serial number arithmetic, RFC 1982).
        self._newest: int | None = None
        #: UNLINKs that came before their URB's CMD_SUBMIT, by the URB's seqnum,
        #: oldest first: their answers wait for it (:meth:`hold_unlink`).
        self._held: dict[int, CmdUnlink] = {}

    @property
    def in_flight(self) -> int:
        """URBs received and not yet answered."""
        return len(self._in_flight)

    def send(self, message: OpRepDevlist | OpRepImport | OpRepResume | RetSubmit | RetUnlink
             ) -> bytes:
        if isinstance(message, RetSubmit):
            urb = self._in_flight.get(message.seqnum)
            if urb is None:
                self._sending(Kind.RET_SUBMIT)  # names the phase when that is what is wrong
                self._local_error(f"RET_SUBMIT for seqnum {message.seqnum}, which is not "
                                  "in flight")
            assert urb is not None
            return bytes(self.reply_submit(
                urb, message.status, message.data,
                None if urb.direction is _IN and message.iso_packets is None
                else message.actual_length,
                message.start_frame, message.error_count, message.iso_packets))
        if isinstance(message, RetUnlink):
            self._sending(Kind.RET_UNLINK)
            return wire.encode_ret_unlink(message.seqnum, message.status)
        self._sending(_kind_of(message))
        if isinstance(message, OpRepDevlist):
            return wire.encode_op_rep_devlist(message.devices, message.status)
        if isinstance(message, OpRepResume):
            return wire.encode_op_rep_resume(message.status, message.received)
        data = wire.encode_op_rep_import(message.status, message.device, message.resume)
        if message.status == OpStatus.OK:
            assert message.device is not None
            self.devid = message.device.devid
        return data

    # --- the reply fast path ---------------------------------------------------------

    def admit(self, urb: CmdSubmit) -> SubmitReply | None:
        """None when the device may have ``urb``; otherwise the reply that refuses it,
        its ``fault`` saying why.

        An IN buffer above the cap is refused with -ENOMEM: never allocate what a
        peer asks for without a bound. usbip-host does otherwise: when it cannot
        allocate a URB's buffer it drops the whole connection (stub_rx.c,
        SDEV_EVENT_ERROR_MALLOC). Refusing the one URB keeps a client that merely
        asked too much (a vhci_hcd URB is far below the cap) attached.
        """
        if urb.direction is _IN and urb.transfer_buffer_length > self.max_transfer_length:
            reply = self.reply_submit(urb, ENOMEM)
            reply.fault = (f"seqnum {urb.seqnum} asks for {urb.transfer_buffer_length} bytes "
                           f"IN, above the cap of {self.max_transfer_length}")
            return reply
        return None

    def reply_submit(self, urb: CmdSubmit, status: int = 0, data: bytes = b"",
                     actual_length: int | None = None, start_frame: int = 0,
                     error_count: int = 0, iso_packets: list[IsoPacket] | None = None,
                     ) -> SubmitReply:
        """RET_SUBMIT for ``urb``, encoded, with what it says.

        The reply is always self-consistent, whatever the device returned:

        * IN data longer than the URB's buffer is a babble: -EOVERFLOW, no data.
        * ``actual_length`` None means len(data) for IN and the whole buffer for OUT;
          one that contradicts the data (IN) or the buffer (OUT) is -EPROTO, no data.
        * A non-iso reply echoes the URB's number_of_packets, as usbip-host does
          (stub_tx.c copies it); an iso reply must describe the URB's own packets,
          with IN data packed (the packets' actual lengths back to back).

        When the reply differs from the device's answer, its ``fault`` says why.
        """
        seqnum = urb.seqnum
        if self.phase is not _URB_PHASE:
            self._sending(Kind.RET_SUBMIT)  # (ERROR is sticky: raises)
        if self._in_flight.pop(seqnum, None) is None:
            self._local_error(f"RET_SUBMIT for seqnum {seqnum}, which is not in flight")
        if iso_packets is not None or urb.iso_packets is not None:
            return self._iso_reply(urb, status, data, actual_length, start_frame,
                                   error_count, iso_packets)
        fault = None
        length = urb.transfer_buffer_length
        if urb.direction is _IN:
            actual = len(data)
            if actual > length:
                fault = f"seqnum {seqnum}: {actual} bytes returned for a {length}-byte URB"
                status, data, actual = EOVERFLOW, b"", 0  # as a babbling device
            elif actual_length is not None and actual_length != actual:
                fault = (f"seqnum {seqnum}: actual_length {actual_length} with "
                         f"{actual} bytes of data")
                status, data, actual = EPROTO, b"", 0
        else:
            data = b""
            actual = length if actual_length is None else actual_length
            if not 0 <= actual <= length:
                fault = f"seqnum {seqnum}: actual_length {actual} for a {length}-byte OUT URB"
                status, actual = EPROTO, 0
        try:
            header = _RET_SUBMIT_PACK(_RET_SUBMIT, seqnum, 0, 0, 0, status, actual,
                                      start_frame, urb.number_of_packets, error_count)
        except struct.error:  # a status, start_frame or error_count beyond 32 bits
            fault = (f"seqnum {seqnum}: status {status}, start_frame {start_frame} or "
                     f"error_count {error_count} does not fit its field")
            status, data, actual, start_frame, error_count = EPROTO, b"", 0, 0, 0
            header = _RET_SUBMIT_PACK(_RET_SUBMIT, seqnum, 0, 0, 0, status, 0, 0,
                                      urb.number_of_packets, 0)
        return SubmitReply(header, data, b"", status, actual, start_frame, error_count, None,
                           fault)

    def _iso_reply(self, urb: CmdSubmit, status: int, data: bytes, actual_length: int | None,
                   start_frame: int, error_count: int, packets: list[IsoPacket] | None,
                   ) -> SubmitReply:
        requested = urb.iso_packets or []
        if packets is None and urb.iso_packets is not None and status != 0 and not data:
            # The URB failed as a whole (refused, flushed): its packets go back as
            # they came, none moved, as usbip-host sends a URB that usb_submit_urb()
            # refused (stub_rx.c completes it with its own descriptors).
            packets = [IsoPacket(p.offset, p.length, 0, 0) for p in requested]
        fault = self._iso_fault(urb, data, actual_length, packets)
        if fault is not None:
            fault = f"seqnum {urb.seqnum}: {fault}"
            status, data, error_count = EPROTO, b"", len(requested)
            packets = _failed(requested)
        assert packets is not None
        if urb.direction is _IN:
            actual = len(data)
        else:
            data = b""
            actual = sum(p.actual_length for p in packets)
        try:
            header = _RET_SUBMIT_PACK(_RET_SUBMIT, urb.seqnum, 0, 0, 0, status, actual,
                                      start_frame, len(packets), error_count)
            descriptors = wire.encode_iso_packets(packets)
        except struct.error:  # a status, frame or count beyond 32 bits
            fault = f"seqnum {urb.seqnum}: a field of the iso reply does not fit"
            packets = _failed(requested)
            status, data, actual, start_frame, error_count = EPROTO, b"", 0, 0, len(packets)
            header = _RET_SUBMIT_PACK(_RET_SUBMIT, urb.seqnum, 0, 0, 0, status, 0, 0,
                                      len(packets), error_count)
            descriptors = wire.encode_iso_packets(packets)
        # (a non-iso URB answered as iso is a fault, its reply non-iso: no packets)
        return SubmitReply(header, data, descriptors, status, actual, start_frame,
                           error_count, packets if urb.iso_packets is not None else None, fault)

    @staticmethod
    def _iso_fault(urb: CmdSubmit, data: bytes, actual_length: int | None,
                   packets: list[IsoPacket] | None) -> str | None:
        requested = urb.iso_packets
        if requested is None or packets is None:
            return "an isochronous reply to a non-isochronous URB, or the other way round"
        if len(packets) != len(requested):
            return f"{len(packets)} iso packets returned, {len(requested)} submitted"
        total = 0
        for i, p in enumerate(packets):
            if (p.offset < 0 or not 0 <= p.actual_length <= p.length
                    or p.offset + p.length > urb.transfer_buffer_length):
                return f"iso packet {i} does not fit its buffer"
            total += p.actual_length
        if urb.direction is _IN and total != len(data):
            return f"iso actual lengths add up to {total}, {len(data)} bytes of data"
        if actual_length is not None and actual_length != total:
            return f"actual_length {actual_length}, iso packets add up to {total}"
        return None

    def hold_unlink(self, cmd: CmdUnlink) -> bool:
        """Whether to hold the answer to an UNLINK whose URB the server does not have.

        Usually that URB was answered already, and RET_UNLINK(0) is the answer
        at once, as usbip-host gives it (stub_rx.c): then this returns False.

        But vhci_hcd can send an UNLINK before the CMD_SUBMIT of its URB: its tx
        thread sends the unlink queue right after finding the submit queue empty,
        and a URB submitted and killed in between has its CMD_SUBMIT sent on the
        next round (vhci_tx.c). Answered 0 at once, vhci_hcd gives the URB back,
        and the RET_SUBMIT that follows finds no URB: vhci_hcd drops the device
        ("cannot find a urb of seqnum"). Answered at once with any status, the
        answer can even overtake the URB's move to the list vhci_rx searches, and
        the URB is never given back. So the answer to an UNLINK of a seqnum
        beyond every CMD_SUBMIT so far (serial number arithmetic, RFC 1982) waits
        for :meth:`submit_after_unlinks`: when that URB comes it is cancelled
        unserved (RET_UNLINK -ECONNRESET, no RET_SUBMIT); when a later URB comes
        first, vhci_hcd (which sends a device's URBs in seqnum order) will never
        send it, and the answer is 0. The server answers 0 to any still held
        after a while (:meth:`release_unlink`). At most
        :data:`MAX_EARLY_UNLINKS` are held; beyond, the answer is 0 at once.
        """
        target = cmd.unlink_seqnum
        newest = self._newest
        if newest is not None and not 0 < (target - newest) & 0xFFFF_FFFF < 0x8000_0000:
            return False
        if len(self._held) >= MAX_EARLY_UNLINKS or target in self._held:
            return False
        self._held[target] = cmd
        return True

    @property
    def holding(self) -> bool:
        """Whether UNLINK answers wait for their URBs (:meth:`hold_unlink`)."""
        return bool(self._held)

    def submit_after_unlinks(self, urb: CmdSubmit) -> tuple[bytes, bool]:
        """The held UNLINK answers that ``urb`` settles, and whether ``urb`` itself
        was unlinked before it came (then it is no longer in flight: it must be
        neither served nor answered, its RET_UNLINK -ECONNRESET says it all)."""
        replies = []
        seqnum = urb.seqnum
        for target in [t for t in self._held if 0 < (seqnum - t) & 0xFFFF_FFFF < 0x8000_0000]:
            # a URB beyond it came first: that one will never come
            replies.append(self._ret_unlink(self._held.pop(target).seqnum, 0))
        cmd = self._held.pop(seqnum, None)
        if cmd is not None:
            self._in_flight.pop(seqnum, None)
            replies.append(self._ret_unlink(cmd.seqnum, ECONNRESET))
        return b"".join(replies), cmd is not None

    def release_unlink(self, target: int) -> bytes:
        """RET_UNLINK(0) for the UNLINK held for URB ``target``, which did not come
        in time; b"" when none is held for it (any more)."""
        cmd = self._held.pop(target, None)
        return b"" if cmd is None else self._ret_unlink(cmd.seqnum, 0)

    def reply_unlink(self, cmd: CmdUnlink, status: int) -> bytes:
        """RET_UNLINK for ``cmd``: -ECONNRESET when the URB was cancelled (its
        RET_SUBMIT never comes), 0 when it had completed (its RET_SUBMIT is sent)."""
        encoded = self._ret_unlink(cmd.seqnum, status)
        if status != 0:
            self._in_flight.pop(cmd.unlink_seqnum, None)
        return encoded

    def _ret_unlink(self, seqnum: int, status: int) -> bytes:
        self._sending(Kind.RET_UNLINK)
        return wire.encode_ret_unlink(seqnum, status)

    # --- decoding -------------------------------------------------------------------

    def _parse_op(self, op: OpCode, status: int) -> Event:
        if op is OpCode.REQ_DEVLIST:
            self._pos += wire.OP_HEADER.size
            self._received(Kind.OP_REQ_DEVLIST)
            return OpReqDevlist()
        if op is OpCode.REQ_RESUME:
            if self.buffered < wire.OP_REQ_RESUME.size:
                return NEED_DATA
            token, received = wire.OP_REQ_RESUME.unpack_from(self._buf, self._pos)[3:]
            self._pos += wire.OP_REQ_RESUME.size
            self._received(Kind.OP_REQ_RESUME)
            return OpReqResume(token, received)
        if self.buffered < wire.OP_HEADER.size + wire.BUSID.size:
            return NEED_DATA
        (raw,) = wire.BUSID.unpack_from(self._buf, self._pos + wire.OP_HEADER.size)
        self._pos += wire.OP_HEADER.size + wire.BUSID.size
        self._received(Kind.OP_REQ_IMPORT)
        return OpReqImport(wire._c_string(raw), wire.offers_resume(raw))

    def _parse_urb(self) -> Event:
        buf = self._buf
        pos = self._pos
        avail = len(buf) - pos
        if avail < _HDR:
            return NEED_DATA
        command = _URB_BASIC_UNPACK(buf, pos)[0]
        if command == _CMD_SUBMIT:  # the hot path
            (_, seqnum, devid, direction, ep, flags, length, start_frame, npackets,
             interval, setup) = _CMD_SUBMIT_UNPACK(buf, pos)
            if devid != self.devid or direction > 1 or ep > 15:
                self._check_target(devid, direction, ep)  # raises the specific error
            if length < 0:
                raise BadLength(f"seqnum {seqnum}: negative transfer_buffer_length {length}")
            if direction == 0 and length > self.max_transfer_length:
                raise BadLength(
                    f"seqnum {seqnum}: OUT transfer_buffer_length {length} is above the cap "
                    f"of {self.max_transfer_length}"
                )
            n_iso = self._check_packets(npackets) if npackets else 0
            payload = length if direction == 0 else 0
            need = _HDR + payload + _ISO_SIZE * n_iso
            if avail < need:
                return NEED_DATA
            in_flight = self._in_flight
            if seqnum in in_flight:
                raise DuplicateSeqnum(f"seqnum {seqnum} is already in flight")
            iso = None
            if n_iso:
                iso = self._iso_packets(pos + _HDR + payload, n_iso, length)
            data = self._copy(pos + _HDR, payload) if payload else b""
            self._pos = pos + need
            newest = self._newest
            if newest is None or 0 < (seqnum - newest) & 0xFFFF_FFFF < 0x8000_0000:
                self._newest = seqnum
            urb = in_flight[seqnum] = CmdSubmit(
                seqnum, devid, _IN if direction else _OUT, ep, flags, length, setup, data,
                start_frame, npackets, interval, iso,
            )
            return urb
        if command == _CMD_UNLINK:
            _, seqnum, devid, direction, ep, unlink_seqnum = wire.CMD_UNLINK.unpack_from(buf, pos)
            self._check_target(devid, direction, ep)
            self._pos = pos + _HDR
            return CmdUnlink(seqnum, devid, unlink_seqnum, Direction(direction), ep)
        raise self._not_expected(command)

    def _check_target(self, devid: int, direction: int, ep: int) -> None:
        if devid != self.devid:
            raise BadDevid(f"devid {devid:#010x} is not the imported device's {self.devid:#010x}")
        if direction > 1:
            raise RemoteProtocolError(f"direction {direction} is neither OUT (0) nor IN (1)")
        if ep > 15:
            raise RemoteProtocolError(f"endpoint number {ep} is above 15")


class ClientConnection(_Connection):
    """The client side: encodes requests, decodes replies.

    It remembers each submitted seqnum's direction and transfer size, so it
    knows whether a RET_SUBMIT carries IN data and how much is plausible.
    """

    role = Role.CLIENT

    def __init__(self, *, max_transfer_length: int = DEFAULT_MAX_TRANSFER) -> None:
        super().__init__(max_transfer_length=max_transfer_length)
        #: seqnum -> (direction, transfer_buffer_length, number of iso packets)
        self._pending: dict[int, tuple[Direction, int, int]] = {}
        #: unlink seqnum -> the seqnum it targets
        self._unlinks: dict[int, int] = {}
        self.device: DeviceInfo | None = None
        self._last_seqnum = 0

    def next_seqnum(self) -> int:
        """A seqnum for the next CMD_SUBMIT or CMD_UNLINK: 1 to 2**32 - 1, wrapping
        around, never one still in flight (seqnum is a u32 on the wire)."""
        n = self._last_seqnum
        for _ in range(len(self._pending) + len(self._unlinks) + 1):
            n = n % 0xFFFFFFFF + 1
            if n not in self._pending and n not in self._unlinks:
                self._last_seqnum = n
                return n
        raise LocalProtocolError("no seqnum is free")  # (unreachable: 4 billion in flight)

    @property
    def pending(self) -> int:
        """Submitted URBs with no RET_SUBMIT yet."""
        return len(self._pending)

    def send(self, message: OpReqDevlist | OpReqImport | OpReqResume | CmdSubmit | CmdUnlink
             ) -> bytes:
        if isinstance(message, CmdSubmit):
            m = message
            return self.send_submit(m.seqnum, m.devid, m.direction, m.ep, m.transfer_flags,
                                    m.transfer_buffer_length, m.setup, m.data, m.start_frame,
                                    m.number_of_packets, m.interval, m.iso_packets)
        self._sending(_kind_of(message))
        if isinstance(message, CmdUnlink):
            self._unlinks[message.seqnum] = message.unlink_seqnum
            return wire.encode_cmd_unlink(message)
        if isinstance(message, OpReqDevlist):
            return wire.encode_op_req_devlist()
        if isinstance(message, OpReqResume):
            return wire.encode_op_req_resume(message.token, message.received)
        return wire.encode_op_req_import(message.busid, message.resume)

    def send_submit(self, seqnum: int, devid: int, direction: Direction, ep: int,
                    transfer_flags: int, transfer_buffer_length: int,
                    setup: bytes = bytes(8), data: bytes = b"", start_frame: int = 0,
                    number_of_packets: int = 0, interval: int = 0,
                    iso_packets: list[IsoPacket] | None = None) -> bytes:
        """CMD_SUBMIT from its fields: ``send(CmdSubmit(...))`` without the message
        object, for a client's hot path (a URB per call, where building the object
        is a fifth of the codec's cost)."""
        self._sending(Kind.CMD_SUBMIT)
        if seqnum in self._pending:
            self._local_error(f"seqnum {seqnum} is already in flight")
        if direction is Direction.OUT and len(data) != transfer_buffer_length:
            self._local_error("OUT data must be transfer_buffer_length bytes")
        encoded = wire.encode_submit_fields(seqnum, devid, direction, ep, transfer_flags,
                                            transfer_buffer_length, setup, data, start_frame,
                                            number_of_packets, interval, iso_packets)
        # (remembered once encoded: a field out of range leaves nothing in flight)
        self._pending[seqnum] = (
            direction, transfer_buffer_length, len(iso_packets) if iso_packets is not None else 0)
        return encoded

    def _parse_op(self, op: OpCode, status: int) -> Event:
        if op is OpCode.REP_IMPORT:
            return self._parse_rep_import(status)
        if op is OpCode.REP_RESUME:
            return self._parse_rep_resume(status)
        return self._parse_rep_devlist(status)

    def _parse_rep_resume(self, status: int) -> Event:
        op_status = self._op_status(status)
        if self.buffered < wire.OP_REP_RESUME.size:
            return NEED_DATA
        received = wire.OP_REP_RESUME.unpack_from(self._buf, self._pos)[3]
        self._pos += wire.OP_REP_RESUME.size
        self._received(Kind.OP_REP_RESUME_OK if op_status == OpStatus.OK
                       else Kind.OP_REP_RESUME_ERROR)
        return OpRepResume(op_status, received)

    def _op_status(self, status: int) -> OpStatus:
        try:
            return OpStatus(status)
        except ValueError:
            raise UnexpectedMessage(f"unknown OP status {status}") from None

    def _parse_rep_import(self, status: int) -> Event:
        op_status = self._op_status(status)
        if op_status != OpStatus.OK:
            self._pos += wire.OP_HEADER.size
            self._received(Kind.OP_REP_IMPORT_ERROR)
            return OpRepImport(op_status)
        if self.buffered < wire.OP_HEADER.size + wire.DEVICE.size:
            return NEED_DATA
        device = wire.decode_device(self._buf, self._pos + wire.OP_HEADER.size)
        grant = wire.decode_grant(self._buf, self._pos + wire.OP_HEADER.size)
        self._pos += wire.OP_HEADER.size + wire.DEVICE.size
        self.device = device
        self._received(Kind.OP_REP_IMPORT_OK)
        return OpRepImport(op_status, device, grant)

    def _parse_rep_devlist(self, status: int) -> Event:
        op_status = self._op_status(status)
        if self.buffered < wire.OP_DEVLIST_HEADER.size:
            return NEED_DATA
        count = wire.OP_DEVLIST_HEADER.unpack_from(self._buf, self._pos)[3]
        if count > MAX_DEVLIST_DEVICES:
            raise BadLength(f"{count} devices in OP_REP_DEVLIST (limit {MAX_DEVLIST_DEVICES})")
        offset = self._pos + wire.OP_DEVLIST_HEADER.size
        end = len(self._buf)
        devices = []
        for _ in range(count):
            if end - offset < wire.DEVICE.size:
                return NEED_DATA
            device = wire.decode_device(self._buf, offset)
            offset += wire.DEVICE.size
            n_if = device.bNumInterfaces
            if end - offset < wire.INTERFACE_SIZE * n_if:
                return NEED_DATA
            interfaces = wire.decode_interfaces(self._buf, offset, n_if)
            offset += wire.INTERFACE_SIZE * n_if
            devices.append(dataclasses.replace(device, interfaces=interfaces))
        self._pos = offset
        self._received(Kind.OP_REP_DEVLIST)
        return OpRepDevlist(tuple(devices), op_status)

    def _parse_urb(self) -> Event:
        buf = self._buf
        pos = self._pos
        avail = len(buf) - pos
        if avail < _HDR:
            return NEED_DATA
        command = _URB_BASIC_UNPACK(buf, pos)[0]
        if command == _RET_SUBMIT:
            (_, seqnum, _devid, _direction, _ep, status, actual, start_frame, npackets,
             error_count) = _RET_SUBMIT_UNPACK(buf, pos)
            expected = self._pending.get(seqnum)
            if expected is None:
                raise UnexpectedMessage(f"RET_SUBMIT for seqnum {seqnum}, which is not in flight")
            direction, length, sent_iso = expected
            if actual < 0 or actual > length:
                raise BadLength(
                    f"seqnum {seqnum}: actual_length {actual} outside 0..{length}"
                )
            n_iso = self._check_packets(npackets) if npackets else 0
            if n_iso != sent_iso:
                raise BadIsoDescriptors(
                    f"seqnum {seqnum}: {n_iso} iso packets returned, {sent_iso} submitted"
                )
            payload = actual if direction is _IN else 0
            need = _HDR + payload + _ISO_SIZE * n_iso
            if avail < need:
                return NEED_DATA
            iso = None
            if n_iso:
                iso = self._iso_packets(pos + _HDR + payload, n_iso, length)
                if direction is _IN and sum(p.actual_length for p in iso) != actual:
                    raise BadIsoDescriptors(
                        f"seqnum {seqnum}: iso actual lengths do not add up to {actual}"
                    )
            data = self._copy(pos + _HDR, payload) if payload else b""
            self._pos = pos + need
            del self._pending[seqnum]
            return RetSubmit(
                seqnum, status, actual, data, start_frame, npackets, error_count, iso, direction
            )
        if command == _RET_UNLINK:
            _, seqnum, _devid, _direction, _ep, status = wire.RET_UNLINK.unpack_from(buf, pos)
            target = self._unlinks.pop(seqnum, None)
            if target is None:
                raise UnexpectedMessage(f"RET_UNLINK for seqnum {seqnum}, which was never sent")
            # Whatever the status, no RET_SUBMIT follows a RET_UNLINK: a URB that
            # completed first had its RET_SUBMIT sent first (stub_tx.c sends those
            # before RET_UNLINKs), and one usbip-host unlinked while it completed is
            # answered by this RET_UNLINK alone, with status 0 (stub_complete), which
            # vhci_rx.c takes as the URB's end.
            self._pending.pop(target, None)
            self._pos = pos + _HDR
            return RetUnlink(seqnum, status)
        raise self._not_expected(command)
