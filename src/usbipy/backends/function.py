"""A device made of one function, for tests (as httpx's MockTransport).

    device = FunctionDevice(lambda urb: Completion(data=b"\\x12\\x01"))

The function sees every URB, endpoint 0 included, and returns what
:meth:`ExportedDevice.submit` returns: a Completion, or an awaitable of one.
"""

from __future__ import annotations

from collections.abc import Callable

from ..protocol import CmdSubmit, DeviceInfo, Speed
from .base import ExportedDevice, SubmitResult


class FunctionDevice(ExportedDevice):
    """An exported device whose every URB goes to ``handler``."""

    def __init__(self, handler: Callable[[CmdSubmit], SubmitResult], *,
                 idVendor: int = 0x1209, idProduct: int = 0x0000,
                 speed: Speed = Speed.HIGH) -> None:
        self.handler = handler
        self._ids = (idVendor, idProduct, speed)
        #: URBs seen, oldest first.
        self.urbs: list[CmdSubmit] = []
        self.attached = 0
        self.detached = 0

    @property
    def info(self) -> DeviceInfo:
        vid, pid, speed = self._ids
        return DeviceInfo(
            path=f"/sys/devices/platform/usbipy/usb{self.busnum}/{self.busid}",
            busid=self.busid, busnum=self.busnum, devnum=self.devnum, speed=speed,
            idVendor=vid, idProduct=pid, bcdDevice=0, bDeviceClass=0xFF, bDeviceSubClass=0,
            bDeviceProtocol=0, bConfigurationValue=1, bNumConfigurations=1, bNumInterfaces=0,
        )

    async def attach(self) -> None:
        self.attached += 1

    async def detach(self) -> None:
        self.detached += 1

    def submit(self, urb: CmdSubmit) -> SubmitResult:
        self.urbs.append(urb)
        return self.handler(urb)
