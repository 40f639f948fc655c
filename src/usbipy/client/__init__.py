"""USB/IP clients: the asyncio userspace client, the blocking OP handshake, and
`usbip attach` into vhci-hcd."""

from .errors import ClientError, HostUnreachable, ImportRefused, UrbError
from .userspace import RemoteDevice, import_device, list_devices

__all__ = [
    "ClientError",
    "HostUnreachable",
    "ImportRefused",
    "RemoteDevice",
    "UrbError",
    "import_device",
    "list_devices",
]
