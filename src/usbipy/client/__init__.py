"""USB/IP clients: the asyncio userspace client, the blocking OP handshake, and
`usbip attach` into vhci-hcd."""

from .backoff import Backoff
from .errors import ClientError, HostUnreachable, ImportRefused, ServerGone, UrbError
from .userspace import RemoteDevice, import_device, list_devices

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
