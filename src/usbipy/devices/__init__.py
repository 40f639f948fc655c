"""Exported devices: the interface, and the emulated devices written in Python."""

from .base import Completion, ExportedDevice, SubmitResult
from .cdc_acm import CdcAcm
from .descriptors import Configuration, Device, Endpoint, Interface, TransferType
from .emulated import EmulatedDevice, Setup, Stall, UrbQueue
from .hid import HidKeyboard
from .mass_storage import MassStorage
from .serial_backends import EchoBackend, PtyBackend, SerialBackend
from .storage import ImageFile, StorageError

__all__ = [
    "Completion", "ExportedDevice", "SubmitResult",
    "CdcAcm", "HidKeyboard", "MassStorage",
    "Configuration", "Device", "Endpoint", "Interface", "TransferType",
    "EmulatedDevice", "Setup", "Stall", "UrbQueue",
    "EchoBackend", "PtyBackend", "SerialBackend",
    "ImageFile", "StorageError",
]
