"""USB/IP clients: the userspace client (and, on Linux, vhci-hcd through sysfs)."""

from .userspace import (
    ClientError,
    ImportRefused,
    RemoteDevice,
    UrbError,
    import_device,
    list_devices,
)

__all__ = ["ClientError", "ImportRefused", "RemoteDevice", "UrbError", "import_device",
           "list_devices"]
