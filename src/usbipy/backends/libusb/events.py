"""python-libusb1, optional, and the thread that runs a libusb context's events.

libusb completes asynchronous transfers only while someone calls its event
handler; this thread does, and nothing else. Completions are handed to the
asyncio loop by the device (``call_soon_threadsafe``).
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from ...errors import UsbipError

try:
    import usb1 as _usb1
except ImportError:  # an optional dependency: only this backend needs it
    _usb1 = None
#: python-libusb1, or None when it is not installed (tests put a fake here).
usb1: Any = _usb1

__all__ = ["LibusbEvents", "LibusbUnavailable", "libusb_available", "require_usb1", "usb1"]

log = logging.getLogger("usbipy.libusb")

#: Seconds the event thread waits for libusb's next event before looking again
#: whether it is to stop (close() wakes it at once where libusb can: 1.0.21 and
#: later).
IDLE_WAIT = 10.0


class LibusbUnavailable(UsbipError):
    """python-libusb1 (or libusb itself) is missing."""


def libusb_available() -> bool:
    return usb1 is not None


def require_usb1() -> Any:
    if usb1 is None:
        raise LibusbUnavailable("python-libusb1 is not installed: pip install 'usbipy[libusb]'")
    return usb1


class LibusbEvents:
    """A libusb context and the thread that handles its events."""

    def __init__(self) -> None:
        lib = require_usb1()
        self.context = lib.USBContext()
        self.context.open()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="libusb-events", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        # A long wait: libusb returns as soon as there is an event, and close() wakes it
        # (libusb_interrupt_event_handler); idle, the thread does not run at all.
        while not self._stop.is_set():
            try:
                self.context.handleEventsTimeout(IDLE_WAIT)
            except usb1.USBErrorInterrupted:
                continue
            except Exception:  # keep serving the other devices
                log.exception("libusb event handling failed")
                time.sleep(0.1)

    def close(self) -> None:
        self._stop.set()
        interrupt = getattr(self.context, "interruptEventHandler", None)
        if interrupt is not None:
            interrupt()
        self._thread.join(timeout=IDLE_WAIT + 5)
        self.context.close()
