"""Emulated devices written in Python: the examples to read when writing your own.

A keyboard (HID boot protocol), a serial port (CDC-ACM) with its backends, a
disk (mass storage, SCSI over Bulk-Only) with its image file, the demo set
that ``usbipyd --demo`` exports, and two isochronous streamers: a headset (USB
Audio 1.0) with its sound sources and sinks, and a webcam (UVC 1.1) with its
test pattern.
"""

from .audio import UsbAudio
from .cdc_acm import CdcAcm
from .demo import demo_devices
from .hid import HidKeyboard
from .mass_storage import MassStorage
from .pattern import TestPattern
from .serial_backends import EchoBackend, PtyBackend, SerialBackend
from .sound import Tone, WavSink, WavSource
from .storage import ImageFile, StorageError
from .webcam import Webcam

__all__ = [
    "CdcAcm",
    "EchoBackend",
    "HidKeyboard",
    "ImageFile",
    "MassStorage",
    "PtyBackend",
    "SerialBackend",
    "StorageError",
    "TestPattern",
    "Tone",
    "UsbAudio",
    "WavSink",
    "WavSource",
    "Webcam",
    "demo_devices",
]
