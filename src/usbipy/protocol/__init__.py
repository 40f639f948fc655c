"""The USB/IP 1.1.1 codec, sans-IO: no sockets, no asyncio.

Feed bytes to a :class:`ServerConnection` or :class:`ClientConnection`, take
typed messages out, and encode messages back into bytes.
"""

from .connection import (
    DEFAULT_MAX_TRANSFER,
    EOF,
    NEED_DATA,
    ClientConnection,
    Phase,
    ServerConnection,
)
from .constants import (
    MAX_ISO_PACKETS,
    NON_ISO_PACKETS,
    USBIP_VERSION,
    Direction,
    OpCode,
    OpStatus,
    Speed,
    UrbCommand,
)
from .errors import (
    BadDevid,
    BadIsoDescriptors,
    BadLength,
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
)

__all__ = [
    "DEFAULT_MAX_TRANSFER", "EOF", "NEED_DATA", "ClientConnection", "Phase", "ServerConnection",
    "MAX_ISO_PACKETS", "NON_ISO_PACKETS", "USBIP_VERSION", "Direction", "OpCode", "OpStatus",
    "Speed", "UrbCommand",
    "BadDevid", "BadIsoDescriptors", "BadLength", "LocalProtocolError", "ProtocolError",
    "RemoteProtocolError", "TooManyIsoPackets", "UnexpectedMessage", "UnknownCommand",
    "UnsupportedVersion",
    "CmdSubmit", "CmdUnlink", "DeviceInfo", "InterfaceInfo", "IsoPacket", "Message",
    "OpRepDevlist", "OpRepImport", "OpReqDevlist", "OpReqImport", "RetSubmit", "RetUnlink",
]
