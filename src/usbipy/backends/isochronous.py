"""Isochronous endpoints of emulated devices, paced as a host controller's schedule.

A real isochronous endpoint moves one packet per service interval: a frame
(1 ms) at full speed, a microframe (125 us) at high speed, times 2**(bInterval-1).
A URB of N packets is done when its N intervals have passed on the bus. An
emulated device has no bus, so :class:`BusClock` counts (micro)frames from
``time.monotonic()`` and :class:`IsoSchedule` places each URB on it the way
Linux's host controller drivers do (ehci-sched.c iso_stream_schedule): a URB
starts right after the endpoint's previous one while the endpoint is busy,
and at the next (micro)frame when its queue has run dry. Linux drivers such
as snd-usb-audio and uvcvideo leave URB_ISO_ASAP clear and rely on exactly
this; a URB's own start_frame is not honoured, as the HCDs do not honour it
for an endpoint that is streaming.

The device completes the URB at :attr:`IsoWindow.due` (:meth:`IsoSchedule.complete`):
the host then sees the nominal rate, with no drift, however fast it resubmits.
URBs of one endpoint complete in the order they were placed, as on a bus,
even when the event loop runs late and several are overdue at once.
Frame numbers are a count from the clock's start, modulo 2**31 (RET_SUBMIT's
start_frame field is signed), not the bus's 11-bit SOF number.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from ..protocol import CmdSubmit, IsoPacket, Speed
from ..protocol.constants import EFBIG, EMSGSIZE
from ..usb.descriptors import Endpoint
from .base import Completion

#: RET_SUBMIT's start_frame is a signed 32-bit field: the count wraps at 2**31.
_FRAME_MASK = 0x7FFF_FFFF
#: No URB starts further ahead than this many seconds (-EFBIG).
MAX_SCHEDULE_AHEAD = 1.0
#: How early a URB may complete: half of uvloop's timer resolution (1 ms).
TIMER_SLACK = 0.0005


class BusClock:
    """The (micro)frame count of an emulated device's bus, from a monotonic clock."""

    def __init__(self, speed: Speed) -> None:
        #: Seconds per frame: 125 us from high speed up, 1 ms below.
        self.period = 125e-6 if speed >= Speed.HIGH else 1e-3
        self.origin = time.monotonic()

    def frame(self, now: float | None = None) -> int:
        """The (micro)frame in progress."""
        return int(((time.monotonic() if now is None else now) - self.origin) / self.period)

    def time_of(self, frame: int) -> float:
        """When ``frame`` begins (monotonic seconds)."""
        return self.origin + frame * self.period


@dataclass(slots=True)
class IsoWindow:
    """Where one URB's packets fall on the bus."""

    #: The first packet's (micro)frame.
    start_frame: int
    #: Each packet's (micro)frame.
    frames: list[int]
    #: When the last packet's interval has passed (monotonic seconds).
    due: float
    #: Non-zero when the whole URB is refused (-EMSGSIZE, -EFBIG).
    status: int = 0


class IsoSchedule:
    """One isochronous endpoint's place on the bus."""

    def __init__(self, clock: BusClock, endpoint: Endpoint) -> None:
        self.clock = clock
        self.endpoint = endpoint
        # USB 2.0 9.6.6: an isochronous bInterval is an exponent, 1..16.
        self.interval = 1 << (min(max(endpoint.bInterval, 1), 16) - 1)
        #: The most bytes one packet may carry: wMaxPacketSize's size times its
        #: additional transactions per microframe (bits 12..11, high speed only).
        size = endpoint.wMaxPacketSize
        self.max_packet = (size & 0x7FF) * (1 + ((size >> 11) & 3))
        #: The (micro)frame after the last one placed.
        self._next = 0
        #: (Micro)frames that passed with no URB of this endpoint queued while it was
        #: streaming: the host fell behind (an underrun for audio, a gap for video).
        self.idle_frames = 0
        #: URBs placed and not yet completed, oldest first: (due, future, result).
        self._pending: deque[tuple[float, asyncio.Future[Completion],
                                   Callable[[], Completion]]] = deque()
        self._timer: asyncio.TimerHandle | None = None
        #: URBs of the queue that were unlinked since it was last compacted.
        self._unlinked = 0
        #: URBs placed whose futures are not done yet.
        self._live = 0

    def place(self, urb: CmdSubmit) -> IsoWindow:
        """Place ``urb``'s packets on the bus, after those already placed."""
        packets = urb.iso_packets or []
        if any(p.length > self.max_packet for p in packets):
            # usb_submit_urb() refuses such a URB (drivers/usb/core/urb.c)
            return IsoWindow(0, [], 0.0, EMSGSIZE)
        now = self.clock.frame()
        self._drop_unlinked()
        if not self._live and self._next > now:
            # every URB ahead was unlinked: the endpoint is idle, and the timer
            # set for them would hold back the next
            self._next = 0
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
        # busy: right after the previous URB; idle (all placed have passed): the next frame
        if self._next > now:
            start = self._next
        else:
            start = now + 1
            if self._next:
                self.idle_frames += start - self._next
        if (start - now) * self.clock.period > MAX_SCHEDULE_AHEAD:
            # as ehci-sched.c refuses a URB beyond its schedule: no URB starts
            # further ahead than a second, whatever a client submits
            return IsoWindow(0, [], 0.0, EFBIG)
        end = start + len(packets) * self.interval
        frames = [start + i * self.interval for i in range(len(packets))]
        self._next = end
        self._live += 1  # until its future is done (complete)
        return IsoWindow(start & _FRAME_MASK, frames, self.clock.time_of(end))

    def shutdown(self, status: int) -> None:
        """The endpoint went away (another alternate setting, configuration, a
        reset): its URBs not yet done end with ``status``, as usb_set_interface()
        flushes them with -ESHUTDOWN."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        pending, self._pending = self._pending, deque()
        for _due, future, _result in pending:
            if not future.done():
                future.set_result(Completion(status=status))
        self._next = 0

    def _drop_unlinked(self) -> None:
        """Forget unlinked URBs at the head of the queue; and anywhere in it once
        they are most of it, so a client that submits and unlinks over and over
        cannot make it grow."""
        pending = self._pending
        while pending and pending[0][1].done():
            pending.popleft()
        if self._unlinked > 32 and self._unlinked * 2 > len(pending):
            self._pending = deque(entry for entry in pending if not entry[1].done())
            self._unlinked = 0

    def complete(self, window: IsoWindow, result: Callable[[], Completion]
                 ) -> asyncio.Future[Completion]:
        """A future completed with ``result()`` once ``window`` has passed, after every
        URB placed before it; cancelling it (UNLINK) means ``result`` is never called.

        One timer per endpoint completes the URBs in order: a task per URB would
        let an overdue URB finish before an earlier one whose timer is queued, and
        the host would get the stream out of order.
        """
        future: asyncio.Future[Completion] = asyncio.get_running_loop().create_future()
        future.add_done_callback(self._done)
        self._pending.append((window.due, future, result))
        if self._timer is None:
            self._arm()
        return future

    def _done(self, future: asyncio.Future[Completion]) -> None:
        self._live -= 1
        if future.cancelled():
            self._unlinked += 1

    def _arm(self) -> None:
        self._drop_unlinked()
        pending = self._pending
        if pending:
            delay = max(0.0, pending[0][0] - time.monotonic())
            self._timer = asyncio.get_running_loop().call_later(delay, self._fire)

    def _fire(self) -> None:
        self._timer = None
        # uvloop's timers count whole milliseconds: one due within the next half
        # millisecond is done now, rather than spinning on timers of 0 ms
        now = time.monotonic() + TIMER_SLACK
        pending = self._pending
        while pending and pending[0][0] <= now:
            _due, future, result = pending.popleft()
            if not future.done():
                try:
                    future.set_result(result())
                except Exception as exc:  # a source that failed: this URB fails, not the loop
                    future.set_exception(exc)
        self._arm()


def in_completion(urb: CmdSubmit, window: IsoWindow, payloads: list[bytes]) -> Completion:
    """RET_SUBMIT's content for an IN URB whose packets carried ``payloads`` (one
    per packet; an empty one is a zero-length packet). A payload longer than its
    packet is cut to it: a device never sends more than the host asked."""
    if window.status:
        return Completion(status=window.status)
    packets: list[IsoPacket] = []
    data: list[bytes] = []
    for p, payload in zip(urb.iso_packets or [], payloads, strict=True):
        payload = payload[: p.length]
        packets.append(IsoPacket(p.offset, p.length, len(payload), 0))
        data.append(payload)
    return Completion(data=b"".join(data), iso_packets=packets, start_frame=window.start_frame)


def out_packets(urb: CmdSubmit) -> list[bytes]:
    """The data of each OUT packet, at its offset in the URB's buffer."""
    view = memoryview(urb.data)
    return [bytes(view[p.offset:p.offset + p.length]) for p in urb.iso_packets or []]


def out_completion(urb: CmdSubmit, window: IsoWindow) -> Completion:
    """RET_SUBMIT's content for an OUT URB: every packet taken whole."""
    if window.status:
        return Completion(status=window.status)
    packets = [IsoPacket(p.offset, p.length, p.length, 0) for p in urb.iso_packets or []]
    return Completion(iso_packets=packets, start_frame=window.start_frame)
