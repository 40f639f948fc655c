"""The README's example device: a user's own emulated device in a few lines."""

from __future__ import annotations

import pytest

from usbipy import Completion, EmulatedDevice, Stall, UsbipServer
from usbipy.client import import_device
from usbipy.client.errors import UrbError
from usbipy.usb import Configuration, Device, Endpoint, Interface, TransferType
from usbipy.usb.requests import Setup


class Counter(EmulatedDevice):
    """A vendor device: bulk IN returns a counter, vendor request 1 resets it."""

    descriptor = Device(
        idVendor=0x1209, idProduct=0x7777, product="Counter",
        configurations=(Configuration(interfaces=(
            Interface(0, 0xFF, endpoints=(Endpoint(0x81, TransferType.BULK, 512),)),
        )),),
    )

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def control_request(self, setup: Setup, data: bytes) -> bytes | None:
        if setup.bmRequestType == 0x40 and setup.bRequest == 1:
            self.count = 0
            return None
        raise Stall

    def transfer(self, endpoint: Endpoint, urb: object) -> Completion:
        self.count += 1
        return Completion(data=self.count.to_bytes(4, "little"))


def test_counter_device(serve) -> None:
    async def test(server: UsbipServer) -> None:
        async with await import_device("127.0.0.1", "1-1", server.port) as dev:
            assert dev.info.idProduct == 0x7777
            await dev.control(0x00, 9, 1, 0, b"")
            assert [(await dev.bulk_in(1, 4)).data[0] for _ in range(3)] == [1, 2, 3]
            await dev.control(0x40, 1, 0, 0, b"")
            assert (await dev.bulk_in(1, 4)).data[0] == 1
            with pytest.raises(UrbError):
                await dev.control(0x40, 2, 0, 0, b"")

    serve(test, [Counter()])
