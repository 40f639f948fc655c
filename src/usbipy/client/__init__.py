"""USB/IP clients: the userspace client (asyncio, and its blocking form in
:mod:`usbipy.client.sync`), the blocking OP handshake, and `usbip attach` into
vhci-hcd."""

from typing import TYPE_CHECKING, Any

from .backoff import Backoff
from .errors import (
    Cancelled,
    ClientError,
    DeviceGone,
    HostUnreachable,
    ImportRefused,
    Overflow,
    ServerGone,
    Stalled,
    TlsRefused,
    TransferTimeout,
    UrbError,
)
from .transfers import IsoResult

if TYPE_CHECKING:
    from .userspace import RemoteDevice, connect, import_device, list_devices

#: Loaded when first used: `usbipy attach` and `port` need no asyncio, and a command
#: that starts faster is felt on every call (and in a slow guest, a lot).
_USERSPACE = ("RemoteDevice", "connect", "import_device", "list_devices")


def __getattr__(name: str) -> Any:
    if name in _USERSPACE:
        from . import userspace

        return getattr(userspace, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "Backoff",
    "Cancelled",
    "ClientError",
    "DeviceGone",
    "HostUnreachable",
    "ImportRefused",
    "IsoResult",
    "Overflow",
    "RemoteDevice",
    "ServerGone",
    "Stalled",
    "TlsRefused",
    "TransferTimeout",
    "UrbError",
    "connect",
    "import_device",
    "list_devices",
]
