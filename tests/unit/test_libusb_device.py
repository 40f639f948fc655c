"""LibusbDevice against a fake python-libusb1: what each URB becomes, and back."""

from __future__ import annotations

import asyncio
import errno
import threading
import types
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from usbipy.backends.base import Completion
from usbipy.backends.libusb import events
from usbipy.backends.libusb.device import LibusbDevice
from usbipy.backends.libusb.status import transfer_errno
from usbipy.backends.libusb.unplug import still_plugged
from usbipy.exports.rules import ExportRule, ExportRules, Via
from usbipy.policy import DeviceSelector
from usbipy.protocol import CmdSubmit, Direction, IsoPacket, Speed

from .fake_usb1 import FakeDevice, FakeHandle, FakeUsbError


@pytest.fixture(autouse=True)
def fake_usb1(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(events, "usb1", types.SimpleNamespace(
        USBError=FakeUsbError, USBErrorInterrupted=FakeUsbError))


def with_device(test: Callable[[LibusbDevice, FakeHandle], Awaitable[None]]) -> None:
    async def main() -> None:
        fake = FakeDevice()
        device = LibusbDevice(None, fake)  # type: ignore[arg-type]
        await device.attach()
        assert fake.handle is not None
        await test(device, fake.handle)

    asyncio.run(main())


def urb(ep: int, direction: Direction, length: int = 0, *, data: bytes = b"", flags: int = 0,
        setup: bytes = bytes(8), iso: list[IsoPacket] | None = None) -> CmdSubmit:
    return CmdSubmit(1, 0x20007, direction, ep, flags, length or len(data), setup, data,
                     0, len(iso) if iso else 0, 0, iso)


async def result(submitted: Any) -> Completion:
    if isinstance(submitted, Completion):
        return submitted
    completion: Completion = await submitted
    return completion


def setup(request_type: int, request: int, value: int, index: int, length: int) -> bytes:
    return bytes([request_type, request]) + value.to_bytes(2, "little") + \
        index.to_bytes(2, "little") + length.to_bytes(2, "little")


def test_device_record_from_the_descriptors() -> None:
    device = LibusbDevice(None, FakeDevice())  # type: ignore[arg-type]
    info = device.info
    assert (info.busid, info.speed, info.devid) == ("2-3.1", Speed.HIGH, (2 << 16) | 7)
    assert (info.idVendor, info.idProduct, info.bNumConfigurations) == (0x1209, 0xBEEF, 2)
    assert [(i.bInterfaceClass, i.bInterfaceSubClass) for i in info.interfaces] == [(0xFF, 0)]


def test_import_takes_the_interfaces_and_release_gives_them_back() -> None:
    async def test(device: LibusbDevice, handle: FakeHandle) -> None:
        assert handle.calls == [("detachKernelDriver", 0), ("claimInterface", 0)]
        handle.calls.clear()
        await device.detach()
        assert handle.calls == [("releaseInterface", 0), ("attachKernelDriver", 0), ("close",)]

    with_device(test)


def test_bulk_in_interrupt_and_out() -> None:
    async def test(device: LibusbDevice, handle: FakeHandle) -> None:
        pending = device.submit(urb(1, Direction.IN, 512))
        [transfer] = handle.submitted
        assert (transfer.kind, transfer.endpoint, transfer.request) == ("bulk", 0x81, 512)
        transfer.complete(data=b"x" * 100)
        assert (await result(pending)).data == b"x" * 100

        pending = device.submit(urb(3, Direction.IN, 8))
        assert (handle.submitted[-1].kind, handle.submitted[-1].endpoint) == ("interrupt", 0x83)
        handle.submitted[-1].complete(data=b"\x01")
        assert (await result(pending)).data == b"\x01"

        pending = device.submit(urb(2, Direction.OUT, data=b"y" * 1024, flags=0x40))
        out = handle.submitted[-1]
        assert (out.kind, out.endpoint, out.request, out.add_zero_packet) == (
            "bulk", 0x02, b"y" * 1024, True)
        out.complete(actual_length=1000)
        assert (await result(pending)).actual_length == 1000

    with_device(test)


def test_short_not_ok_is_remote_io_as_in_the_kernel() -> None:
    async def test(device: LibusbDevice, handle: FakeHandle) -> None:
        pending = device.submit(urb(1, Direction.IN, 512, flags=0x1))
        handle.submitted[-1].complete(data=b"z" * 13)
        done = await result(pending)
        assert (done.status, done.data) == (-errno.EREMOTEIO, b"z" * 13)
        pending = device.submit(urb(1, Direction.IN, 512, flags=0x1))
        handle.submitted[-1].complete(data=b"z" * 512)
        assert (await result(pending)).status == 0

    with_device(test)


@pytest.mark.parametrize("status, expected", [
    (1, -errno.EPROTO), (2, -errno.ETIMEDOUT), (4, -errno.EPIPE), (5, -errno.ENODEV),
    (6, -errno.EOVERFLOW),
])
def test_transfer_status_becomes_the_kernel_errno(status: int, expected: int) -> None:
    assert transfer_errno(status) == expected

    async def test(device: LibusbDevice, handle: FakeHandle) -> None:
        pending = device.submit(urb(1, Direction.IN, 64))
        handle.submitted[-1].complete(status=status)
        assert (await result(pending)).status == expected

    with_device(test)


def test_an_endpoint_the_setting_lacks() -> None:
    async def test(device: LibusbDevice, handle: FakeHandle) -> None:
        assert (await result(device.submit(urb(4, Direction.IN, 64)))).status == -errno.ENOENT
        assert handle.submitted == []

    with_device(test)


def test_control_passes_through_except_what_the_stub_intercepts() -> None:
    async def test(device: LibusbDevice, handle: FakeHandle) -> None:
        pending = device.submit(urb(0, Direction.IN, 18, setup=setup(0x80, 6, 0x100, 0, 18)))
        control = handle.submitted[-1]
        assert (control.kind, control.setup, control.request) == ("control", (0x80, 6, 0x100, 0),
                                                                  18)
        control.complete(data=b"\x12\x01" + bytes(16))
        assert len((await result(pending)).data) == 18
        handle.calls.clear()

        intercepted = [
            (setup(0x00, 9, 1, 0, 0), []),  # already configuration 1: left alone
            (setup(0x00, 9, 2, 0, 0), [("releaseInterface", 0), ("setConfiguration", 2),
                                       ("claimInterface", 0)]),
            (setup(0x00, 9, 1, 0, 0), [("releaseInterface", 0), ("setConfiguration", 1),
                                       ("claimInterface", 0)]),
            (setup(0x01, 11, 1, 0, 0), [("setInterfaceAltSetting", 0, 1)]),
            (setup(0x02, 1, 0, 0x81, 0), [("clearHalt", 0x81)]),
            (setup(0x23, 3, 4, 1, 0), [("resetDevice",)]),
        ]
        for request, calls in intercepted:
            handle.calls.clear()
            done = await result(device.submit(urb(0, Direction.OUT, setup=request)))
            assert done.status == 0 and handle.calls == calls
        assert len(handle.submitted) == 1  # none of them went raw to the device
        # CLEAR_FEATURE(ENDPOINT_HALT) of the default pipe goes to the device as it is
        # (usb_clear_halt sends it so; libusb_clear_halt refuses endpoint 0)
        handle.calls.clear()
        ep0_halt = device.submit(urb(0, Direction.OUT, setup=setup(0x02, 1, 0, 0, 0)))
        control = handle.submitted[-1]
        assert (control.kind, control.setup, handle.calls) == ("control", (0x02, 1, 0, 0), [])
        control.complete()
        assert (await result(ep0_halt)).status == 0
        # alt setting 1 brought its iso endpoint
        device.submit(urb(4, Direction.IN, 1024, iso=[IsoPacket(0, 1024)]))
        assert handle.submitted[-1].kind == "iso"

    with_device(test)


def test_iso_in_is_packed_and_iso_out_gathered() -> None:
    async def test(device: LibusbDevice, handle: FakeHandle) -> None:
        await result(device.submit(urb(0, Direction.OUT, setup=setup(0x01, 11, 1, 0, 0))))
        packets = [IsoPacket(0, 1024), IsoPacket(1024, 1024), IsoPacket(2048, 1024)]
        pending = device.submit(urb(4, Direction.IN, 3072, iso=packets))
        iso = handle.submitted[-1]
        assert (iso.request, iso.iso_lengths) == (3072, [1024, 1024, 1024])
        iso.complete(iso=[(0, b"a" * 1000), (0, b"b" * 1024), (1, b"")])
        done = await result(pending)
        assert done.data == b"a" * 1000 + b"b" * 1024  # back to back, as usbip sends it
        assert [(p.offset, p.length, p.actual_length, p.status) for p in done.iso_packets
                or []] == [(0, 1024, 1000, 0), (1024, 1024, 1024, 0),
                           (2048, 1024, 0, -errno.EPROTO)]
        assert done.error_count == 1

    with_device(test)


def test_iso_out_packets_at_their_own_offsets() -> None:
    async def test(device: LibusbDevice, handle: FakeHandle) -> None:
        handle.device.configs[0].interfaces[0][0].endpoints.append(
            type(handle.device.configs[0].interfaces[0][0].endpoints[0])(0x05, 1))
        await device.detach()
        await device.attach()
        handle = device._handle
        data = b"A" * 10 + b"-" * 6 + b"B" * 10
        pending = device.submit(urb(5, Direction.OUT, data=data,
                                    iso=[IsoPacket(0, 10), IsoPacket(16, 10)]))
        iso = handle.submitted[-1]
        assert iso.request == b"A" * 10 + b"B" * 10
        iso.complete(iso=[(0, b"A" * 10), (0, b"B" * 10)])
        assert (await result(pending)).actual_length == 20

    with_device(test)


def test_unlink_cancels_the_transfer() -> None:
    async def test(device: LibusbDevice, handle: FakeHandle) -> None:
        pending = device.submit(urb(1, Direction.IN, 512))
        assert isinstance(pending, asyncio.Future)
        pending.cancel()
        await asyncio.sleep(0)
        transfer = handle.submitted[-1]
        assert transfer.cancelled
        transfer.complete(status=3)  # TRANSFER_CANCELLED arrives later
        await asyncio.sleep(0)
        assert pending.cancelled() and device._transfers == {}

    with_device(test)


def test_unplug_fails_the_urbs_and_drops_the_client() -> None:
    async def test(device: LibusbDevice, handle: FakeHandle) -> None:
        dropped: list[bool] = []
        device.drop_client = lambda: dropped.append(True)
        first = device.submit(urb(1, Direction.IN, 512))
        second = device.submit(urb(1, Direction.IN, 512))
        handle.submitted[0].complete(status=5)
        assert (await result(first)).status == -errno.ENODEV
        assert device.gone and dropped == []  # one URB still out: answer it first
        handle.submitted[1].complete(status=5)
        assert (await result(second)).status == -errno.ENODEV
        await asyncio.sleep(0)
        assert dropped == [True]
        assert (await result(device.submit(urb(1, Direction.IN, 8)))).status == -errno.ENODEV

    with_device(test)


def test_a_submit_that_finds_the_device_gone() -> None:
    async def test(device: LibusbDevice, handle: FakeHandle) -> None:
        handle.submit_error = -4
        assert (await result(device.submit(urb(1, Direction.IN, 8)))).status == -errno.ENODEV
        assert device.gone

    with_device(test)


def test_an_idle_unplug_found_by_the_check_fails_pending_urbs() -> None:
    async def test(device: LibusbDevice, handle: FakeHandle) -> None:
        dropped: list[bool] = []
        device.drop_client = lambda: dropped.append(True)
        pending = device.submit(urb(1, Direction.IN, 512))
        device.unplugged()
        transfer = handle.submitted[-1]
        assert transfer.cancelled
        transfer.complete(status=3)  # the cancellation comes back...
        done = await result(pending)
        assert done.status == -errno.ENODEV  # ...and is answered as a gone device
        await asyncio.sleep(0)
        assert dropped == [True]

    with_device(test)


def test_the_check_asks_sysfs_whether_the_device_is_still_there(fake: object) -> None:
    from .fake_sysfs import FakeSysfs
    assert isinstance(fake, FakeSysfs)
    path = fake.add_device("2-3.1", 0x1209, 0xBEEF)
    (path / "devnum").write_text("7\n")
    device = LibusbDevice(None, FakeDevice())  # type: ignore[arg-type]
    assert still_plugged(device.busid, device.devnum) is True
    (path / "devnum").write_text("8\n")  # replugged: another device now
    assert still_plugged(device.busid, device.devnum) is False
    (fake.devices / "2-3.1").unlink()
    assert still_plugged(device.busid, device.devnum) is False


def test_a_plain_error_from_a_device_being_unplugged_is_enodev(fake: object) -> None:
    from .fake_sysfs import FakeSysfs
    assert isinstance(fake, FakeSysfs)
    (fake.add_device("2-3.1", 0x1209, 0xBEEF) / "devnum").write_text("7\n")

    async def test(device: LibusbDevice, handle: FakeHandle) -> None:
        pending = device.submit(urb(1, Direction.IN, 512))
        handle.submitted[-1].complete(status=1)  # TRANSFER_ERROR, device still there
        assert (await result(pending)).status == -errno.EPROTO
        assert not device.gone

        def gone(interface: int) -> bool:
            raise FakeUsbError(-4)

        handle.kernelDriverActive = gone  # type: ignore[method-assign]
        pending = device.submit(urb(1, Direction.IN, 512))
        handle.submitted[-1].complete(status=1)  # the same error, while unplugging
        # (looked at again a moment later, when usbfs knows)
        assert (await result(pending)).status == -errno.ENODEV
        assert device.gone

    with_device(test)


def test_usbipyd_names_libusb_rules_it_cannot_serve(caplog: pytest.LogCaptureFixture) -> None:
    from usbipy.server import service

    rules = ExportRules([ExportRule(DeviceSelector(busid=("2-1",)), Via.LIBUSB),
                         ExportRule.for_device("1d6b:0104", Via.LIBUSB)])
    with caplog.at_level("WARNING", logger="usbipyd"):
        service._unservable(rules, "python-libusb1 is not installed: pip install "
                                   "'usbipy[libusb]'")
    assert [r.getMessage() for r in caplog.records] == [
        "not exporting export busid=2-1 via libusb: python-libusb1 is not installed: pip "
        "install 'usbipy[libusb]'",
        "not exporting 1d6b:0104: python-libusb1 is not installed: pip install "
        "'usbipy[libusb]'",
    ]


def test_a_rule_that_matches_nothing_is_named_once(caplog: pytest.LogCaptureFixture) -> None:
    from usbipy.backends.libusb.source import LibusbSource

    rules = ExportRules([ExportRule(DeviceSelector(busid=("9-9",)), Via.LIBUSB),
                         ExportRule(DeviceSelector(busid=("9-*",)), Via.LIBUSB)])
    source = LibusbSource(lambda: rules)
    with caplog.at_level("WARNING", logger="usbipy.libusb"):
        source._warn_unmatched(rules, {})
        source._warn_unmatched(rules, {})
    # (a pattern names no one device: its matching nothing now is no news)
    assert [r.getMessage() for r in caplog.records] == [
        "not exporting busid 9-9: no such device is plugged in"]
    source.close()


def test_a_release_waits_for_an_intercepted_request_still_running() -> None:
    """SET_CONFIGURATION in a worker thread, then the client goes: the handle is closed
    after that call, never under it."""
    import time

    class SlowConfigHandle(FakeHandle):
        def setConfiguration(self, value: int) -> None:
            time.sleep(0.2)
            super().setConfiguration(value)

    class SlowConfigDevice(FakeDevice):
        def open(self) -> FakeHandle:
            self.handle = SlowConfigHandle(self)
            return self.handle

    async def main() -> None:
        fake = SlowConfigDevice()
        device = LibusbDevice(None, fake)  # type: ignore[arg-type]
        await device.attach()
        assert fake.handle is not None
        fake.handle.calls.clear()
        pending = device.submit(urb(0, Direction.OUT, setup=setup(0x00, 9, 2, 0, 0)))
        task = asyncio.ensure_future(result(pending))
        await asyncio.sleep(0.01)  # the request is running in its thread
        task.cancel()  # as the server does when the client goes
        await device.detach()
        names = [call[0] for call in fake.handle.calls]
        assert names.index("setConfiguration") < names.index("close"), names
        assert names[-1] == "close"
        device.close()

    asyncio.run(main())


def test_a_device_being_opened_counts_as_open() -> None:
    """A scan must not throw away libusb's context while an import opens a device."""
    import threading

    opening = threading.Event()
    proceed = threading.Event()

    class SlowOpenDevice(FakeDevice):
        def open(self) -> FakeHandle:
            opening.set()
            proceed.wait(5)
            return super().open()

    async def main() -> None:
        device = LibusbDevice(None, SlowOpenDevice())  # type: ignore[arg-type]
        attach = asyncio.ensure_future(device.attach())
        await asyncio.get_running_loop().run_in_executor(None, opening.wait, 5)
        assert device.is_open  # opening: what LibusbSource.scan asks
        proceed.set()
        await attach
        assert device.is_open
        await device.detach()
        assert not device.is_open
        device.close()

    asyncio.run(main())


def test_an_unplug_grace_period_never_reaches_the_next_client(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from usbipy.backends.libusb import device as device_module

    monkeypatch.setattr(device_module, "CANCEL_TIMEOUT", 0.3)

    async def test(device: LibusbDevice, handle: FakeHandle) -> None:
        device.drop_client = lambda: None
        first = device.submit(urb(1, Direction.IN, 512))
        device.unplugged()  # a false alarm (a sysfs read that failed), say
        handle.submitted[-1].complete(status=3)  # the cancellation comes back
        await result(first)
        await device.detach()
        await device.attach()  # the device is still there: the next client imports it
        assert device._device.handle is not None
        pending = device.submit(urb(1, Direction.IN, 512))
        await asyncio.sleep(0.5)  # past the first client's grace period
        assert isinstance(pending, asyncio.Future) and not pending.done()
        await device.detach()
        device.close()

    with_device(test)


class GatedHaltDevice(FakeDevice):
    """clearHalt waits for ``gate`` (the libusb call under way); setInterfaceAltSetting
    raises when ``broken``."""

    def __init__(self, broken: bool = False) -> None:
        super().__init__()
        self.gate = threading.Event()
        self.broken = broken

    def open(self) -> FakeHandle:
        gate, broken = self.gate, self.broken

        class Handle(FakeHandle):
            def clearHalt(self, endpoint: int) -> None:
                gate.wait(10)
                super().clearHalt(endpoint)

            def setInterfaceAltSetting(self, interface: int, alt: int) -> None:
                if broken:
                    raise RuntimeError("a bug in a libusb call")
                super().setInterfaceAltSetting(interface, alt)

        self.handle = Handle(self)
        return self.handle


HALT = setup(0x02, 1, 0, 0x81, 0)  # CLEAR_FEATURE(ENDPOINT_HALT) of endpoint 0x81
GET_DEVICE = setup(0x80, 6, 0x100, 0, 18)
GET_STATUS = setup(0x80, 0, 0, 0, 2)


def gated(test: Callable[[LibusbDevice, GatedHaltDevice], Awaitable[None]],
          broken: bool = False) -> None:
    async def main() -> None:
        fake = GatedHaltDevice(broken)
        device = LibusbDevice(None, fake)  # type: ignore[arg-type]
        await device.attach()
        try:
            await test(device, fake)
        finally:
            fake.gate.set()
            await device.detach()
            device.close()

    asyncio.run(main())


def submit(device: LibusbDevice, request: bytes, length: int = 0) -> asyncio.Future[Completion]:
    direction = Direction.IN if request[0] & 0x80 else Direction.OUT
    return asyncio.ensure_future(result(device.submit(urb(0, direction, length,
                                                           setup=request))))


def test_control_requests_after_an_intercepted_one_wait_for_it() -> None:
    """ep0 serves its requests in order (usbtest's test 10 checks it): a request queued
    behind CLEAR_FEATURE(ENDPOINT_HALT), which a libusb call does in a worker thread,
    reaches the device only once that call has returned, and completes after it; one
    unlinked while it waits never reaches the device."""
    async def test(device: LibusbDevice, fake: GatedHaltDevice) -> None:
        handle = fake.handle
        assert handle is not None
        done: list[str] = []
        halt = submit(device, HALT)
        halt.add_done_callback(lambda _: done.append("halt"))
        get = submit(device, GET_DEVICE, 18)
        get.add_done_callback(lambda _: done.append("get"))
        dropped = submit(device, GET_STATUS, 2)
        await asyncio.sleep(0.05)
        assert handle.submitted == []  # both wait behind the halt's call
        dropped.cancel()  # unlinked while it waits
        fake.gate.set()
        await asyncio.wait_for(halt, 10)
        await asyncio.sleep(0.01)  # (the queue moves on in a callback)
        assert done == ["halt"]
        [control] = handle.submitted
        assert control.setup == (0x80, 6, 0x100, 0)
        control.complete(data=b"\x12\x01" + bytes(16))
        assert len((await get).data) == 18
        assert done == ["halt", "get"]
        assert len(handle.submitted) == 1  # the unlinked one never went out
        # the queue drained: the next request goes to the device at once
        submit(device, GET_DEVICE, 18)
        await asyncio.sleep(0)
        assert len(handle.submitted) == 2

    gated(test)


def test_unlinking_the_last_queued_request_lets_nothing_overtake() -> None:
    async def test(device: LibusbDevice, fake: GatedHaltDevice) -> None:
        handle = fake.handle
        assert handle is not None
        submit(device, HALT)
        submit(device, GET_DEVICE, 18)
        last = submit(device, GET_STATUS, 2)
        await asyncio.sleep(0.02)
        last.cancel()
        await asyncio.sleep(0.02)
        submit(device, GET_DEVICE, 18)
        await asyncio.sleep(0.05)
        assert handle.submitted == []  # the halt's call still runs: nothing went out

    gated(test)


def test_unlinking_the_intercepted_request_holds_the_queue_until_its_call_returns() -> None:
    async def test(device: LibusbDevice, fake: GatedHaltDevice) -> None:
        handle = fake.handle
        assert handle is not None
        halt = submit(device, HALT)
        submit(device, GET_DEVICE, 18)
        await asyncio.sleep(0.02)
        halt.cancel()  # the client gave up on it; the libusb call goes on
        await asyncio.sleep(0.05)
        assert handle.submitted == []
        fake.gate.set()
        await asyncio.sleep(0.1)
        assert len(handle.submitted) == 1

    gated(test)


def test_a_queued_request_whose_call_raises_is_answered_and_the_queue_goes_on() -> None:
    async def test(device: LibusbDevice, fake: GatedHaltDevice) -> None:
        handle = fake.handle
        assert handle is not None
        halt = submit(device, HALT)
        alt = submit(device, setup(0x01, 11, 1, 0, 0))  # SET_INTERFACE: raises
        status = submit(device, GET_STATUS, 2)
        fake.gate.set()
        await asyncio.wait_for(halt, 10)
        with pytest.raises(RuntimeError):
            await asyncio.wait_for(alt, 10)  # (the server answers it EPROTO)
        await asyncio.sleep(0.01)
        [control] = handle.submitted
        control.complete(data=b"\0\0")
        assert (await asyncio.wait_for(status, 10)).data == b"\0\0"

    gated(test, broken=True)
