"""Sans-IO USB/IP connections: bytes in, typed messages out; messages in, bytes out.

A connection goes through two phases. In the OP phase one request and one
reply are exchanged (a device list, or an import). After a successful import
the URB phase begins and lasts until the TCP connection ends::

    server:  OP --REQ_DEVLIST--> REPLYING --send REP_DEVLIST--> CLOSED
             OP --REQ_IMPORT---> REPLYING --send REP_IMPORT(OK)--> URB
                                          --send REP_IMPORT(error)--> CLOSED
    client:  OP --send REQ_*--> AWAIT_REPLY --REP_DEVLIST / REP_IMPORT(error)--> CLOSED
                                            --REP_IMPORT(OK)--> URB

Use :meth:`receive_data` to feed bytes in any split (``b""`` means EOF),
:meth:`next_event` to take whole messages out, and :meth:`send` to encode.
No I/O happens here.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from enum import Enum, auto
from typing import Final

from . import wire
from .constants import (
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
    OpReqDevlist,
    OpReqImport,
    RetSubmit,
    RetUnlink,
)


class _Sentinel(Enum):
    NEED_DATA = auto()
    EOF = auto()


#: next_event(): no whole message is buffered yet.
NEED_DATA: Final = _Sentinel.NEED_DATA
#: next_event(): the peer closed and every buffered message was taken.
EOF: Final = _Sentinel.EOF

Event = Message | _Sentinel


class Phase(Enum):
    OP = auto()
    REPLYING = auto()  # server: a request came, the reply is not sent yet
    AWAIT_REPLY = auto()  # client: a request was sent, the reply did not come yet
    URB = auto()
    CLOSED = auto()  # the OP exchange is over and the connection ends here
    ERROR = auto()


#: Default cap on any one transfer buffer (OUT payload, IN reply): 16 MiB.
#: Linux's usb-storage never moves more than a few hundred KiB per URB.
DEFAULT_MAX_TRANSFER = 16 * 1024 * 1024
#: A device list larger than this is hostile (the kernel's devlist is one record per bus port).
MAX_DEVLIST_DEVICES = 4096
#: Compact the receive buffer once this many consumed bytes sit in front of it.
_COMPACT_AT = 1 << 16

_OP_HEADER = wire.OP_HEADER
_CMD_SUBMIT_UNPACK = wire.CMD_SUBMIT.unpack_from
_RET_SUBMIT_UNPACK = wire.RET_SUBMIT.unpack_from
_ISO_UNPACK = wire.ISO_PACKET.unpack_from
_U32 = wire.URB_BASIC.unpack_from
_HDR = wire.URB_HEADER_SIZE
_IN = Direction.IN
_OUT = Direction.OUT


class _Connection:
    """The receive buffer, the phase and the sticky error state shared by both roles."""

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

    @property
    def buffered(self) -> int:
        """Bytes received and not yet turned into messages."""
        return len(self._buf) - self._pos

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        """Feed received bytes; ``b""`` means the peer closed its side."""
        if not data:
            self._eof = True
            return
        if self._eof:
            raise LocalProtocolError("data received after EOF")
        buf = self._buf
        if self._pos == len(buf):  # everything before was parsed
            self._buf = data if type(data) is bytes else bytearray(data)
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
                    while (urb := parse()) is not NEED_DATA:
                        yield urb  # type: ignore[misc]
                except RemoteProtocolError as exc:
                    self.phase = Phase.ERROR
                    self._error = exc
                    raise
            event = self.next_event()  # EOF, errors, and the OP phase
            if isinstance(event, _Sentinel):
                return
            yield event

    def _parse(self) -> Event:
        raise NotImplementedError

    def _parse_urb(self) -> Event:
        raise NotImplementedError

    def _copy(self, start: int, n: int) -> bytes:
        """``n`` buffered bytes at ``start``, copied once (the buffer is reused)."""
        with memoryview(self._buf) as view:
            return view[start : start + n].tobytes()

    def _op_header(self, expected: tuple[OpCode, ...]) -> tuple[OpCode, int] | None:
        if self.buffered < _OP_HEADER.size:
            return None
        version, code, status = _OP_HEADER.unpack_from(self._buf, self._pos)
        if version != USBIP_VERSION:
            raise UnsupportedVersion(
                f"USB/IP version {version:#06x}, expected {USBIP_VERSION:#06x}"
            )
        try:
            op = OpCode(code)
        except ValueError:
            raise UnknownCommand(f"unknown OP code {code:#06x}") from None
        if op not in expected:
            raise UnexpectedMessage(f"{op.name} not expected in phase {self.phase.name}")
        return op, status

    def _iso_packets(
        self, offset: int, count: int, buffer_length: int
    ) -> list[IsoPacket]:
        """Decode and check ``count`` descriptors that must fit ``buffer_length``."""
        packets = []
        buf = self._buf
        for i in range(count):
            p_off, p_len, p_actual, p_status = _ISO_UNPACK(buf, offset + 16 * i)
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

    def _not_a_request(self, command: int) -> RemoteProtocolError:
        try:
            name = UrbCommand(command).name
        except ValueError:
            return UnknownCommand(f"unknown URB command {command:#010x}")
        return UnexpectedMessage(f"{name} not expected from this peer")


class ServerConnection(_Connection):
    """The server side: decodes requests, encodes replies."""

    def __init__(self, *, max_transfer_length: int = DEFAULT_MAX_TRANSFER) -> None:
        super().__init__(max_transfer_length=max_transfer_length)
        #: The imported device's devid, once the import succeeded.
        self.devid: int | None = None

    def send(self, message: OpRepDevlist | OpRepImport | RetSubmit | RetUnlink) -> bytes:
        if isinstance(message, RetSubmit):
            if self.phase is not Phase.URB:
                raise LocalProtocolError("RET_SUBMIT outside the URB phase")
            return wire.encode_ret_submit(
                message.seqnum, message.status, message.actual_length, message.data,
                message.start_frame, message.number_of_packets, message.error_count,
                message.iso_packets,
            )
        if isinstance(message, RetUnlink):
            if self.phase is not Phase.URB:
                raise LocalProtocolError("RET_UNLINK outside the URB phase")
            return wire.encode_ret_unlink(message.seqnum, message.status)
        if self.phase is not Phase.REPLYING:
            raise LocalProtocolError(f"no OP request to answer in phase {self.phase.name}")
        if isinstance(message, OpRepDevlist):
            self.phase = Phase.CLOSED
            return wire.encode_op_rep_devlist(message.devices, message.status)
        if isinstance(message, OpRepImport):
            data = wire.encode_op_rep_import(message.status, message.device)
            if message.status == OpStatus.OK:
                assert message.device is not None
                self.devid = message.device.devid
                self.phase = Phase.URB
            else:
                self.phase = Phase.CLOSED
            return data
        raise LocalProtocolError(f"a server does not send {type(message).__name__}")

    def _parse(self) -> Event:
        phase = self.phase
        if phase is Phase.URB:
            return self._parse_urb()
        if not self.buffered:
            return NEED_DATA
        if phase is not Phase.OP:
            raise UnexpectedMessage(f"data from the client in phase {phase.name}")
        head = self._op_header((OpCode.REQ_DEVLIST, OpCode.REQ_IMPORT))
        if head is None:
            return NEED_DATA
        op, _status = head
        if op is OpCode.REQ_DEVLIST:
            self._pos += _OP_HEADER.size
            self.phase = Phase.REPLYING
            return OpReqDevlist()
        if self.buffered < _OP_HEADER.size + wire.BUSID.size:
            return NEED_DATA
        (raw,) = wire.BUSID.unpack_from(self._buf, self._pos + _OP_HEADER.size)
        self._pos += _OP_HEADER.size + wire.BUSID.size
        self.phase = Phase.REPLYING
        return OpReqImport(wire._c_string(raw))

    def _parse_urb(self) -> Event:
        buf = self._buf
        pos = self._pos
        avail = len(buf) - pos
        if avail < _HDR:
            return NEED_DATA
        command = _U32(buf, pos)[0]
        if command == 1:  # CMD_SUBMIT, the hot path
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
            need = _HDR + payload + 16 * n_iso
            if avail < need:
                return NEED_DATA
            iso = None
            if n_iso:
                iso = self._iso_packets(pos + _HDR + payload, n_iso, length)
            data = self._copy(pos + _HDR, payload) if payload else b""
            self._pos = pos + need
            return CmdSubmit(
                seqnum, devid, _IN if direction else _OUT, ep, flags, length, setup, data,
                start_frame, npackets, interval, iso,
            )
        if command == 2:  # CMD_UNLINK
            _, seqnum, devid, direction, ep, unlink_seqnum = wire.CMD_UNLINK.unpack_from(buf, pos)
            self._check_target(devid, direction, ep)
            self._pos = pos + _HDR
            return CmdUnlink(seqnum, devid, unlink_seqnum, Direction(direction), ep)
        raise self._not_a_request(command)

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

    def __init__(self, *, max_transfer_length: int = DEFAULT_MAX_TRANSFER) -> None:
        super().__init__(max_transfer_length=max_transfer_length)
        self._awaiting: OpCode | None = None
        #: seqnum -> (direction, transfer_buffer_length, number of iso packets)
        self._pending: dict[int, tuple[Direction, int, int]] = {}
        #: unlink seqnum -> the seqnum it targets
        self._unlinks: dict[int, int] = {}
        self.device: DeviceInfo | None = None

    @property
    def pending(self) -> int:
        """Submitted URBs with no RET_SUBMIT yet."""
        return len(self._pending)

    def send(self, message: OpReqDevlist | OpReqImport | CmdSubmit | CmdUnlink) -> bytes:
        if isinstance(message, CmdSubmit):
            if self.phase is not Phase.URB:
                raise LocalProtocolError("CMD_SUBMIT before a successful import")
            if message.seqnum in self._pending:
                raise LocalProtocolError(f"seqnum {message.seqnum} is already in flight")
            if message.direction is Direction.OUT and len(message.data) != (
                message.transfer_buffer_length
            ):
                raise LocalProtocolError("OUT data must be transfer_buffer_length bytes")
            n_iso = len(message.iso_packets) if message.iso_packets is not None else 0
            self._pending[message.seqnum] = (
                message.direction, message.transfer_buffer_length, n_iso,
            )
            return wire.encode_cmd_submit(message)
        if isinstance(message, CmdUnlink):
            if self.phase is not Phase.URB:
                raise LocalProtocolError("CMD_UNLINK before a successful import")
            self._unlinks[message.seqnum] = message.unlink_seqnum
            return wire.encode_cmd_unlink(message)
        if self.phase is not Phase.OP:
            raise LocalProtocolError(f"one OP request per connection (phase {self.phase.name})")
        self.phase = Phase.AWAIT_REPLY
        if isinstance(message, OpReqDevlist):
            self._awaiting = OpCode.REP_DEVLIST
            return wire.encode_op_req_devlist()
        if isinstance(message, OpReqImport):
            self._awaiting = OpCode.REP_IMPORT
            return wire.encode_op_req_import(message.busid)
        raise LocalProtocolError(f"a client does not send {type(message).__name__}")

    def _parse(self) -> Event:
        phase = self.phase
        if phase is Phase.URB:
            return self._parse_urb()
        if not self.buffered:
            return NEED_DATA
        if phase is not Phase.AWAIT_REPLY:
            raise UnexpectedMessage(f"data from the server in phase {phase.name}")
        assert self._awaiting is not None
        head = self._op_header((self._awaiting,))
        if head is None:
            return NEED_DATA
        op, status = head
        if op is OpCode.REP_IMPORT:
            return self._parse_rep_import(status)
        return self._parse_rep_devlist(status)

    def _op_status(self, status: int) -> OpStatus:
        try:
            return OpStatus(status)
        except ValueError:
            raise UnexpectedMessage(f"unknown OP status {status}") from None

    def _parse_rep_import(self, status: int) -> Event:
        op_status = self._op_status(status)
        if op_status != OpStatus.OK:
            self._pos += _OP_HEADER.size
            self.phase = Phase.CLOSED
            return OpRepImport(op_status)
        if self.buffered < _OP_HEADER.size + wire.DEVICE.size:
            return NEED_DATA
        device = wire.decode_device(self._buf, self._pos + _OP_HEADER.size)
        self._pos += _OP_HEADER.size + wire.DEVICE.size
        self.device = device
        self.phase = Phase.URB
        return OpRepImport(op_status, device)

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
            if end - offset < 4 * n_if:
                return NEED_DATA
            interfaces = wire.decode_interfaces(self._buf, offset, n_if)
            offset += 4 * n_if
            devices.append(dataclasses.replace(device, interfaces=interfaces))
        self._pos = offset
        self.phase = Phase.CLOSED
        return OpRepDevlist(tuple(devices), op_status)

    def _parse_urb(self) -> Event:
        buf = self._buf
        pos = self._pos
        avail = len(buf) - pos
        if avail < _HDR:
            return NEED_DATA
        command = _U32(buf, pos)[0]
        if command == 3:  # RET_SUBMIT
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
            need = _HDR + payload + 16 * n_iso
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
        if command == 4:  # RET_UNLINK
            _, seqnum, _devid, _direction, _ep, status = wire.RET_UNLINK.unpack_from(buf, pos)
            target = self._unlinks.pop(seqnum, None)
            if target is None:
                raise UnexpectedMessage(f"RET_UNLINK for seqnum {seqnum}, which was never sent")
            if status != 0:
                # The server cancelled the URB: no RET_SUBMIT will come for it.
                self._pending.pop(target, None)
            self._pos = pos + _HDR
            return RetUnlink(seqnum, status)
        raise self._not_a_request(command)
