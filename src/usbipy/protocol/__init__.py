"""The USB/IP 1.1.1 codec, sans-IO: no sockets, no asyncio.

Feed bytes to a :class:`ServerConnection` or :class:`ClientConnection`, take
typed messages out, and encode messages back into bytes.
"""

from ..usb.speed import Speed
from .connection import (
    DEFAULT_MAX_TRANSFER,
    EOF,
    NEED_DATA,
    ClientConnection,
    ServerConnection,
)
from .constants import (
    MAX_ISO_PACKETS,
    NON_ISO_PACKETS,
    USBIP_PORT,
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
    ProtocolError,
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
    InterfaceInfo,
    IsoPacket,
    Message,
    OpRepDevlist,
    OpRepImport,
    OpReqDevlist,
    OpReqImport,
    RetSubmit,
    RetUnlink,
    SubmitReply,
)
from .states import Phase, Role

__all__ = [
    "BadDevid",
    "BadIsoDescriptors",
    "BadLength",
    "ClientConnection",
    "CmdSubmit",
    "CmdUnlink",
    "DEFAULT_MAX_TRANSFER",
    "DeviceInfo",
    "Direction",
    "DuplicateSeqnum",
    "EOF",
    "InterfaceInfo",
    "IsoPacket",
    "LocalProtocolError",
    "MAX_ISO_PACKETS",
    "Message",
    "NEED_DATA",
    "NON_ISO_PACKETS",
    "OpCode",
    "OpRepDevlist",
    "OpRepImport",
    "OpReqDevlist",
    "OpReqImport",
    "OpStatus",
    "Phase",
    "ProtocolError",
    "RemoteProtocolError",
    "RetSubmit",
    "RetUnlink",
    "Role",
    "ServerConnection",
    "Speed",
    "SubmitReply",
    "TooManyIsoPackets",
    "USBIP_PORT",
    "USBIP_VERSION",
    "UnexpectedMessage",
    "UnknownCommand",
    "UnsupportedVersion",
    "UrbCommand",
]
