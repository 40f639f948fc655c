"""usbipy: USB/IP 1.1.1 in Python, wire-exact with the Linux kernel.

The tree says what each part is: ``protocol`` (the sans-IO codec), ``usb``
(the USB spec's vocabulary), ``backends`` (what an exported device is, and
what implements it), ``devices`` (emulated devices), ``linux`` (sysfs,
vhci-hcd, usbip-host), ``server`` and ``client`` (asyncio around the codec)
and ``cli``.
"""

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
from .client import ClientError, ImportRefused, RemoteDevice, UrbError, import_device, list_devices
from .devices import CdcAcm, HidKeyboard, ImageFile, MassStorage
from .errors import UsbipError
from .server import DeviceRegistry, ServerThread, UsbipServer
from .usb import Configuration, Device, Endpoint, Interface, Setup, TransferType

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
    "ServerThread",
    "Setup",
    "Stall",
    "TransferType",
    "UrbError",
    "UrbQueue",
    "UsbipError",
    "UsbipServer",
    "__version__",
    "import_device",
    "list_devices",
]
