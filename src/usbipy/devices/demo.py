"""The demo set of emulated devices: a keyboard, a disk and a serial port."""

from __future__ import annotations

from ..backends.base import ExportedDevice
from ..config.options import DEMO_DISK_SIZE
from .cdc_acm import CdcAcm
from .hid import HidKeyboard
from .mass_storage import MassStorage
from .serial_backends import PtyBackend, SerialBackend
from .storage import ImageFile


def demo_devices(*, disk: str | None = None, read_only: bool = False,
                 serial: str = "echo", disk_size: int = DEMO_DISK_SIZE) -> list[ExportedDevice]:
    """Keyboard on 1-1, mass storage on 1-2, CDC-ACM on 1-3.

    With no ``disk`` the mass storage is a blank sparse scratch image.
    ``serial`` is "echo" (loopback) or "pty" (a pseudo-terminal on this host).
    """
    image = (ImageFile(disk, read_only=read_only) if disk is not None
             else ImageFile.scratch(disk_size))
    backend: SerialBackend | None = PtyBackend() if serial == "pty" else None
    return [HidKeyboard(), MassStorage(image), CdcAcm(backend)]
