"""Typed USB/IP messages: what the codec decodes into and encodes from."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..usb.speed import Speed
from .constants import Direction, OpStatus


@dataclass(frozen=True, slots=True)
class InterfaceInfo:
    """The 4-byte interface record of OP_REP_DEVLIST."""

    bInterfaceClass: int
    bInterfaceSubClass: int
    bInterfaceProtocol: int


@dataclass(frozen=True, slots=True)
class DeviceInfo:
    """The 312-byte usbip_usb_device record (OP_REP_DEVLIST and OP_REP_IMPORT)."""

    path: str
    busid: str
    busnum: int
    devnum: int
    speed: Speed
    idVendor: int
    idProduct: int
    bcdDevice: int
    bDeviceClass: int
    bDeviceSubClass: int
    bDeviceProtocol: int
    bConfigurationValue: int
    bNumConfigurations: int
    bNumInterfaces: int
    #: Sent in OP_REP_DEVLIST only; OP_REP_IMPORT carries no interface records.
    interfaces: tuple[InterfaceInfo, ...] = ()

    @property
    def devid(self) -> int:
        """The devid that CMD_SUBMIT/CMD_UNLINK carry: (busnum << 16) | devnum."""
        return (self.busnum << 16) | self.devnum


# --- OP phase -------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class OpReqDevlist:
    """OP_REQ_DEVLIST: the client asks for the exported devices."""


@dataclass(frozen=True, slots=True)
class OpRepDevlist:
    """OP_REP_DEVLIST: the exported devices, each with its interfaces."""

    devices: tuple[DeviceInfo, ...]
    status: OpStatus = OpStatus.OK


@dataclass(frozen=True, slots=True)
class OpReqImport:
    """OP_REQ_IMPORT: the client asks to import the device at ``busid``.

    ``resume``: the client also offers a resumable stream (usbipy's extension,
    hidden where usbipd and usbipd-win never look: see :mod:`.resume`)."""

    busid: str
    resume: bool = False


@dataclass(frozen=True, slots=True)
class ResumeGrant:
    """What a server that takes the offer says in OP_REP_IMPORT: the token that
    resumes the attachment, and how long (seconds) it keeps it after a loss."""

    token: bytes
    window: int


@dataclass(frozen=True, slots=True)
class OpRepImport:
    """OP_REP_IMPORT: 320 bytes with the device on success, 8 bytes otherwise."""

    status: OpStatus
    device: DeviceInfo | None = None
    #: The server took the client's offer of a resumable stream.
    resume: ResumeGrant | None = None


@dataclass(frozen=True, slots=True)
class OpReqResume:
    """usbipy's OP_REQ_RESUME: carry on the attachment of ``token`` on this new
    connection; the client has ``received`` bytes of the server's stream."""

    token: bytes
    received: int


@dataclass(frozen=True, slots=True)
class OpRepResume:
    """usbipy's OP_REP_RESUME: OK and the bytes of the client's stream the server
    has; any other status: the attachment is gone (attach again)."""

    status: OpStatus
    received: int = 0


# --- URB phase ------------------------------------------------------------


@dataclass(slots=True)
class IsoPacket:
    """One usbip_iso_packet_descriptor (16 bytes)."""

    offset: int
    length: int
    actual_length: int = 0
    status: int = 0


@dataclass(slots=True)
class CmdSubmit:
    """USBIP_CMD_SUBMIT: a URB from the client to the device."""

    seqnum: int
    devid: int
    direction: Direction
    ep: int
    transfer_flags: int
    transfer_buffer_length: int
    setup: bytes = bytes(8)
    #: OUT payload (``transfer_buffer_length`` bytes); empty for IN.
    data: bytes = b""
    start_frame: int = 0
    #: As received: 0 or 0xffffffff for non-isochronous URBs.
    number_of_packets: int = 0
    interval: int = 0
    iso_packets: list[IsoPacket] | None = None

    @property
    def is_iso(self) -> bool:
        return self.iso_packets is not None


@dataclass(slots=True)
class RetSubmit:
    """USBIP_RET_SUBMIT: the completion of a URB."""

    seqnum: int
    status: int = 0
    actual_length: int = 0
    #: IN payload; for isochronous IN, the packets' data back to back.
    data: bytes = b""
    start_frame: int = 0
    number_of_packets: int = 0
    error_count: int = 0
    iso_packets: list[IsoPacket] | None = None
    #: Only on the client side: the direction remembered for this seqnum.
    direction: Direction = field(default=Direction.OUT, compare=False)


@dataclass(slots=True)
class SubmitReply:
    """A RET_SUBMIT as the server's codec encoded it (:meth:`ServerConnection.reply_submit`):
    the bytes to send, and what they say, so that a capture or a counter reads the
    reply the client gets without decoding it again."""

    #: The 48-byte header.
    header: bytes
    #: IN data; for isochronous IN, the packets' data back to back.
    data: bytes
    #: The iso packet descriptors that follow the data (b"" for a non-iso URB).
    iso_descriptors: bytes
    status: int
    actual_length: int
    start_frame: int
    error_count: int
    iso_packets: list[IsoPacket] | None
    #: Why the reply differs from what the device returned, when it does (a device
    #: bug the server logs), or why the codec refused the URB (admit).
    fault: str | None = None

    def __bytes__(self) -> bytes:
        return b"".join((self.header, self.data, self.iso_descriptors))


@dataclass(frozen=True, slots=True)
class CmdUnlink:
    """USBIP_CMD_UNLINK: cancel the URB ``unlink_seqnum``."""

    seqnum: int
    devid: int
    unlink_seqnum: int
    direction: Direction = Direction.OUT
    ep: int = 0


@dataclass(frozen=True, slots=True)
class RetUnlink:
    """USBIP_RET_UNLINK: -ECONNRESET if the URB was cancelled, 0 if it had completed."""

    seqnum: int
    status: int


OpMessage = (OpReqDevlist | OpRepDevlist | OpReqImport | OpRepImport | OpReqResume
             | OpRepResume)
UrbMessage = CmdSubmit | RetSubmit | CmdUnlink | RetUnlink
Message = OpMessage | UrbMessage
