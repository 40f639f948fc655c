"""What an exported device is, and what implements it.

``base`` is the one interface the server talks to (:class:`ExportedDevice`,
:class:`HandOffDevice`, :class:`DeviceSource`); ``emulated`` answers the
standard requests for devices written in Python; ``function`` is a device
made of one function, for tests; ``kernel_stub`` hands devices to the
kernel's usbip-host; ``libusb`` exports real devices through libusb.
"""

from .base import (
    AnyDevice,
    Completion,
    DeviceSource,
    ExportedDevice,
    HandOffDevice,
    SubmitResult,
)
from .emulated import EmulatedDevice, Stall, UrbQueue
from .function import FunctionDevice

__all__ = [
    "AnyDevice",
    "Completion",
    "DeviceSource",
    "EmulatedDevice",
    "ExportedDevice",
    "FunctionDevice",
    "HandOffDevice",
    "Stall",
    "SubmitResult",
    "UrbQueue",
]
