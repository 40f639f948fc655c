"""usbipy: USB/IP 1.1.1 in Python, wire-exact with the Linux kernel."""

from .devices import (
    CdcAcm,
    Completion,
    EmulatedDevice,
    ExportedDevice,
    HidKeyboard,
    ImageFile,
    MassStorage,
    Stall,
)
from .errors import UsbipError
from .server import DeviceRegistry, ServerThread, UsbipServer

__version__ = "0.1.0"

__all__ = [
    "CdcAcm", "Completion", "DeviceRegistry", "EmulatedDevice", "ExportedDevice",
    "HidKeyboard", "ImageFile", "MassStorage", "ServerThread", "Stall", "UsbipError",
    "UsbipServer", "__version__",
]
