"""Gadgets on the kernel's usbip-vudc (device mode, `usbipd -e`): the server only
hands the socket over.

A UDC with no gadget bound has nothing to export and is not listed. On
import the client's socket goes to the UDC, and the gadget's function serves
every URB from then on.
"""

from __future__ import annotations

import asyncio

from ..linux import vudc
from ..protocol import DeviceInfo, OpStatus
from .base import DeviceSource, HandOffDevice
from .kernel_stub import import_status


class VudcDevice(HandOffDevice):
    """A gadget bound to a usbip-vudc UDC; its URBs are the kernel's business."""

    via = "usbip-vudc"

    def __init__(self, gadget: vudc.Gadget, info: DeviceInfo) -> None:
        self._gadget = gadget
        self._info = info
        self.busid = gadget.busid

    @property
    def info(self) -> DeviceInfo:
        return self._info

    def import_status(self) -> OpStatus:
        return import_status(self._gadget.status)

    def hand_off(self, fd: int) -> None:
        vudc.hand_off(self._gadget, fd)

    def take_back(self) -> None:
        vudc.disconnect(self._gadget)


class VudcSource(DeviceSource):
    """Every gadget bound to a usbip-vudc UDC, read in a worker thread."""

    async def devices(self) -> list[VudcDevice]:
        found = await asyncio.to_thread(vudc.gadgets)
        return [VudcDevice(g, g.info) for g in found if g.info is not None]
