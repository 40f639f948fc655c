"""usbipy: USB/IP 1.1.1 in Python, wire-exact with the Linux kernel.

The tree says what each part is: ``protocol`` (the sans-IO codec), ``usb``
(the USB spec's vocabulary), ``backends`` (what an exported device is, and
what implements it), ``devices`` (emulated devices), ``linux`` (sysfs,
vhci-hcd, usbip-host), ``server`` and ``client`` (asyncio around the codec)
and ``cli``.
"""

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .backends import (
        Completion,
        DeviceSource,
        EmulatedDevice,
        ExportedDevice,
        FunctionDevice,
        HandOffDevice,
        Stall,
        UrbQueue,
    )
    from .client import (
        ClientError,
        ImportRefused,
        RemoteDevice,
        ServerGone,
        Stalled,
        TransferTimeout,
        UrbError,
        connect,
        import_device,
        list_devices,
    )
    from .devices import CdcAcm, HidKeyboard, ImageFile, MassStorage, UsbAudio, Webcam
    from .errors import UsbipError
    from .server import DeviceRegistry, ServerThread, UsbipServer
    from .usb import Configuration, Device, Endpoint, Interface, Setup, TransferType

#: Where each public name lives. Loaded on first use (PEP 562), so that
#: ``import usbipy.protocol`` loads the codec alone: no asyncio, no sockets.
_LAZY = {
    "CdcAcm": ".devices",
    "ClientError": ".client",
    "Completion": ".backends",
    "Configuration": ".usb",
    "Device": ".usb",
    "DeviceRegistry": ".server",
    "DeviceSource": ".backends",
    "EmulatedDevice": ".backends",
    "Endpoint": ".usb",
    "ExportedDevice": ".backends",
    "FunctionDevice": ".backends",
    "HandOffDevice": ".backends",
    "HidKeyboard": ".devices",
    "ImageFile": ".devices",
    "ImportRefused": ".client",
    "Interface": ".usb",
    "MassStorage": ".devices",
    "UsbAudio": ".devices",
    "Webcam": ".devices",
    "RemoteDevice": ".client",
    "ServerGone": ".client",
    "ServerThread": ".server",
    "Setup": ".usb",
    "Stall": ".backends",
    "Stalled": ".client",
    "TransferTimeout": ".client",
    "TransferType": ".usb",
    "UrbError": ".client",
    "UrbQueue": ".backends",
    "UsbipError": ".errors",
    "UsbipServer": ".server",
    "connect": ".client",
    "import_device": ".client",
    "list_devices": ".client",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'usbipy' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)


#: The one place the version is written; pyproject.toml reads it from here.
__version__ = "0.2.0"

__all__ = [
    "CdcAcm",
    "ClientError",
    "Completion",
    "Configuration",
    "Device",
    "DeviceRegistry",
    "DeviceSource",
    "EmulatedDevice",
    "Endpoint",
    "ExportedDevice",
    "FunctionDevice",
    "HandOffDevice",
    "HidKeyboard",
    "ImageFile",
    "ImportRefused",
    "Interface",
    "MassStorage",
    "RemoteDevice",
    "ServerGone",
    "ServerThread",
    "Setup",
    "Stall",
    "Stalled",
    "TransferTimeout",
    "TransferType",
    "UrbError",
    "UrbQueue",
    "UsbAudio",
    "UsbipError",
    "UsbipServer",
    "Webcam",
    "__version__",
    "connect",
    "import_device",
    "list_devices",
]
