"""Hotplug events for the rule engine, without polling.

On Linux: udev's netlink monitor, through pyudev (a well-kept binding of
libudev), watched on the event loop (its socket with add_reader): nothing
runs while nothing is plugged. With a udev daemon running, the events come
after its rules ran (source "udev"); without one (a container, a minimal
system), the kernel's own uevents are read (source "kernel", root only).

Where pyudev is missing, libusb's hotplug callbacks tell of devices that
arrive and leave (libusb's event thread, handed over to the loop).
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import os
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .engine import HotplugEvent

log = logging.getLogger("usbipyd.exports")

#: Where a running udev daemon listens: its events are the ones to read then.
UDEV_CONTROL = "/run/udev/control"


def udev_available() -> bool:
    try:
        import pyudev  # noqa: F401
    except ImportError:
        return False
    return True


class UdevWatcher:
    """USB device events from udev's netlink socket, on the event loop."""

    def __init__(self, on_event: Callable[[HotplugEvent], Any]) -> None:
        import pyudev

        self._on_event = on_event
        self.source = "udev" if os.path.exists(UDEV_CONTROL) else "kernel"
        context = pyudev.Context()
        self._monitor = pyudev.Monitor.from_netlink(context, source=self.source)
        self._monitor.filter_by(subsystem="usb", device_type="usb_device")
        self._loop: asyncio.AbstractEventLoop | None = None

    def start(self) -> None:
        self._monitor.start()
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(self._monitor.fileno(), self._readable)
        log.debug("hotplug: udev's netlink monitor (%s events)", self.source)

    def _readable(self) -> None:
        # Every event queued now, in order (bounded: the socket's backlog).
        while True:
            try:
                device = self._monitor.poll(timeout=0)
            except OSError as exc:  # (ENOBUFS: events were lost; the next ones still come)
                log.warning("hotplug: reading udev's events failed: %s", exc)
                return
            if device is None:
                return
            busid = device.sys_name
            if not busid or device.action is None:
                continue
            self._on_event(HotplugEvent(device.action, busid, device.properties.get("DRIVER")))

    def close(self) -> None:
        if self._loop is not None:
            self._loop.remove_reader(self._monitor.fileno())
            self._loop = None


class LibusbWatcher:
    """Arrivals and departures from libusb's hotplug callbacks (where pyudev is
    missing). They come on libusb's event thread and are handed to the loop."""

    def __init__(self, events: Any, on_event: Callable[[HotplugEvent], Any]) -> None:
        """``events``: a LibusbEvents (its context, and the thread that runs its events,
        which is where libusb calls back); closed with the watcher."""
        self._events = events
        self._context = events.context
        self._on_event = on_event
        self._handle: Any = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def start(self) -> None:
        from ..backends.libusb.device import busid_of
        from ..backends.libusb.events import usb1

        self._loop = loop = asyncio.get_running_loop()
        arrived = usb1.HOTPLUG_EVENT_DEVICE_ARRIVED

        def callback(_context: Any, device: Any, event: int) -> bool:
            try:
                busid = busid_of(device)
            except Exception:
                return False
            action = "add" if event == arrived else "remove"
            loop.call_soon_threadsafe(self._on_event, HotplugEvent(action, busid))
            return False  # (keep the callback)

        self._handle = self._context.hotplugRegisterCallback(
            callback, events=arrived | usb1.HOTPLUG_EVENT_DEVICE_LEFT,
            flags=usb1.HOTPLUG_NO_FLAGS)
        log.debug("hotplug: libusb's callbacks")

    def close(self) -> None:
        if self._handle is not None:
            try:
                self._context.hotplugDeregisterCallback(self._handle)
            except Exception:
                pass
            self._handle = None
        self._events.close()


# inotify(7): the flags this uses, and its event header (struct inotify_event)
_IN_CLOSE_WRITE, _IN_MOVED_TO, _IN_DELETE = 0x008, 0x080, 0x200
_IN_NONBLOCK, _IN_CLOEXEC = 0o4000, 0o2000000
_EVENT = struct.Struct("iIII")


class StoreWatcher:
    """Tells when a file in a folder is replaced (`usbipy bind` writing its rules), from
    inotify(7) on the event loop: a running server applies them at once, with no
    polling. Linux only (:meth:`start` returns False elsewhere)."""

    def __init__(self, folder: Path, name: str, on_change: Callable[[], Any]) -> None:
        self._folder = folder
        self._name = name.encode()
        self._on_change = on_change
        self._fd = -1
        self._loop: asyncio.AbstractEventLoop | None = None

    def start(self) -> bool:
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            init, add = libc.inotify_init1, libc.inotify_add_watch
        except (OSError, AttributeError):
            return False
        try:
            self._folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            log.warning("cannot watch %s for 'usbipy bind': %s", self._folder,
                        exc.strerror or exc)
            return False
        fd = init(_IN_NONBLOCK | _IN_CLOEXEC)
        if fd < 0:
            return False
        if add(fd, os.fsencode(self._folder), _IN_CLOSE_WRITE | _IN_MOVED_TO | _IN_DELETE) < 0:
            os.close(fd)
            return False
        self._fd = fd
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(fd, self._readable)
        return True

    def _readable(self) -> None:
        try:
            data = os.read(self._fd, 64 * 1024)
        except BlockingIOError:
            return
        changed = False
        at = 0
        while at + _EVENT.size <= len(data):
            _wd, _mask, _cookie, length = _EVENT.unpack_from(data, at)
            name = data[at + _EVENT.size:at + _EVENT.size + length].rstrip(b"\0")
            changed |= name == self._name
            at += _EVENT.size + length
        if changed:
            self._on_change()

    def close(self) -> None:
        if self._fd >= 0:
            if self._loop is not None:
                self._loop.remove_reader(self._fd)
            os.close(self._fd)
            self._fd = -1
