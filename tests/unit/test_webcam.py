"""The emulated webcam (UVC 1.1) through the server and the userspace client:
descriptors, probe/commit, and the payloads of its iso and bulk streams."""

from __future__ import annotations

import asyncio
import io
import struct
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import pytest

from usbipy.client import import_device
from usbipy.client.errors import Stalled
from usbipy.devices.pattern import TestPattern, read_number
from usbipy.devices.webcam import (
    BULK_PAYLOAD,
    CLOCK_HZ,
    EP_VIDEO,
    VideoMode,
    VideoStream,
    Webcam,
)
from usbipy.server import UsbipServer
from usbipy.usb import video as uvc
from usbipy.usb.descriptors import DescriptorType
from usbipy.usb.parse import parse_configuration

HOST = "127.0.0.1"
VS = 1  # the streaming interface
PROBE, COMMIT = uvc.VS_PROBE_CONTROL << 8, uvc.VS_COMMIT_CONTROL << 8


def test_the_descriptors_are_what_uvcvideo_reads() -> None:
    raw = Webcam().descriptors.configuration_descriptors[0]
    config = parse_configuration(raw)
    # the interface association comes first, binding interfaces 0 and 1 (IAD ECN)
    assert raw[9:12] == bytes((8, DescriptorType.INTERFACE_ASSOCIATION, 0))
    assert raw[12:15] == bytes((2, uvc.CC_VIDEO, uvc.SC_VIDEO_INTERFACE_COLLECTION))
    control, streaming = config.interfaces
    header = control[0].extra
    assert header[2] == uvc.VC_HEADER and struct.unpack_from("<HHI", header, 3) == (
        0x0110, len(header), CLOCK_HZ)
    # alternate setting 0 has no endpoint; 1 to 4 carry 512 to 3 x 1024 a microframe
    assert streaming[0].bNumEndpoints == 0
    assert [alt.endpoints[0].wMaxPacketSize for alt in streaming[1:]] == [
        0x200, 0x400, 0xC00, 0x1400]
    vs = streaming[0].extra
    assert vs[2] == uvc.VS_INPUT_HEADER and struct.unpack_from("<H", vs, 4)[0] == len(vs)
    subtypes = []
    offset = 0
    while offset < len(vs):
        subtypes.append(vs[offset + 2])
        offset += vs[offset]
    frames = [uvc.VS_FRAME_UNCOMPRESSED] * 3
    mjpeg = [uvc.VS_FRAME_MJPEG] * 3
    assert subtypes == [uvc.VS_INPUT_HEADER, uvc.VS_FORMAT_UNCOMPRESSED, *frames,
                        uvc.VS_COLORFORMAT, uvc.VS_FORMAT_MJPEG, *mjpeg, uvc.VS_COLORFORMAT]
    bulk = parse_configuration(Webcam(transport="bulk").descriptors.configuration_descriptors[0])
    (only,) = bulk.interfaces[1]
    assert (only.endpoints[0].bmAttributes, only.endpoints[0].wMaxPacketSize) == (2, 512)


def probe(fmt: int, frame: int, interval: int) -> bytes:
    return uvc.StreamingControl(bmHint=1, bFormatIndex=fmt, bFrameIndex=frame,
                                dwFrameInterval=interval).pack()


def test_probe_and_commit_settle_on_what_the_camera_has(serve) -> None:
    async def test(server: UsbipServer) -> None:
        dev = await import_device(HOST, "1-1", server.port)
        await dev.control(0x00, 9, 1, 0, b"")

        async def get(request: int, selector: int = PROBE) -> uvc.StreamingControl:
            data = await dev.control(0xA1, request, selector, VS, 34)
            assert len(data) == 34  # UVC 1.1's size; uvcvideo refuses any other
            return uvc.StreamingControl.unpack(data)

        default = await get(uvc.GET_DEF)
        assert (default.bFormatIndex, default.bFrameIndex, default.dwFrameInterval) == (
            1, 1, 333333)
        assert default.dwMaxVideoFrameSize == 640 * 480 * 2
        # a format, a frame and an interval it does not have: the nearest it has
        await dev.control(0x21, uvc.SET_CUR, PROBE, VS, probe(9, 9, 1))
        got = await get(uvc.GET_CUR)
        assert (got.bFormatIndex, got.bFrameIndex, got.dwFrameInterval) == (1, 1, 333333)
        await dev.control(0x21, uvc.SET_CUR, PROBE, VS, probe(2, 3, 700000))
        got = await get(uvc.GET_CUR)
        assert (got.bFormatIndex, got.bFrameIndex, got.dwFrameInterval) == (2, 3, 666666)
        assert got.dwMaxVideoFrameSize == 160 * 120 * 2
        assert got.dwClockFrequency == CLOCK_HZ and got.bmFramingInfo == 3
        # the smallest setting that carries a 160x120 frame 15 times a second
        assert got.dwMaxPayloadTransferSize == 512
        assert (await get(uvc.GET_MIN)).dwFrameInterval == 333333
        assert (await get(uvc.GET_MAX)).dwFrameInterval == 666666
        assert await dev.control(0xA1, uvc.GET_LEN, PROBE, VS, 2) == b"\x22\x00"
        assert await dev.control(0xA1, uvc.GET_INFO, PROBE, VS, 1) == b"\x03"
        # a UVC 1.0 host sends 26 bytes; fewer is refused, and the error code says so
        await dev.control(0x21, uvc.SET_CUR, COMMIT, VS, probe(1, 2, 333333)[:26])
        committed = await get(uvc.GET_CUR, COMMIT)
        assert (committed.bFormatIndex, committed.bFrameIndex) == (1, 2)
        assert committed.dwMaxPayloadTransferSize == 1024  # 320x240 YUY2 at 30/s
        with pytest.raises(Stalled):
            await dev.control(0x21, uvc.SET_CUR, COMMIT, VS, bytes(10))
        assert await dev.control(0xA1, uvc.GET_CUR, 0x0200, 0, 1) == b"\x06"
        await dev.close()

    serve(test, [Webcam()])


@dataclass
class Frames:
    """Payloads put back together into frames, checking their headers."""

    frames: list[bytes] = field(default_factory=list)
    current: bytearray = field(default_factory=bytearray)
    fid: int | None = None
    pts: int | None = None
    last_scr = 0
    synced = False

    def add(self, payload: bytes) -> None:
        if not payload:
            return  # an idle microframe
        length, info, pts, scr, sof = uvc.PAYLOAD_HEADER.unpack_from(payload)
        assert length == 12 and info & 0xFC == uvc.EOH | uvc.PTS | uvc.SCR
        assert 0 <= sof < 2048 and scr >= self.last_scr
        self.last_scr = scr
        fid = info & uvc.FID
        if fid != self.fid:
            # a new frame: the last one ended with EOF, FID toggled, a new PTS
            assert not self.current, "a frame ended without EOF"
            if self.pts is not None:
                assert pts > self.pts
            self.fid, self.pts = fid, pts
        assert pts == self.pts, "the PTS changed within a frame"
        self.current += payload[12:]
        if info & uvc.EOF:
            self.frames.append(bytes(self.current))
            self.current.clear()


async def start(dev, fmt: int, frame: int, alternate: int | None) -> None:
    await dev.control(0x00, 9, 1, 0, b"")
    await dev.control(0x21, uvc.SET_CUR, PROBE, VS, probe(fmt, frame, 333333))
    await dev.control(0x21, uvc.SET_CUR, COMMIT, VS, probe(fmt, frame, 333333))
    if alternate is not None:
        await dev.control(0x01, 11, alternate, VS, b"")


def check_numbers(frames: list[bytes], fmt: str, width: int, height: int) -> list[int]:
    numbers = []
    for data in frames:
        if fmt == "yuyv":
            assert len(data) == width * height * 2
            luma = data[0::2]
        else:
            from PIL import Image

            image = Image.open(io.BytesIO(data))
            image.load()
            assert image.size == (width, height)
            luma = image.convert("YCbCr").getchannel(0).tobytes()
        top, bottom = read_number(luma, width, height)
        assert top == bottom
        numbers.append(top)
    assert numbers == list(range(numbers[0], numbers[0] + len(numbers)))
    return numbers


@pytest.mark.parametrize(("fmt", "index"), [("yuyv", 1), ("mjpeg", 2)])
def test_iso_streaming_sends_whole_numbered_frames(serve, fmt: str, index: int) -> None:
    pytest.importorskip("PIL")

    async def test(server: UsbipServer) -> None:
        dev = await import_device(HOST, "1-1", server.port)
        await start(dev, index, 3, alternate=1)  # 160x120, 512 bytes a microframe
        frames = Frames()
        straddled = False
        for _ in range(200):
            packets = await dev.iso_read(EP_VIDEO, [512] * 32)
            assert all(p.status == 0 and p.actual_length <= 512 for p in packets)
            for i, packet in enumerate(packets):
                frames.add(packet.data)
                # a frame ends mid-URB, and the microframes after it carry nothing
                # until the next frame is due
                if packet.data and packet.data[1] & uvc.EOF and i + 1 < len(packets):
                    straddled |= packets[i + 1].actual_length == 0
            if len(frames.frames) >= 4:
                break
        assert straddled
        assert check_numbers(frames.frames, fmt, 160, 120)[0] == 0
        await dev.control(0x01, 11, 0, VS, b"")  # streaming off: no bandwidth
        await dev.close()

    serve(test, [Webcam()])


def test_bulk_streaming_sends_a_payload_a_urb(serve) -> None:
    async def test(server: UsbipServer) -> None:
        dev = await import_device(HOST, "1-1", server.port)
        await start(dev, 1, 2, alternate=None)  # 320x240 YUY2: 10 payloads a frame
        frames = Frames()
        for _ in range(100):
            payload = await dev.bulk_read(EP_VIDEO, BULK_PAYLOAD)
            assert 12 <= len(payload) <= BULK_PAYLOAD
            frames.add(payload)
            if len(frames.frames) >= 3:
                break
        check_numbers(frames.frames, "yuyv", 320, 240)
        await dev.close()

    serve(test, [Webcam(formats=("yuyv",), transport="bulk")])


def test_a_frame_source_can_be_any_function() -> None:
    calls: list[tuple[int, str, int, int]] = []

    def source(number: int, fmt: str, width: int, height: int) -> bytes:
        calls.append((number, fmt, width, height))
        return bytes(width * height * 2)

    camera = Webcam(source, formats=("yuyv",), sizes=((128, 64),), fps=(10,))
    assert camera.intervals == (1_000_000,)

    async def stream_two_payloads() -> None:
        mode = VideoMode("yuyv", 128, 64, 1_000_000, 512)
        with ThreadPoolExecutor(1) as renderer:
            stream = VideoStream(mode, camera.source, 5, time.monotonic(), renderer)
            # the frame is made on the renderer's thread; nothing is sent before
            await asyncio.wait_for(stream.rendered.wait(), 10)
            first = stream.payload(time.monotonic(), 512, 0)
            assert calls[0] == (5, "yuyv", 128, 64)
            assert first[:2] == bytes((12, uvc.EOH | uvc.PTS | uvc.SCR | uvc.FID))
            assert len(first) == 512 and first[12:] == bytes(500)
            # the next frame is not due for 100 ms: nothing to send once this one is out
            for _ in range(100):  # 16384 bytes, 500 a payload
                if stream.payload(time.monotonic(), 512, 0)[1] & uvc.EOF:
                    break
            assert stream.payload(time.monotonic(), 512, 0) == b"" and stream.frames_sent == 1
            # stopped mid-frame (a commit, another setting): URBs queued for it carry
            # nothing, and a waiter wakes to see that
            await asyncio.sleep(0.15)
            assert stream.ready(time.monotonic())
            stream.payload(time.monotonic(), 512, 0)
            stream.stop()
            assert stream.rendered.is_set() and not stream.ready(time.monotonic())
            assert stream.payload(time.monotonic() + 1, 512, 0) == b""

    asyncio.run(stream_two_payloads())
    with pytest.raises(ValueError, match="formats"):
        Webcam(formats=("h264",))
    with pytest.raises(ValueError, match="iso"):
        Webcam(transport="interrupt")
    with pytest.raises(ValueError, match="sizes"):
        Webcam(sizes=((100, 100),))
    pattern = TestPattern()
    frame = pattern(513, "yuyv", 160, 120)
    assert len(frame) == 160 * 120 * 2 and read_number(frame[0::2], 160, 120) == (513, 513)


def test_a_new_client_starts_from_the_defaults_and_a_commit_mid_stream_applies(serve) -> None:
    async def test(server: UsbipServer) -> None:
        dev = await import_device(HOST, "1-1", server.port)
        await start(dev, 1, 3, alternate=1)  # 160x120 YUY2, streaming
        # a commit while streaming: the stream goes on, at the new size
        await dev.control(0x21, uvc.SET_CUR, COMMIT, VS, probe(1, 2, 333333))
        frames = Frames()
        for _ in range(200):
            for packet in await dev.iso_read(EP_VIDEO, [512] * 32):
                frames.add(packet.data)
            if len(frames.frames) >= 2:
                break
        assert {len(f) for f in frames.frames[1:]} == {320 * 240 * 2}
        await dev.close()
        # the next client finds the defaults, not the last client's settings
        dev = await import_device(HOST, "1-1", server.port)
        await dev.control(0x00, 9, 1, 0, b"")
        committed = uvc.StreamingControl.unpack(
            await dev.control(0xA1, uvc.GET_CUR, COMMIT, VS, 34))
        assert (committed.bFormatIndex, committed.bFrameIndex) == (1, 1)
        await dev.close()

    serve(test, [Webcam()])


def test_frames_are_made_off_the_event_loop(serve) -> None:
    """A slow frame source (a JPEG encoder, a file) must not hold the loop: the
    server's debug mode fails the test if a callback takes 0.5 s."""
    slow = TestPattern()

    def source(number: int, fmt: str, width: int, height: int) -> bytes:
        time.sleep(0.6)
        return slow(number, fmt, width, height)

    async def test(server: UsbipServer) -> None:
        dev = await import_device(HOST, "1-1", server.port)
        await start(dev, 1, 3, alternate=None)
        frames = Frames()
        for _ in range(100):
            frames.add(await dev.bulk_read(EP_VIDEO, BULK_PAYLOAD))
            if frames.frames:
                break
        check_numbers(frames.frames, "yuyv", 160, 120)
        await dev.close()

    serve(test, [Webcam(source, formats=("yuyv",), transport="bulk")])
