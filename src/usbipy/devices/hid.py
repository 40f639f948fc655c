"""An emulated USB HID keyboard (boot protocol), with a Python API to type."""

from __future__ import annotations

import asyncio
import struct
import threading
from collections import deque

from ..backends.base import Completion, SubmitResult
from ..backends.emulated import EmulatedDevice, Stall, UrbQueue
from ..protocol import CmdSubmit, Speed
from ..protocol.constants import EPIPE, ESHUTDOWN
from ..usb.descriptors import (
    Configuration,
    DescriptorType,
    Device,
    Endpoint,
    Interface,
    TransferType,
)
from ..usb.requests import Setup

# HID class requests (HID 1.11, 7.2)
GET_REPORT = 0x01
GET_IDLE = 0x02
GET_PROTOCOL = 0x03
SET_REPORT = 0x09
SET_IDLE = 0x0A
SET_PROTOCOL = 0x0B

#: The boot keyboard report descriptor of HID 1.11 appendix B.1: 8 input bytes
#: (modifiers, reserved, six keys) and one output byte (five LEDs).
BOOT_KEYBOARD_REPORT = bytes.fromhex(
    "05010906a101"  # Usage Page (Generic Desktop), Usage (Keyboard), Collection (Application)
    "050719e029e71500250175019508810295017508810195057501"  # modifiers, reserved
    "05081901290591029501750391019506750815002565"  # LEDs, LED padding, keys
    "05071900296581" "00c0"  # key array, End Collection
)

MOD_LSHIFT = 0x02
LED_NAMES = ("num_lock", "caps_lock", "scroll_lock", "compose", "kana")


def _build_keymap() -> dict[str, tuple[int, int]]:
    """US layout: character -> (usage id, modifiers)."""
    keymap: dict[str, tuple[int, int]] = {}
    for i, ch in enumerate("abcdefghijklmnopqrstuvwxyz"):
        keymap[ch] = (0x04 + i, 0)
        keymap[ch.upper()] = (0x04 + i, MOD_LSHIFT)
    for i, (plain, shifted) in enumerate(zip("1234567890", "!@#$%^&*()", strict=True)):
        keymap[plain] = (0x1E + i, 0)
        keymap[shifted] = (0x1E + i, MOD_LSHIFT)
    keymap.update({"\n": (0x28, 0), "\t": (0x2B, 0), " ": (0x2C, 0), "\b": (0x2A, 0)})
    for usage, plain, shifted in (
        (0x2D, "-", "_"), (0x2E, "=", "+"), (0x2F, "[", "{"), (0x30, "]", "}"),
        (0x31, "\\", "|"), (0x33, ";", ":"), (0x34, "'", '"'), (0x35, "`", "~"),
        (0x36, ",", "<"), (0x37, ".", ">"), (0x38, "/", "?"),
    ):
        keymap[plain] = (usage, 0)
        keymap[shifted] = (usage, MOD_LSHIFT)
    return keymap


KEYMAP = _build_keymap()
_REPORT = struct.Struct("BB6s")
_RELEASED = bytes(8)


class HidKeyboard(EmulatedDevice):
    """A full-speed boot keyboard. Interrupt IN URBs wait until there is a report.

    :meth:`type_text`, :meth:`press` and :meth:`release` may be called from any
    thread; the reports are queued on the server's event loop.
    """

    descriptor = Device(
        idVendor=0x1209, idProduct=0x0001, bcdDevice=0x0100, speed=Speed.FULL,
        manufacturer="usbipy", product="usbipy HID keyboard", serial_number="KBD0001",
        configurations=(
            Configuration(
                bmAttributes=0xA0,  # remote wakeup, as keyboards have
                interfaces=(
                    Interface(
                        0, 0x03, 0x01, 0x01,  # HID, boot interface, keyboard
                        endpoints=(Endpoint(0x81, TransferType.INTERRUPT, 8, 10),),
                        class_descriptors=struct.pack(
                            "<BBHBBBH", 9, DescriptorType.HID, 0x0111, 0, 1,
                            DescriptorType.HID_REPORT, len(BOOT_KEYBOARD_REPORT),
                        ),
                    ),
                ),
            ),
        ),
    )

    #: Reports waiting for an interrupt IN URB; beyond this, typing waits.
    MAX_QUEUED_REPORTS = 4096

    def __init__(self) -> None:
        super().__init__()
        self.leds = 0
        self.protocol = 1  # report protocol (1) by default, boot (0) on request
        self.idle = 0
        #: Reports not yet sent. Appended from any thread, taken on the loop (deque's
        #: append and popleft are atomic); ``_room`` wakes typists waiting for space.
        self._reports: deque[bytes] = deque()
        self._room = threading.Condition()
        self._urbs = UrbQueue()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._last = _RELEASED
        self.leds_changed = threading.Condition()

    async def attach(self) -> None:
        await super().attach()
        self._loop = asyncio.get_running_loop()
        self._pump()  # reports typed before the import

    def on_configuration(self, value: int) -> None:
        if value == 0:
            # Deconfigured: a port reset, or SET_CONFIGURATION again (USB 2.0,
            # 9.1.1.5): URBs still waiting end as on a disabled endpoint, and the
            # class state is the power-on one (HID 1.11, 7.2.6: report protocol).
            # The reports typed and not yet read stay: they are input, not answers.
            self._urbs.fail_all(ESHUTDOWN)
            self.protocol = 1
            self.idle = 0
            self._last = _RELEASED

    async def detach(self) -> None:
        self._urbs.fail_all(ESHUTDOWN)  # the client is gone
        self._reports.clear()
        self._taken()
        await super().detach()

    # --- Python API -----------------------------------------------------------

    def press(self, *usages: int, modifiers: int = 0, timeout: float | None = None) -> None:
        """Report the keys (HID usage ids, at most six) as held down."""
        keys = bytes(usages[:6]).ljust(6, b"\0")
        self._queue([_REPORT.pack(modifiers, 0, keys)], timeout)

    def release(self, timeout: float | None = None) -> None:
        """Report every key released."""
        self._queue([_RELEASED], timeout)

    def type_text(self, text: str, timeout: float | None = None) -> None:
        """Type ``text`` on a US layout: a press and a release per character.

        From a plain thread, this waits while MAX_QUEUED_REPORTS reports are
        queued (until a client reads them), up to ``timeout`` seconds
        (TimeoutError). On an event loop, where waiting would stall it, a full
        queue raises OverflowError and nothing is queued.
        """
        reports = []
        for ch in text:
            try:
                usage, mods = KEYMAP[ch]
            except KeyError:
                raise ValueError(f"no key for {ch!r} on a US keyboard") from None
            reports.append(_REPORT.pack(mods, 0, bytes((usage, 0, 0, 0, 0, 0))))
            reports.append(_RELEASED)
        self._queue(reports, timeout)

    def _queue(self, reports: list[bytes], timeout: float | None) -> None:
        limit = self.MAX_QUEUED_REPORTS
        try:
            running: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is not None:
            # On an event loop (the server's or any other): waiting would stall it.
            with self._room:
                if len(self._reports) + len(reports) > limit:
                    raise OverflowError("too many keyboard reports queued; is a client "
                                        "reading?")
                self._reports.extend(reports)
            self._wake(running)
            return
        # A plain thread: queue in pieces that fit, waiting for room between them.
        for start in range(0, len(reports), limit):
            chunk = reports[start:start + limit]

            def room(n: int = len(chunk)) -> bool:
                return len(self._reports) + n <= limit

            with self._room:
                if not self._room.wait_for(room, timeout):
                    raise TimeoutError("the keyboard's reports were not read in time; "
                                       "is a client attached?")
                self._reports.extend(chunk)
            self._wake(None)

    def _wake(self, running: asyncio.AbstractEventLoop | None) -> None:
        """Hand new reports to waiting URBs, on the server's loop."""
        loop = self._loop
        if loop is None:
            return  # not imported yet: the first client's attach takes them
        if loop is running:
            self._pump()
            return
        try:
            loop.call_soon_threadsafe(self._pump)
        except RuntimeError:
            pass  # the server's loop is closed: the reports wait for the next one

    def _taken(self) -> None:
        """Reports left the queue: wake typists waiting for room."""
        with self._room:
            self._room.notify_all()

    def _pump(self) -> None:
        taken = False
        while self._reports:
            waiter = self._urbs.pop()
            if waiter is None:
                break
            urb, future = waiter
            report = self._last = self._reports.popleft()
            future.set_result(Completion(data=report[: urb.transfer_buffer_length]))
            taken = True
        if taken:
            self._taken()

    # --- USB --------------------------------------------------------------------

    def transfer(self, endpoint: Endpoint, urb: CmdSubmit) -> SubmitResult:
        if endpoint.bEndpointAddress != 0x81:
            return Completion(status=EPIPE)
        if self._reports and not self._urbs:
            report = self._last = self._reports.popleft()
            self._taken()
            return Completion(data=report[: urb.transfer_buffer_length])
        return self._urbs.wait(urb)

    def interface_request(self, interface: int, setup: Setup, data: bytes) -> bytes | None:
        # The one interface: its HID descriptors (HID 1.11, 7.1) and class requests (7.2).
        if setup.bmRequestType == 0x81 and setup.bRequest == 0x06:  # GET_DESCRIPTOR
            kind = setup.wValue >> 8
            if kind == DescriptorType.HID_REPORT:
                return BOOT_KEYBOARD_REPORT
            if kind == DescriptorType.HID:
                return self.descriptor.configurations[0].interfaces[0].class_descriptors
            raise Stall
        if setup.bmRequestType == 0x21:
            if setup.bRequest == SET_REPORT:
                if data:
                    with self.leds_changed:
                        self.leds = data[0]
                        self.leds_changed.notify_all()
                return None
            if setup.bRequest == SET_IDLE:
                self.idle = setup.wValue >> 8
                return None
            if setup.bRequest == SET_PROTOCOL:
                self.protocol = setup.wValue & 1
                return None
        if setup.bmRequestType == 0xA1:
            if setup.bRequest == GET_REPORT:
                return self._last
            if setup.bRequest == GET_IDLE:
                return bytes((self.idle,))
            if setup.bRequest == GET_PROTOCOL:
                return bytes((self.protocol,))
        raise Stall

    @property
    def led_state(self) -> dict[str, bool]:
        return {name: bool(self.leds & (1 << i)) for i, name in enumerate(LED_NAMES)}
