"""USB/IP clients: the asyncio userspace client, the blocking OP handshake, and
`usbip attach` into vhci-hcd."""

from typing import TYPE_CHECKING, Any

from .backoff import Backoff
from .errors import ClientError, HostUnreachable, ImportRefused, ServerGone, UrbError

if TYPE_CHECKING:
    from .userspace import RemoteDevice, import_device, list_devices

#: Loaded when first used: `usbipy attach` and `port` need no asyncio, and a command
#: that starts faster is felt on every call (and in a slow guest, a lot).
_USERSPACE = ("RemoteDevice", "import_device", "list_devices")


def __getattr__(name: str) -> Any:
    if name in _USERSPACE:
        from . import userspace

        return getattr(userspace, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "Backoff",
    "ClientError",
    "HostUnreachable",
    "ImportRefused",
    "RemoteDevice",
    "ServerGone",
    "UrbError",
    "import_device",
    "list_devices",
]
