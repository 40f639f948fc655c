"""Which devices are exported through libusb: the export rules that say libusb,
matched against libusb's list.

Asked afresh on every DEVLIST and IMPORT, as usbipd reads sysfs. Scans,
libusb contexts and the periodic unplug check are blocking calls: they run
one at a time on this source's own worker thread, never on the event loop.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import logging
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from ...escape import printable
from ...exports.rules import ExportRule, ExportRules, PluggedDevice, Via
from ...linux import sysfs
from ...linux.rootdev import root_busids
from ..base import DeviceSource
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


def _interface_classes(device: Any) -> tuple[int, ...]:
    """Its interfaces' classes, from the descriptors libusb cached (nothing opened)."""
    try:
        return tuple(sorted({setting.getClass() for setting in device.iterSettings()}))
    except Exception:
        return ()


def rule_for(rules: ExportRules, device: PluggedDevice,
             serial: Callable[[], str | None]) -> ExportRule | None:
    """The rule that exports ``device`` through libusb: the first rule that matches it,
    if it says libusb. The serial is read (``serial``: it may open the device) only
    for a rule that names one and matches the device otherwise."""
    if device.is_hub:
        return None
    known: list[str | None] = []
    for rule in rules:
        if rule.device.serial and device.serial is None:
            loose = dataclasses.replace(rule, device=dataclasses.replace(rule.device,
                                                                         serial=()))
            if not loose.matches(device):
                continue
            if not known:
                known.append(serial())
            if not rule.matches(dataclasses.replace(device, serial=known[0])):
                continue
        elif not rule.matches(device):
            continue
        return rule if rule.via is Via.LIBUSB else None
    return None


class LibusbSource(DeviceSource):
    """The devices the export rules say to export through libusb.

    ``rules`` gives the rules now (the configuration's [[export]] and what `usbipy
    bind` recorded), ``unbound`` the devices unbound by hand (busid -> devnum). A
    device keeps its :class:`LibusbDevice` while it stays plugged in at the same
    address, and while a client holds it open.
    """

    def __init__(self, rules: Callable[[], ExportRules],
                 unbound: Callable[[], dict[str, int]] = dict,
                 events: LibusbEvents | None = None) -> None:
        self._rules = rules
        self._unbound = unbound
        self._events = events
        self._devices: dict[str, LibusbDevice] = {}
        self._unseen_warned: set[str] = set()
        self._unmatched_warned: set[ExportRule] = set()
        self._root: Mapping[str, str] | None = None
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="libusb-source")

    def rules(self) -> ExportRules:
        """Every rule in force (the first that matches a device decides, libusb or not)."""
        return self._rules()

    def _protected(self) -> Mapping[str, str]:
        """The devices this machine runs from: never exported (read once)."""
        if self._root is None:
            self._root = root_busids()
        return self._root

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
        """The devices to export now (blocking: libusb's device list, sysfs)."""
        rules = self.rules()
        if not len(rules.via(Via.LIBUSB)):
            return [d for d in self._devices.values() if d.is_open]
        found = self._scan(rules)
        unseen = self._unseen(rules, found)
        if unseen and not any(d.is_open for d in self._devices.values()):
            # libusb keeps its device list up to date from udev's events; with no udev
            # daemon it never sees a device plugged in later. With nothing open, a new
            # context scans afresh.
            log.info("libusb's device list is stale: scanning again")
            self._events, events = None, self._events
            if events is not None:
                events.close()
            self._devices = {}
            found = self._scan(rules)
            unseen = self._unseen(rules, found)
        for busid in unseen:
            if busid not in self._unseen_warned:
                self._unseen_warned.add(busid)
                log.warning("%s is plugged in but not in libusb's device list: libusb learns "
                            "of new devices from udev; is the udev daemon running?", busid)
        self._warn_unmatched(rules, found)
        # An imported device stays ours until its client lets go, plugged in or not.
        for busid, device in self._devices.items():
            if busid not in found and device.is_open:
                found[busid] = device
        self._devices = found
        return list(found.values())

    def _warn_unmatched(self, rules: ExportRules, found: dict[str, LibusbDevice]) -> None:
        for rule in rules.via(Via.LIBUSB):
            matched = any(device.rule is rule for device in found.values())
            if matched:
                self._unmatched_warned.discard(rule)
            elif rule not in self._unmatched_warned and not _has_wildcards(rule):
                self._unmatched_warned.add(rule)
                log.warning("not exporting %s: no such device is plugged in",
                            printable(_named(rule)))

    def _scan(self, rules: ExportRules) -> dict[str, LibusbDevice]:
        found: dict[str, LibusbDevice] = {}
        unbound = self._unbound()
        for device in self.events.context.getDeviceList(skip_on_error=True):
            try:
                busid = busid_of(device)
                plugged = PluggedDevice(busid, device.getVendorID(), device.getProductID(),
                                        None, device.getDeviceClass(),
                                        _interface_classes(device),
                                        device.getDeviceAddress())
            except Exception:
                continue
            if (sysfs.is_device_busid(busid)
                    and sysfs.driver_of(sysfs.usb_devices_dir() / busid) == "usbip-host"):
                continue  # the kernel stub has it
            if unbound.get(busid) == plugged.devnum:
                continue  # unbound by hand, until it is plugged in again
            if busid in self._protected():
                continue  # (this machine runs from it: the engine says so once)
            rule = rule_for(rules, plugged, functools.partial(device_serial, busid, device))
            if rule is None:
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
                    continue
            found[busid].rule = rule
        return found

    def _unseen(self, rules: ExportRules, found: dict[str, LibusbDevice]) -> list[str]:
        """Devices the rules export through libusb that sysfs shows (Linux) and libusb's
        list lacks, or whose address there is out of date (replugged)."""
        unseen = []
        unbound = self._unbound()
        for device in sysfs.usb_devices():
            if device.driver == "usbip-host" or device.on_vhci:
                continue
            if unbound.get(device.busid) == device.info.devnum:
                continue  # (held back: not looked for)
            if device.busid in self._protected():
                continue
            if rule_for(rules, PluggedDevice.of(device), lambda: None) is None:
                continue
            known = found.get(device.busid)
            if known is None or known.devnum != device.info.devnum:
                unseen.append(device.busid)
        return unseen

    def unbound(self) -> list[LibusbDevice]:
        """Open devices no rule exports now, or unbound by hand (blocking: reads the
        rules)."""
        rules = self.rules()
        unbound = self._unbound()
        result = []
        for busid, device in list(self._devices.items()):
            if not device.is_open:
                continue
            info = device.info
            plugged = PluggedDevice(busid, info.idVendor, info.idProduct, None,
                                    info.bDeviceClass,
                                    tuple(i.bInterfaceClass for i in info.interfaces),
                                    info.devnum)
            serial = functools.partial(device_serial, busid, device.usb_device)
            if unbound.get(busid) == info.devnum or rule_for(rules, plugged, serial) is None:
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

        Called on hotplug events and rule changes (or, with neither to tell it,
        periodically): an idle device has no transfer that would fail."""
        unplugged, unbound = await self._in_worker(self._find_lost)
        for device in unplugged:
            device.unplugged()
        for device in unbound:
            log.info("%s is no longer exported (unbound, or its rule removed): dropping its "
                     "client", device.busid)
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


def _has_wildcards(rule: ExportRule) -> bool:
    d = rule.device
    return bool(rule.interface_class or d.name) or any(
        c in p for p in (*d.busid, *d.vid_pid, *d.serial) for c in "*?[")


def _named(rule: ExportRule) -> str:
    """How a warning names a rule: "busid 2-1", "device 1d6b:0104"."""
    if rule.spec is not None:
        return f"device {rule.spec}"
    if rule.device.busid and len(rule.device.busid) == 1 and not rule.device.vid_pid:
        return f"busid {rule.device.busid[0]}"
    return str(rule)
