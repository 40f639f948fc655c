"""An emulated USB webcam (USB Video Class 1.1): YUY2 and MJPEG, isochronous or bulk.

The function is two interfaces bound by an interface association, as UVC
requires (UVC 1.1, 2.4.1):

* interface 0, VideoControl: camera terminal 1 -> processing unit 2 ->
  streaming output terminal 3, none with controls;
* interface 1, VideoStreaming: the formats (YUY2 uncompressed, MJPEG), each at
  every size, each size at every frame rate. With ``transport="iso"`` its
  alternate setting 0 has no endpoint (no bandwidth while not streaming) and
  settings 1 to 4 offer 512 to 3 x 1024 bytes a microframe; uvcvideo picks the
  smallest that carries dwMaxPayloadTransferSize. With ``transport="bulk"`` the
  one setting has a bulk endpoint and streaming starts with the commit.

The host negotiates with VS_PROBE_CONTROL and fixes the result with
VS_COMMIT_CONTROL (4.3.1.1). Frames come from a frame source
(:class:`~usbipy.devices.pattern.TestPattern` by default), one every frame
interval by the server's monotonic clock, each split into payloads with a
12-byte header (2.4.3.3): FID toggles with every frame, EOF marks a frame's
last payload, and PTS and SCR carry the device clock. An isochronous packet
carries one payload in its microframe, or nothing while the next frame is not
due; a bulk URB carries one payload and waits for the next frame when needed.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from concurrent.futures import CancelledError, Executor, Future, ThreadPoolExecutor
from dataclasses import dataclass

from ..backends.base import Completion, SubmitResult
from ..backends.emulated import EmulatedDevice, Stall
from ..backends.isochronous import BusClock, IsoSchedule, in_completion
from ..protocol import CmdSubmit, Speed
from ..protocol.constants import EPIPE, ESHUTDOWN
from ..usb import video as uvc
from ..usb.descriptors import (
    Configuration,
    Device,
    Endpoint,
    Interface,
    InterfaceAssociation,
    TransferType,
)
from ..usb.requests import Setup
from .pattern import FrameSource, TestPattern

log = logging.getLogger(__name__)

EP_VIDEO = 0x81
#: The device clock of PTS and SCR (dwClockFrequency), in Hz.
CLOCK_HZ = 48_000_000
#: wMaxPacketSize of the isochronous settings 1 to 4: 512, 1024, 2 x 1024 and
#: 3 x 1024 bytes a microframe (bits 12..11: transactions beyond the first).
ISO_PACKET_SIZES = (0x0200, 0x0400, 0x0C00, 0x1400)
#: dwMaxPayloadTransferSize of the bulk variant: uvcvideo's bulk URBs are at most
#: 32 packets of 512 bytes (UVC_MAX_PACKETS), so a payload fills one URB.
BULK_PAYLOAD = 32 * 512
#: How much faster than the frame rate a frame is sent: room for a slow host.
BANDWIDTH_MARGIN = 1.25
FORMATS = ("yuyv", "mjpeg")
_HEADER = uvc.PAYLOAD_HEADER


def _bytes_per_interval(size: int) -> int:
    return (size & 0x7FF) * (1 + ((size >> 11) & 3))


@dataclass(frozen=True, slots=True)
class VideoMode:
    """What a commit selected: format, size, frame interval (100 ns units)."""

    fmt: str
    width: int
    height: int
    interval: int
    max_payload: int

    @property
    def max_frame_size(self) -> int:
        return self.width * self.height * 2


class VideoStream:
    """The frames of one stream split into payloads, paced by the frame interval."""

    def __init__(self, mode: VideoMode, source: FrameSource, first_number: int,
                 origin: float, renderer: Executor) -> None:
        self.mode = mode
        self.source = source
        self.period = mode.interval * 100e-9
        self.origin = origin
        #: The next frame's number; frames are numbered as sent.
        self.number = first_number
        self.fid = 0
        self._frame: bytes | None = None
        self._pos = 0
        self._pts = 0
        #: When the next frame may start (monotonic seconds).
        self.due = time.monotonic()
        self.frames_sent = 0
        self._renderer = renderer
        self._loop = asyncio.get_running_loop()
        #: The next frame, made on the renderer's thread (a JPEG encoding, or a
        #: source that reads a file, must not hold the event loop); set when done.
        self._rendering: Future[bytes] | None = None
        self.rendered = asyncio.Event()
        #: Set by :meth:`stop`: URBs still queued for this stream carry nothing.
        self.stopped = False
        self._render_next()

    def _render_next(self) -> None:
        if self.stopped:
            return
        mode = self.mode
        try:
            rendering = self._renderer.submit(self.source, self.number, mode.fmt,
                                              mode.width, mode.height)
        except RuntimeError:  # the renderer was shut down: the server is stopping
            self.stop()
            return
        self._rendering = rendering
        self.rendered = rendered = asyncio.Event()
        loop = self._loop

        def done(_future: Future[bytes]) -> None:
            try:
                loop.call_soon_threadsafe(rendered.set)
            except RuntimeError:
                pass  # the loop is closed: nobody waits any more

        rendering.add_done_callback(done)

    def stc(self, when: float) -> int:
        return int((when - self.origin) * CLOCK_HZ) & 0xFFFF_FFFF

    def ready(self, when: float) -> bool:
        """Whether a payload can be sent at ``when``: a frame in progress, or the
        next one due and made."""
        return not self.stopped and (self._frame is not None or (
            when >= self.due and self._rendering is not None and self._rendering.done()))

    def payload(self, when: float, room: int, sof: int) -> bytes:
        """The payload sent at ``when`` in at most ``room`` bytes, or b"" while the
        next frame is not due (or not made) yet."""
        if room <= _HEADER.size:
            return b""
        if self._frame is None:
            if not self.ready(when):
                return b""
            self._start(when)
            if self._frame is None:
                return b""  # the source failed on this frame: it is skipped
        frame = self._frame
        chunk = frame[self._pos:self._pos + room - _HEADER.size]
        self._pos += len(chunk)
        info = uvc.EOH | uvc.PTS | uvc.SCR | self.fid
        if self._pos >= len(frame):
            info |= uvc.EOF
            self._frame = None
            self.frames_sent += 1
        return _HEADER.pack(_HEADER.size, info, self._pts, self.stc(when), sof & 0x7FF) + chunk

    def _start(self, when: float) -> None:
        mode = self.mode
        rendering = self._rendering
        assert rendering is not None
        number = self.number
        self.number += 1
        # the next frame one interval on; after a stall (a slow host), no burst to catch up
        self.due = max(self.due + self.period, when)
        try:
            frame = rendering.result()
        except CancelledError:  # (stopped meanwhile)
            return
        except Exception:
            log.exception("webcam: the frame source failed on frame %d", number)
            self._render_next()
            return
        self._render_next()
        if len(frame) > mode.max_frame_size:
            log.error("webcam: frame %d is %d bytes, above the %d negotiated; cut",
                      number, len(frame), mode.max_frame_size)
            frame = frame[:mode.max_frame_size]
        self._frame, self._pos = frame, 0
        self.fid ^= uvc.FID
        self._pts = self.stc(when)

    def stop(self) -> None:
        """The stream ended (a commit, another alternate setting, the client gone):
        a frame not yet taken is not made, and URBs still queued for this stream
        carry nothing. Waiters wake up to see it."""
        self.stopped = True
        self._frame = None
        if self._rendering is not None:
            self._rendering.cancel()
        self.rendered.set()


def _descriptor(formats: tuple[str, ...], sizes: tuple[tuple[int, int], ...],
                intervals: tuple[int, ...], transport: str) -> Device:
    control_units = (uvc.camera_terminal(1) + uvc.processing_unit(2, 1)
                     + uvc.output_terminal(3, 2))
    control = uvc.vc_header(12 + 1 + len(control_units), CLOCK_HZ, (1,)) + control_units
    body = b""
    for index, fmt in enumerate(formats, 1):
        if fmt == "yuyv":
            body += uvc.format_uncompressed(index, len(sizes), uvc.GUID_YUY2, 16)
            subtype = uvc.VS_FRAME_UNCOMPRESSED
        else:
            body += uvc.format_mjpeg(index, len(sizes))
            subtype = uvc.VS_FRAME_MJPEG
        for frame_index, (width, height) in enumerate(sizes, 1):
            body += uvc.frame(subtype, frame_index, width, height, width * height * 2,
                              intervals)
        body += uvc.color_matching()
    header_length = 13 + len(formats)
    streaming_header = uvc.vs_input_header(len(formats), header_length + len(body), EP_VIDEO,
                                           3)
    name = "usbipy webcam"
    if transport == "iso":
        settings = tuple(
            Interface(1, uvc.CC_VIDEO, uvc.SC_VIDEOSTREAMING, bAlternateSetting=alt,
                      endpoints=(Endpoint(EP_VIDEO, 0x05, size, 1),))  # iso, asynchronous
            for alt, size in enumerate(ISO_PACKET_SIZES, 1))
        streaming = (Interface(1, uvc.CC_VIDEO, uvc.SC_VIDEOSTREAMING,
                               class_descriptors=streaming_header + body), *settings)
    else:
        streaming = (Interface(1, uvc.CC_VIDEO, uvc.SC_VIDEOSTREAMING,
                               class_descriptors=streaming_header + body,
                               endpoints=(Endpoint(EP_VIDEO, TransferType.BULK, 512),)),)
    return Device(
        idVendor=0x1209, idProduct=0x0005 if transport == "iso" else 0x0006,
        bcdDevice=0x0100, speed=Speed.HIGH,
        # Miscellaneous device class, interface association (IAD ECN): a composite
        bDeviceClass=0xEF, bDeviceSubClass=0x02, bDeviceProtocol=0x01,
        manufacturer="usbipy", product=name, serial_number="CAM0001",
        configurations=(Configuration(
            bMaxPower=250,
            associations=(InterfaceAssociation(0, 2, uvc.CC_VIDEO,
                                               uvc.SC_VIDEO_INTERFACE_COLLECTION, name=name),),
            interfaces=(Interface(0, uvc.CC_VIDEO, uvc.SC_VIDEOCONTROL,
                                  class_descriptors=control),
                        *streaming),
        ),),
    )


class Webcam(EmulatedDevice):
    """A high-speed UVC 1.1 webcam.

    ``source`` makes the frames (a :class:`~usbipy.devices.pattern.TestPattern`
    by default); ``formats`` is a selection of "yuyv" and "mjpeg"; ``sizes``
    are (width, height) pairs, the first the default; ``fps`` the frame rates
    offered at every size, the first the default; ``transport`` "iso" or "bulk".
    """

    def __init__(self, source: FrameSource | None = None, *,
                 formats: tuple[str, ...] = FORMATS,
                 sizes: tuple[tuple[int, int], ...] = ((640, 480), (320, 240), (160, 120)),
                 fps: tuple[int, ...] = (30, 15), transport: str = "iso") -> None:
        if not formats or any(f not in FORMATS for f in formats):
            raise ValueError(f"webcam formats are a selection of {FORMATS}, not {formats}")
        if transport not in ("iso", "bulk"):
            raise ValueError(f"a webcam streams over 'iso' or 'bulk', not {transport!r}")
        if not sizes or any(w % 2 or w < 16 * 8 or h < 32 for w, h in sizes):
            raise ValueError("webcam sizes are even widths of at least 128 pixels and "
                             "heights of at least 32")
        if not fps or any(not 1 <= f <= 60 for f in fps):
            raise ValueError(f"webcam frame rates are 1 to 60, not {fps}")
        if "mjpeg" in formats and source is None:
            try:
                import PIL  # noqa: F401
            except ImportError:
                raise RuntimeError("the webcam's MJPEG format needs Pillow: pip install "
                                   "'usbipy[webcam]' (or formats=('yuyv',))") from None
        self.formats = formats
        self.sizes = sizes
        self.intervals = tuple(10_000_000 // f for f in fps)
        self.transport = transport
        self.source: FrameSource = source if source is not None else TestPattern()
        self.descriptor = _descriptor(formats, sizes, self.intervals, transport)
        super().__init__()
        self.probe = self._negotiate(uvc.StreamingControl())
        self.committed: uvc.StreamingControl | None = None
        self._clock = BusClock(Speed.HIGH)
        self._schedule: IsoSchedule | None = None
        self.stream: VideoStream | None = None
        #: The thread frames are made on (JPEG encoding, a user's source).
        self._renderer: ThreadPoolExecutor | None = None
        #: Frames sent over all streams; the next frame's number.
        self.frame_number = 0
        self._error_code = 0

    # --- negotiation (UVC 1.1, 4.3.1.1) ---------------------------------------------

    def _negotiate(self, ctrl: uvc.StreamingControl) -> uvc.StreamingControl:
        """The device's answer to a probe: the nearest settings it supports."""
        fmt = ctrl.bFormatIndex if 1 <= ctrl.bFormatIndex <= len(self.formats) else 1
        frame = ctrl.bFrameIndex if 1 <= ctrl.bFrameIndex <= len(self.sizes) else 1
        interval = (min(self.intervals, key=lambda i: abs(i - ctrl.dwFrameInterval))
                    if ctrl.dwFrameInterval else self.intervals[0])
        width, height = self.sizes[frame - 1]
        return uvc.StreamingControl(
            bmHint=ctrl.bmHint, bFormatIndex=fmt, bFrameIndex=frame, dwFrameInterval=interval,
            wKeyFrameRate=ctrl.wKeyFrameRate, wPFrameRate=ctrl.wPFrameRate,
            wCompQuality=ctrl.wCompQuality, wCompWindowSize=ctrl.wCompWindowSize,
            dwMaxVideoFrameSize=width * height * 2,
            dwMaxPayloadTransferSize=self._payload_size(width * height * 2, interval),
            dwClockFrequency=CLOCK_HZ, bmFramingInfo=0x03)  # FID and EOF in every payload

    def _payload_size(self, frame_size: int, interval: int) -> int:
        if self.transport == "bulk":
            return BULK_PAYLOAD
        microframes = interval * 100e-9 / 125e-6
        needed = math.ceil(frame_size * BANDWIDTH_MARGIN / microframes) + _HEADER.size
        sizes = [_bytes_per_interval(s) for s in ISO_PACKET_SIZES]
        return next((s for s in sizes if s >= needed), sizes[-1])

    def _mode(self, ctrl: uvc.StreamingControl) -> VideoMode:
        width, height = self.sizes[ctrl.bFrameIndex - 1]
        return VideoMode(self.formats[ctrl.bFormatIndex - 1], width, height,
                         ctrl.dwFrameInterval, ctrl.dwMaxPayloadTransferSize)

    def _start_stream(self) -> None:
        ctrl = self.committed or self.probe
        if self._renderer is None:  # (made here, on the loop: after usbipyd -D forks)
            self._renderer = ThreadPoolExecutor(1, thread_name_prefix="usbipy-webcam")
        self.stream = VideoStream(self._mode(ctrl), self.source, self.frame_number,
                                  self._clock.origin, self._renderer)

    def _stop_stream(self) -> None:
        if self.stream is not None:
            self.stream.stop()
            self.frame_number = self.stream.number
            self.stream = None

    def close(self) -> None:
        """The server shuts down: the renderer's thread ends."""
        self._stop_stream()
        if self._renderer is not None:
            self._renderer.shutdown(wait=False, cancel_futures=True)
            self._renderer = None

    # --- requests ---------------------------------------------------------------------

    def interface_request(self, interface: int, setup: Setup, data: bytes) -> bytes | None:
        try:
            reply = self._class_request(interface, setup, data)
        except Stall:
            self._error_code = 0x06  # "invalid request" (4.2.1.2)
            raise
        self._error_code = 0
        return reply

    def _class_request(self, interface: int, setup: Setup, data: bytes) -> bytes | None:
        selector, request = setup.wValue >> 8, setup.bRequest
        if interface == 0:
            # VC_REQUEST_ERROR_CODE_CONTROL, which uvcvideo reads after a stall (4.2.1.2)
            if setup.wIndex >> 8 == 0 and selector == 0x02 and request == uvc.GET_CUR:
                return bytes((self._error_code,))
            raise Stall
        if selector not in (uvc.VS_PROBE_CONTROL, uvc.VS_COMMIT_CONTROL):
            raise Stall
        probe = selector == uvc.VS_PROBE_CONTROL
        if request == uvc.SET_CUR:
            if len(data) < 26:
                raise Stall
            ctrl = self._negotiate(uvc.StreamingControl.unpack(data))
            if probe:
                self.probe = ctrl
            else:
                self.committed = ctrl
                streaming = self.transport == "bulk" or self._schedule is not None
                self._stop_stream()
                if streaming:  # bulk has no alternate setting to wait for; an iso
                    self._start_stream()  # stream already on goes on at the new mode
            return None
        if request == uvc.GET_CUR:
            return (self.probe if probe else self.committed or self.probe).pack()
        if request == uvc.GET_LEN:
            return (uvc.StreamingControl.STRUCT.size).to_bytes(2, "little")
        if request == uvc.GET_INFO:
            return b"\x03"  # GET and SET supported
        if probe and request in (uvc.GET_MIN, uvc.GET_MAX, uvc.GET_DEF, uvc.GET_RES):
            base = uvc.StreamingControl() if request == uvc.GET_DEF else uvc.StreamingControl(
                bFormatIndex=self.probe.bFormatIndex, bFrameIndex=self.probe.bFrameIndex,
                dwFrameInterval=(min(self.intervals) if request == uvc.GET_MIN
                                 else max(self.intervals)))
            return self._negotiate(base).pack()
        raise Stall

    def reset(self) -> None:
        super().reset()
        # a new client (or a port reset) starts from the defaults, as a device
        # powered up does
        self.probe = self._negotiate(uvc.StreamingControl())
        self.committed = None

    def _drop_schedule(self) -> None:
        """The iso endpoint went away: its URBs still queued end -ESHUTDOWN."""
        if self._schedule is not None:
            self._schedule.shutdown(ESHUTDOWN)
            self._schedule = None

    def on_interface(self, interface: int, alternate: int) -> None:
        if interface != 1 or self.transport != "iso":
            return
        self._stop_stream()
        self._drop_schedule()
        if alternate:
            endpoint = next(e for e in self._interface(1, alternate))
            self._schedule = IsoSchedule(self._clock, endpoint)
            self._start_stream()

    def on_configuration(self, value: int) -> None:
        self._stop_stream()
        self._drop_schedule()
        if value and self.transport == "bulk" and self.committed is not None:
            self._start_stream()

    def on_clear_halt(self, endpoint: Endpoint) -> None:
        # uvcvideo ends a bulk stream with CLEAR_FEATURE(ENDPOINT_HALT)
        if self.transport == "bulk":
            self._stop_stream()

    # --- streaming ----------------------------------------------------------------------

    def transfer(self, endpoint: Endpoint, urb: CmdSubmit) -> SubmitResult:
        if endpoint.bEndpointAddress != EP_VIDEO:
            return Completion(status=EPIPE)
        if endpoint.transfer_type is TransferType.BULK:
            return self._bulk(urb)
        schedule, stream = self._schedule, self.stream
        if urb.iso_packets is None or schedule is None or stream is None:
            return Completion(status=EPIPE)
        window = schedule.place(urb)
        if window.status:
            return Completion(status=window.status)
        packets = urb.iso_packets

        def sent() -> Completion:
            # each packet's payload as of its microframe: a frame starts in the
            # first one at or after its due time
            time_of = self._clock.time_of
            payloads = [stream.payload(time_of(frame), packet.length, frame >> 3)
                        for frame, packet in zip(window.frames, packets, strict=True)]
            return in_completion(urb, window, payloads)

        return schedule.complete(window, sent)

    async def _bulk(self, urb: CmdSubmit) -> Completion:
        if self.stream is None:
            self._start_stream()  # a host that reads without committing gets the default
        stream = self.stream
        for _ in range(8):  # (a stream replaced by a commit mid-wait: the new one's turn)
            stream = self.stream
            if stream is None:  # stopped meanwhile (CLEAR_FEATURE, another configuration)
                return Completion()
            now = time.monotonic()
            if not stream.ready(now):
                if now < stream.due:
                    await asyncio.sleep(stream.due - now)
                if not stream.ready(time.monotonic()):
                    await stream.rendered.wait()
            if stream is self.stream and not stream.stopped:
                break
        assert stream is not None
        now = time.monotonic()
        room = min(urb.transfer_buffer_length, stream.mode.max_payload)
        return Completion(data=stream.payload(now, room, self._clock.frame(now) >> 3))
