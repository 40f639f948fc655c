"""The README's example device: a user's own emulated device in a few lines."""

from __future__ import annotations

import pytest

from usbipy import Completion, EmulatedDevice, FunctionDevice, Stall, UsbipServer
from usbipy.client import import_device
from usbipy.client.errors import UrbError
from usbipy.protocol import CmdSubmit
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


BOS = bytes.fromhex("050f0c0001" "0710020600000000")[:12]


class Composite(EmulatedDevice):
    """Two vendor interfaces and a BOS descriptor, none of it routed by hand."""

    descriptor = Device(
        idVendor=0x1209, idProduct=0x7778, bcdUSB=0x0210,
        configurations=(Configuration(interfaces=(
            Interface(0, 0xFF, endpoints=(Endpoint(0x81, TransferType.BULK, 512),)),
            Interface(1, 0xFF, endpoints=(Endpoint(0x82, TransferType.BULK, 512),)),
        )),),
    )

    def control_request(self, setup: Setup, data: bytes) -> bytes | None:
        if setup.bRequest == 6 and setup.descriptor_type == 0x0F:  # GET_DESCRIPTOR(BOS)
            return BOS
        raise Stall

    def interface_request(self, interface: int, setup: Setup, data: bytes) -> bytes | None:
        if setup.bmRequestType == 0xC1 and setup.bRequest == 1:
            return bytes((interface,))
        raise Stall


def test_unknown_descriptors_and_interface_requests_reach_the_device(serve) -> None:
    async def test(server: UsbipServer) -> None:
        async with await import_device("127.0.0.1", "1-1", server.port) as dev:
            assert await dev.control(0x80, 6, 0x0F00, 0, 255) == BOS  # not a stall
            with pytest.raises(UrbError):  # interfaces exist only once configured
                await dev.control(0xC1, 1, 0, 1, 1)
            await dev.control(0x00, 9, 1, 0, b"")
            assert await dev.control(0xC1, 1, 0, 0, 1) == b"\x00"
            assert await dev.control(0xC1, 1, 0, 1, 1) == b"\x01"
            with pytest.raises(UrbError):  # no interface 2: stalled before the device
                await dev.control(0xC1, 1, 0, 2, 1)

    serve(test, [Composite()])


def test_a_function_device_sees_every_urb(serve) -> None:
    def handler(urb: CmdSubmit) -> Completion:
        return Completion(data=b"\x12\x01" if urb.ep == 0 else b"")

    device = FunctionDevice(handler)

    async def test(server: UsbipServer) -> None:
        async with await import_device("127.0.0.1", "1-1", server.port) as dev:
            assert await dev.control(0x80, 6, 0x0100, 0, 18) == b"\x12\x01"
            assert (await dev.bulk_in(1, 4)).data == b""
        assert device.attached == 1
        assert [(u.ep, u.transfer_buffer_length) for u in device.urbs] == [(0, 18), (1, 4)]

    serve(test, [device])
    assert device.detached == 1
