"""Emulated devices written in Python: the examples to read when writing your own.

A keyboard (HID boot protocol), a serial port (CDC-ACM) with its backends, a
disk (mass storage, SCSI over Bulk-Only) with its image file, and the demo
set that ``usbipyd --demo`` exports.
"""

from .cdc_acm import CdcAcm
from .demo import demo_devices
from .hid import HidKeyboard
from .mass_storage import MassStorage
from .serial_backends import EchoBackend, PtyBackend, SerialBackend
from .storage import ImageFile, StorageError

__all__ = [
    "CdcAcm",
    "EchoBackend",
    "HidKeyboard",
    "ImageFile",
    "MassStorage",
    "PtyBackend",
    "SerialBackend",
    "StorageError",
    "demo_devices",
]
