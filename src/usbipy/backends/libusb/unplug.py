"""Telling an unplugged device from a failing one.

When a device is pulled, the host controller fails its URBs with a plain
error a moment before usbfs answers ENODEV, and before sysfs and libusb's
device list catch up (without a udev daemon libusb's list never does).
"""

from __future__ import annotations

from typing import Any

from ...linux import sysfs
from . import events
from .status import LIBUSB_ERROR_NO_DEVICE

#: How long after a plain transfer error to look whether the device was unplugged.
UNPLUG_SETTLE = 0.25


def handle_gone(handle: Any, interface: int) -> bool:
    """Whether usbfs says the device behind ``handle`` is gone (it answers ENODEV at once)."""
    if handle is None:
        return True
    try:
        handle.kernelDriverActive(interface)
    except events.usb1.USBError as exc:
        return bool(exc.value == LIBUSB_ERROR_NO_DEVICE)
    return False


def still_plugged(busid: str, devnum: int) -> bool | None:
    """On Linux, whether the device at ``busid`` is still the one with ``devnum``
    (sysfs knows at once); None where there is no sysfs."""
    if not sysfs.usb_devices_dir().is_dir():
        return None
    try:
        return int(sysfs.read_attr(sysfs.usb_devices_dir() / busid / "devnum")) == devnum
    except (sysfs.SysfsError, ValueError):
        return False
