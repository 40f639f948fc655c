"""Which devices are exported through libusb: the bindings matched against libusb's list.

Asked afresh on every DEVLIST and IMPORT, as usbipd reads sysfs. Scans,
libusb contexts and the periodic unplug check are blocking calls: they run
one at a time on this source's own worker thread, never on the event loop.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from ...escape import printable
from ...linux import sysfs
from ..base import DeviceSource
from .bindings import Binding, BindingStore
from .device import LibusbDevice, busid_of
from .events import LibusbEvents
from .unplug import still_plugged

log = logging.getLogger("usbipy.libusb")


def device_serial(busid: str, device: Any) -> str | None:
    """From sysfs where there is one (no need to open the device), else from libusb."""
    serial = sysfs.serial_of(busid)
    if serial is not None:
        return serial
    try:
        return str(device.getSerialNumber())
    except Exception:
        return None


class LibusbSource(DeviceSource):
    """The devices bound for export through libusb.

    A device keeps its :class:`LibusbDevice` while it stays plugged in at the
    same address, and while a client holds it open.
    """

    def __init__(self, store: BindingStore | None = None,
                 events: LibusbEvents | None = None) -> None:
        self.store = store if store is not None else BindingStore()
        self._events = events
        self._devices: dict[str, LibusbDevice] = {}
        self._unseen_warned: set[str] = set()
        self._unmatched_warned: set[Binding] = set()
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="libusb-source")

    @property
    def events(self) -> LibusbEvents:
        if self._events is None:
            self._events = LibusbEvents()
        return self._events

    async def _in_worker(self, fn: Any, *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._worker, fn, *args)

    async def devices(self) -> list[LibusbDevice]:
        result: list[LibusbDevice] = await self._in_worker(self.scan)
        return result

    def scan(self) -> list[LibusbDevice]:
        """The bound devices now (blocking: libusb's device list, sysfs)."""
        bindings = self.store.load()
        if not bindings:
            return [d for d in self._devices.values() if d.is_open]
        found = self._scan(bindings)
        unseen = self._unseen(bindings, found)
        if unseen and not any(d.is_open for d in self._devices.values()):
            # libusb keeps its device list up to date from udev's events; with no udev
            # daemon it never sees a device plugged in later. With nothing open, a new
            # context scans afresh.
            log.info("libusb's device list is stale: scanning again")
            self._events, events = None, self._events
            if events is not None:
                events.close()
            self._devices = {}
            found = self._scan(bindings)
            unseen = self._unseen(bindings, found)
        for busid in unseen:
            if busid not in self._unseen_warned:
                self._unseen_warned.add(busid)
                log.warning("%s is plugged in but not in libusb's device list: libusb learns "
                            "of new devices from udev; is the udev daemon running?", busid)
        self._warn_unmatched(bindings, found)
        # An imported device stays ours until its client lets go, plugged in or not.
        for busid, device in self._devices.items():
            if busid not in found and device.is_open:
                found[busid] = device
        self._devices = found
        return list(found.values())

    def _warn_unmatched(self, bindings: list[Binding], found: dict[str, LibusbDevice]) -> None:
        for binding in bindings:
            matched = any(
                binding.matches(d.busid, d.info.idVendor, d.info.idProduct,
                                functools.partial(device_serial, d.busid, d.usb_device))
                for d in found.values())
            if matched:
                self._unmatched_warned.discard(binding)
            elif binding not in self._unmatched_warned:
                self._unmatched_warned.add(binding)
                log.warning("not exporting %s: no such device is plugged in",
                            printable(str(binding)))

    def _scan(self, bindings: list[Binding]) -> dict[str, LibusbDevice]:
        found: dict[str, LibusbDevice] = {}
        for device in self.events.context.getDeviceList(skip_on_error=True):
            try:
                busid = busid_of(device)
                vid, pid = device.getVendorID(), device.getProductID()
            except Exception:
                continue
            if (sysfs.is_device_busid(busid)
                    and sysfs.driver_of(sysfs.usb_devices_dir() / busid) == "usbip-host"):
                continue  # the kernel stub has it
            serial = functools.partial(device_serial, busid, device)
            if not any(b.matches(busid, vid, pid, serial) for b in bindings):
                continue
            known = self._devices.get(busid)
            if known is not None and known.identity == (device.getBusNumber(),
                                                         device.getDeviceAddress()):
                found[busid] = known
            else:
                try:
                    found[busid] = LibusbDevice(self.events, device, busid)
                except Exception as exc:
                    log.warning("cannot read %s through libusb: %s", busid, exc)
        return found

    @staticmethod
    def _unseen(bindings: list[Binding], found: dict[str, LibusbDevice]) -> list[str]:
        """Bound devices that sysfs shows (Linux) and libusb's list lacks, or whose
        address there is out of date (replugged)."""
        unseen = []
        for device in sysfs.usb_devices():
            info = device.info
            if device.driver == "usbip-host":
                continue
            if not any(b.matches(device.busid, info.idVendor, info.idProduct,
                                 functools.partial(sysfs.serial_of, device.busid))
                       for b in bindings):
                continue
            known = found.get(device.busid)
            if known is None or known.devnum != info.devnum:
                unseen.append(device.busid)
        return unseen

    def unbound(self) -> list[LibusbDevice]:
        """Open devices whose binding was removed (blocking: reads the bindings file)."""
        bindings = self.store.load()
        result = []
        for busid, device in list(self._devices.items()):
            info = device.info
            serial = functools.partial(device_serial, busid, device.usb_device)
            if device.is_open and not any(
                    b.matches(busid, info.idVendor, info.idProduct, serial) for b in bindings):
                result.append(device)
        return result

    def _find_lost(self) -> tuple[list[LibusbDevice], list[LibusbDevice]]:
        """Open devices that were unplugged, and those that were unbound (blocking)."""
        imported = [d for d in self._devices.values() if d.is_open]
        if not imported:
            return [], []
        present: set[tuple[int, int]] | None = None
        unplugged = []
        for device in imported:
            plugged = still_plugged(device.busid, device.devnum)
            if plugged is None:  # no sysfs: ask libusb (which needs hotplug events)
                if present is None:
                    present = {(d.getBusNumber(), d.getDeviceAddress()) for d in
                               self.events.context.getDeviceList(skip_on_error=True)}
                plugged = device.identity in present
            if not plugged:
                unplugged.append(device)
        return unplugged, self.unbound()

    async def check(self) -> None:
        """Drop the clients of devices that were unplugged or unbound meanwhile.

        Called periodically: an idle device has no transfer that would fail."""
        unplugged, unbound = await self._in_worker(self._find_lost)
        for device in unplugged:
            device.unplugged()
        for device in unbound:
            log.info("%s was unbound: dropping its client", device.busid)
            device.drop()

    def close(self) -> None:
        for device in self._devices.values():
            device.close()
        self._worker.shutdown(wait=True)
        if self._events is not None:
            self._events.close()
            self._events = None


def plugged_in() -> dict[str, tuple[int, int, int]]:
    """busid -> (idVendor, idProduct, bDeviceClass) of every device libusb sees: what
    is plugged in where there is no sysfs to read (a container, macOS). Blocking."""
    from .events import usb1

    found = {}
    with usb1.USBContext() as context:
        for device in context.getDeviceIterator(skip_on_error=True):
            try:
                found[busid_of(device)] = (device.getVendorID(), device.getProductID(),
                                           device.getDeviceClass())
            finally:
                device.close()
    return found
