"""Devices served by the kernel's usbip-host: the server only hands the socket over.

usbipyd lists every device bound to usbip-host next to its own, reading
sysfs afresh on each request as usbipd does. On import it hands the
client's socket to the kernel, which serves every URB from then on.
"""

from __future__ import annotations

import asyncio

from ..linux import sysfs, usbip_host
from ..linux.usbip_host import StubStatus
from ..protocol import DeviceInfo, OpStatus
from .base import DeviceSource, HandOffDevice

#: usbip_status -> the reply usbipd gives to an import (usbipd.c, recv_request_import)
IMPORT_STATUS = {
    StubStatus.AVAILABLE: OpStatus.OK,
    StubStatus.USED: OpStatus.DEV_BUSY,
    StubStatus.ERROR: OpStatus.DEV_ERR,
}


def import_status(status: StubStatus | None) -> OpStatus:
    """The reply to an import of a device in the kernel's ``status`` (None: unreadable)."""
    return IMPORT_STATUS.get(status, OpStatus.NA) if status is not None else OpStatus.NA


class KernelStubDevice(HandOffDevice):
    """A device bound to usbip-host; its URBs are the kernel's business."""

    def __init__(self, device: sysfs.UsbDevice) -> None:
        self._device = device
        self.busid = device.busid
        self.serial = device.serial

    @property
    def info(self) -> DeviceInfo:
        return self._device.info

    @property
    def status(self) -> StubStatus | None:
        return usbip_host.stub_status(self._device)

    def import_status(self) -> OpStatus:
        return import_status(self.status)

    def hand_off(self, fd: int) -> None:
        usbip_host.hand_off(self._device, fd)

    def take_back(self) -> None:
        usbip_host.disconnect(self._device)


class KernelStubSource(DeviceSource):
    """Every device bound to usbip-host, read in a worker thread."""

    async def devices(self) -> list[KernelStubDevice]:
        found = await asyncio.to_thread(usbip_host.bound_devices)
        return [KernelStubDevice(device) for device in found]
