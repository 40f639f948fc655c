"""Every emulated device forgets its endpoints' state when it is reset or configured
again (USB 2.0, 9.1.1.5): an answer pending before, then SET_CONFIGURATION (or a
port reset, or SET_INTERFACE where there are alternates), then a new request gets
a fresh answer, never the old one."""

from __future__ import annotations

import asyncio
import struct
import threading
from collections.abc import Callable

import pytest

from tests.helpers import urb
from tests.unit.test_webcam import COMMIT, HOST, PROBE, VS, Frames, check_numbers, probe
from usbipy.backends.base import Completion, SubmitResult
from usbipy.backends.emulated import EmulatedDevice
from usbipy.client import import_device
from usbipy.devices import CdcAcm, HidKeyboard, ImageFile, MassStorage
from usbipy.devices.audio import UsbAudio
from usbipy.devices.sound import Tone
from usbipy.devices.webcam import BULK_PAYLOAD, EP_VIDEO, Webcam
from usbipy.protocol import Direction, IsoPacket
from usbipy.protocol.constants import ESHUTDOWN
from usbipy.server import UsbipServer
from usbipy.usb import video as uvc
from usbipy.usb.requests import PORT_REQUEST_TYPE, PORT_RESET, SET_FEATURE

CONFIGURE = struct.pack("<BBHHH", 0x00, 9, 1, 0, 0)  # SET_CONFIGURATION(1)
#: usbip-host turns the root hub's SET_FEATURE(PORT_RESET) into a device reset
PORT_RESET_SETUP = struct.pack("<BBHHH", PORT_REQUEST_TYPE, SET_FEATURE, PORT_RESET, 0, 0)

_seqnum = iter(range(1, 1 << 30))


def control(device: EmulatedDevice, setup: bytes, data: bytes = b"") -> Completion:
    direction = Direction.IN if setup[0] & 0x80 else Direction.OUT
    length = struct.unpack_from("<H", setup, 6)[0]
    result = device.submit(urb(next(_seqnum), 0, direction, length, data=data, setup=setup))
    assert isinstance(result, Completion)
    return result


def request(bm: int, request: int, value: int = 0, index: int = 0, length: int = 0) -> bytes:
    return struct.pack("<BBHHH", bm, request, value, index, length)


def bulk(device: EmulatedDevice, address: int, length: int = 0, data: bytes = b""
         ) -> SubmitResult:
    direction = Direction.IN if address & 0x80 else Direction.OUT
    return device.submit(urb(next(_seqnum), address & 0x7F, direction, length, data=data))


async def done(result: SubmitResult) -> Completion:
    if isinstance(result, Completion):
        return result
    return await asyncio.wait_for(result, 10)


#: How each test resets the device: configured again, or reset through its port
#: and then configured (what usb-storage's error recovery does).
def _configure_again(device: EmulatedDevice) -> None:
    control(device, CONFIGURE)


def _port_reset(device: EmulatedDevice) -> None:
    control(device, PORT_RESET_SETUP)
    control(device, CONFIGURE)


RESETS: dict[str, Callable[[EmulatedDevice], None]] = {
    "set configuration": _configure_again,
    "port reset": _port_reset,
}


# --- mass storage (Bulk-Only Transport) -----------------------------------------------

def cbw(tag: int, length: int, host_in: bool, cdb: bytes) -> bytes:
    return struct.pack("<IIIBBB16s", 0x43425355, tag, length, 0x80 if host_in else 0, 0,
                       len(cdb), cdb)


def csw_tag(completion: Completion) -> int:
    signature, tag, _residue, _status = struct.unpack("<IIIB", completion.data)
    assert signature == 0x53425355
    return int(tag)


TEST_UNIT_READY = bytes(6)
SYNCHRONIZE_CACHE = bytes((0x35,)) + bytes(9)


@pytest.mark.parametrize("reset", sorted(RESETS))
def test_a_disk_answers_the_cbw_after_a_reset_with_its_own_csw(reset: str) -> None:
    """The CSW queued for a command before the reset is not the answer to the next
    CBW: with it, usb-storage sees the wrong tag and resets again, and again."""
    async def main() -> None:
        disk = MassStorage(ImageFile.scratch(1 << 20))
        await disk.attach()
        control(disk, CONFIGURE)
        # an IN URB waiting for a CSW when the reset comes ends as on a disabled pipe
        await done(bulk(disk, 0x02, data=cbw(0x5C3, 0, False, TEST_UNIT_READY)))
        assert csw_tag(await done(bulk(disk, 0x81, 13))) == 0x5C3
        waiting = bulk(disk, 0x81, 13)
        RESETS[reset](disk)
        assert (await done(waiting)).status == ESHUTDOWN
        # tag 0x5c4: its CSW is queued, and the host never reads it (it timed out)
        await done(bulk(disk, 0x02, data=cbw(0x5C4, 0, False, TEST_UNIT_READY)))
        RESETS[reset](disk)
        await done(bulk(disk, 0x02, data=cbw(0x5C5, 0, False, TEST_UNIT_READY)))
        assert csw_tag(await done(bulk(disk, 0x81, 13))) == 0x5C5
        disk.close()

    asyncio.run(main())


def test_a_flush_under_way_at_a_reset_queues_no_csw_after_it() -> None:
    async def main() -> None:
        disk = MassStorage(ImageFile.scratch(1 << 20))
        flushing, release, flushed = threading.Event(), threading.Event(), threading.Event()
        real_flush = disk.storage.flush

        def slow_flush() -> None:
            flushing.set()
            release.wait(10)
            real_flush()
            flushed.set()

        disk.storage.flush = slow_flush  # type: ignore[method-assign]
        await disk.attach()
        control(disk, CONFIGURE)
        await done(bulk(disk, 0x02, data=cbw(7, 0, False, SYNCHRONIZE_CACHE)))
        await asyncio.to_thread(flushing.wait, 10)
        RESETS["port reset"](disk)
        release.set()
        await asyncio.to_thread(flushed.wait, 10)
        for _ in range(10):  # (the flush's callback comes back through the loop)
            await asyncio.sleep(0)
        await done(bulk(disk, 0x02, data=cbw(8, 0, False, TEST_UNIT_READY)))
        assert csw_tag(await done(bulk(disk, 0x81, 13))) == 8
        nothing = bulk(disk, 0x81, 13)
        await asyncio.sleep(0.05)
        assert isinstance(nothing, asyncio.Future) and not nothing.done()
        nothing.cancel()
        disk.close()

    asyncio.run(main())


# --- HID keyboard ----------------------------------------------------------------------

@pytest.mark.parametrize("reset", sorted(RESETS))
def test_a_keyboard_comes_back_in_report_protocol_with_no_key_down(reset: str) -> None:
    async def main() -> None:
        keyboard = HidKeyboard()
        await keyboard.attach()
        control(keyboard, CONFIGURE)
        control(keyboard, request(0x21, 0x0B, 0, 0))  # SET_PROTOCOL(boot)
        control(keyboard, request(0x21, 0x0A, 0x7D00, 0))  # SET_IDLE(500 ms)
        keyboard.press(0x04)  # "a", held
        assert (await done(bulk(keyboard, 0x81, 8))).data == bytes((0, 0, 4, 0, 0, 0, 0, 0))
        waiting = bulk(keyboard, 0x81, 8)
        RESETS[reset](keyboard)
        assert (await done(waiting)).status == ESHUTDOWN
        assert control(keyboard, request(0xA1, 0x03, 0, 0, 1)).data == b"\x01"  # report
        assert control(keyboard, request(0xA1, 0x02, 0, 0, 1)).data == b"\x00"  # idle
        assert control(keyboard, request(0xA1, 0x01, 0x0100, 0, 8)).data == bytes(8)
        # what is typed after the reset is read as typed
        keyboard.release()
        assert (await done(bulk(keyboard, 0x81, 8))).data == bytes(8)

    asyncio.run(main())


# --- CDC-ACM serial port ---------------------------------------------------------------

@pytest.mark.parametrize("reset", sorted(RESETS))
def test_a_serial_port_sends_nothing_from_before_the_reset(reset: str) -> None:
    async def main() -> None:
        port = CdcAcm()  # echoes what the host writes
        await port.attach()
        control(port, CONFIGURE)
        await done(bulk(port, 0x02, data=b"stale"))
        notify = bulk(port, 0x83, 16)
        RESETS[reset](port)
        assert (await done(notify)).status == ESHUTDOWN
        await done(bulk(port, 0x02, data=b"fresh"))
        assert (await done(bulk(port, 0x81, 64))).data == b"fresh"
        await port.detach()

    asyncio.run(main())


# --- the headset (iso, alternate settings) -------------------------------------------------

MIC_PACKET = 98


@pytest.mark.parametrize("reset", ["set configuration", "set interface"])
def test_a_microphone_starts_afresh_after_a_reset(reset: str) -> None:
    """Samples the host missed before the reset are not sent after it: the stream
    starts at the next frame, as a stream the host just turned on."""
    headset = UsbAudio(Tone(441.0))
    mic_on = request(0x01, 11, 1, 2)  # SET_INTERFACE(2, alternate 1)
    mic_off = request(0x01, 11, 0, 2)

    async def read(packets: int) -> list[int]:
        iso = [IsoPacket(i * MIC_PACKET, MIC_PACKET) for i in range(packets)]
        result = headset.submit(urb(next(_seqnum), 2, Direction.IN, MIC_PACKET * packets,
                                    iso=iso))
        completion = await done(result)
        return [p.actual_length // 2 for p in completion.iso_packets or []]

    async def main() -> None:
        control(headset, CONFIGURE)
        control(headset, mic_on)
        assert await read(10) == [48] * 10
        headset._clock.origin -= 0.020  # the host away 20 ms: 960 samples wait for it
        if reset == "set configuration":
            control(headset, CONFIGURE)
        else:
            control(headset, mic_off)
        control(headset, mic_on)
        assert await read(10) == [48] * 10  # (not 49 a packet: no backlog)

    asyncio.run(main())


# --- the webcam ---------------------------------------------------------------------------

@pytest.mark.parametrize("transport", ["bulk", "iso"])
def test_a_webcam_starts_a_whole_frame_after_a_reset(serve, transport: str) -> None:
    """A frame cut by the reset is not finished after it: the next payload starts a
    frame, and every frame after the reset is whole."""
    async def test(server: UsbipServer) -> None:
        dev = await import_device(HOST, "1-1", server.port)

        async def payloads() -> list[bytes]:
            if transport == "bulk":
                return [await dev.bulk_read(EP_VIDEO, BULK_PAYLOAD)]
            return [p.data for p in await dev.iso_read(EP_VIDEO, [1024] * 8)]

        await dev.control(0x00, 9, 1, 0, b"")
        await dev.control(0x21, uvc.SET_CUR, PROBE, VS, probe(1, 2, 333333))  # 320x240
        await dev.control(0x21, uvc.SET_CUR, COMMIT, VS, probe(1, 2, 333333))
        if transport == "iso":
            await dev.control(0x01, 11, 2, VS, b"")
        started = Frames()
        for _ in range(400):  # until part of a frame came, not all of it
            for payload in await payloads():
                started.add(payload)
            if started.current:
                break
        assert not started.frames
        # the reset: configured again, the stream turned on again
        await dev.control(0x00, 9, 1, 0, b"")
        if transport == "iso":
            await dev.control(0x01, 11, 2, VS, b"")
        frames = Frames()
        for _ in range(400):
            for payload in await payloads():
                frames.add(payload)
            if len(frames.frames) >= 2:
                break
        check_numbers(frames.frames, "yuyv", 320, 240)  # (whole frames: the size)
        await dev.close()

    serve(test, [Webcam(formats=("yuyv",), transport=transport)])
