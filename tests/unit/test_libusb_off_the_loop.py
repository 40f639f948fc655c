"""libusb's blocking calls never stall the server: another client's latency while a
device with slow open, claim, release and device-list calls is imported and released."""

from __future__ import annotations

import asyncio
import time
import types
from typing import Any

import pytest

from usbipy.backends import DeviceSource
from usbipy.backends.libusb import events
from usbipy.backends.libusb.device import LibusbDevice
from usbipy.client import import_device
from usbipy.devices import HidKeyboard
from usbipy.server import ServerThread

from .fake_usb1 import FakeDevice, FakeHandle, FakeUsbError

#: Each blocking libusb call takes this long; on the loop, one would stall every client.
SLOW = 0.3


class SlowHandle(FakeHandle):
    def claimInterface(self, interface: int) -> None:
        time.sleep(SLOW)
        super().claimInterface(interface)

    def releaseInterface(self, interface: int) -> None:
        time.sleep(SLOW)
        super().releaseInterface(interface)

    def close(self) -> None:
        time.sleep(SLOW)
        super().close()


class SlowDevice(FakeDevice):
    def open(self) -> FakeHandle:
        time.sleep(SLOW)
        self.handle = SlowHandle(self)
        return self.handle


class SlowSource(DeviceSource):
    """As LibusbSource: a device list that takes a blocking scan to make."""

    def __init__(self) -> None:
        self.device = LibusbDevice(None, SlowDevice())  # type: ignore[arg-type]

    async def devices(self) -> list[Any]:
        def scan() -> list[Any]:
            time.sleep(SLOW)
            return [self.device]

        return await asyncio.to_thread(scan)


@pytest.fixture(autouse=True)
def fake_usb1(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(events, "usb1", types.SimpleNamespace(
        USBError=FakeUsbError, USBErrorInterrupted=FakeUsbError))


def test_another_clients_latency_while_a_libusb_device_comes_and_goes() -> None:
    source = SlowSource()
    # The server on its own loop and thread, so that a stall there shows here.
    with ServerThread([HidKeyboard()], port=0) as srv:
        assert srv.server is not None
        srv.server.registry.add_source(source)
        registry = srv.server.registry

        async def main() -> list[float]:
            keyboard = await import_device("127.0.0.1", "1-1", srv.port)
            latencies: list[float] = []
            stop = asyncio.Event()

            async def probe() -> None:
                while not stop.is_set():
                    start = time.monotonic()
                    await keyboard.control(0x80, 6, 0x0100, 0, 18)
                    latencies.append(time.monotonic() - start)
                    await asyncio.sleep(0.005)

            prober = asyncio.create_task(probe())
            for _ in range(2):
                remote = await import_device("127.0.0.1", "2-3.1", srv.port)
                assert source.device.is_open
                await remote.close()
                for _ in range(200):  # released in a worker thread: wait for it
                    if registry.owner("2-3.1") is None:
                        break
                    await asyncio.sleep(0.05)
                assert not source.device.is_open and registry.owner("2-3.1") is None
            stop.set()
            await prober
            await keyboard.close()
            return latencies

        latencies = asyncio.run(main())
    # Each import or release blocks a worker for 2-3 x SLOW; the server's loop never waits.
    assert len(latencies) > 20
    assert max(latencies) < SLOW / 2, max(latencies)
