"""The rule engine: export rules applied to the devices plugged in here, at start,
on every hotplug event, and on a reload.

A device a usbip-host rule matches is bound to usbip-host as it appears (any
port, any of the ids the rule lists: a DFU update that re-enumerates with a
new product id is bound again if the rule lists both). A libusb rule needs
no binding: the libusb source (backends/libusb/source.py) exports what the
rules match whenever it is asked. A device that leaves ends its session: the
kernel's stub closes its connection, and the libusb source drops its client
at once (no polling). A device unbound by hand (`usbipy unbind`, C `usbip
unbind`) is left alone until it is plugged in again; a device whose rule was
removed by a reload is given back to its driver.

The blocking work (sysfs reads, bind and unbind) runs on one worker thread,
one thing at a time, never on the event loop.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Protocol

from ..errors import UsbipError
from ..escape import printable
from ..linux import sysfs, usbip_host
from ..linux.rootdev import holds, root_busids
from .admin import present
from .rules import ExportRule, ExportRules, PluggedDevice, Via
from .store import RuleStore, StoreError

log = logging.getLogger("usbipyd.exports")

#: Seconds after usbip-host lets a device go before the engine decides it was an
#: unbind by hand: an unplug sends its "remove" right after its "unbind".
UNBIND_SETTLE = 0.5


@dataclass(frozen=True)
class HotplugEvent:
    """One kernel (or udev) event about a USB device."""

    action: str  # "add", "remove", "bind", "unbind", "change"
    busid: str
    #: The driver a bind or unbind event names.
    driver: str | None = None


class Host(Protocol):
    """What the engine does to this machine (blocking calls): sysfs and usbip-host."""

    def devices(self) -> list[PluggedDevice]: ...
    def read(self, busid: str) -> PluggedDevice | None: ...
    def bind(self, busid: str) -> None: ...
    def unbind(self, busid: str) -> None: ...
    def stub_loaded(self) -> bool: ...
    def protected(self) -> Mapping[str, str]: ...


class LinuxHost:
    """sysfs and the kernel's usbip-host."""

    def devices(self) -> list[PluggedDevice]:
        return present()

    def read(self, busid: str) -> PluggedDevice | None:
        try:
            device = sysfs.read_device(busid)
        except (sysfs.SysfsError, OSError):
            return None
        return None if device.on_vhci else PluggedDevice.of(device)

    def bind(self, busid: str) -> None:
        usbip_host.bind(busid)

    def unbind(self, busid: str) -> None:
        usbip_host.unbind(busid)

    def stub_loaded(self) -> bool:
        return usbip_host.driver_loaded()

    def protected(self) -> Mapping[str, str]:
        return root_busids()


class RuleSources:
    """The rules in force: the configuration's (replaced by a reload) and the ones
    `usbipy bind` recorded (read afresh each time; the file is cached until it
    changes). A store that cannot be read is said once, and its rules left out."""

    def __init__(self, configured: ExportRules, store: RuleStore | None = None) -> None:
        self.configured = configured
        self.store = store
        self._said: str | None = None

    def _recorded(self) -> tuple[ExportRules, dict[str, int]]:
        if self.store is None:
            return ExportRules(), {}
        try:
            recorded = self.store.load()
        except StoreError as exc:
            if str(exc) != self._said:
                self._said = str(exc)
                log.warning("%s: its rules are not applied", exc)
            return ExportRules(), {}
        self._said = None
        return recorded.rules, recorded.unbound

    def __call__(self) -> ExportRules:
        return self.configured + self._recorded()[0]

    def unbound(self) -> dict[str, int]:
        """Devices unbound by hand (busid -> devnum), as `usbipy unbind` recorded them."""
        return self._recorded()[1]


class ExportEngine:
    """Applies ``rules()`` (the configuration's and the store's, read afresh each time)."""

    def __init__(self, rules: Callable[[], ExportRules], *, store: RuleStore | None = None,
                 host: Host | None = None,
                 gone: Callable[[str], Any] | None = None,
                 on_bind: Callable[[str], Any] | None = None,
                 usbip_host_rules: bool = True) -> None:
        self._rules = rules
        self._store = store
        self._host: Host = host if host is not None else LinuxHost()
        #: Called with the busid of a device that left (the libusb source drops its
        #: client; the metrics count it).
        self._gone = gone
        self._on_bind = on_bind
        #: Whether usbip-host rules are applied (usbipyd --no-usbip-host: not).
        self._usbip_host_rules = usbip_host_rules
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="exports")
        #: busid -> (devnum, rule): devices this engine bound to usbip-host.
        self.bound: dict[str, tuple[int, ExportRule]] = {}
        #: busid -> devnum: devices unbound by hand, left alone until replugged.
        self.held: dict[str, int] = {}
        #: Devices that hold the file systems this machine runs from (busid -> the
        #: mount point): never exported.
        self._protected: Mapping[str, str] = {}
        self._unbinding: set[str] = set()
        #: Devices usbip-host let go of, until it is clear whether by hand or unplugged.
        self._settling: set[str] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._warned: set[tuple[str, str]] = set()
        #: How many of the devices this engine bound were unplugged since.
        self.departures = 0

    async def _run(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._worker, fn, *args)

    def close(self) -> None:
        self._worker.shutdown(wait=True)

    # --- what the engine is told ------------------------------------------------------

    async def start(self) -> None:
        """The rules applied to every device plugged in now."""
        self._protected = await self._run(self._host.protected)
        await self.apply_all()

    async def reload(self) -> None:
        """The rules changed (SIGHUP, or `usbipy bind`): applied again to every device;
        a device this engine bound that no rule matches now goes back to its driver."""
        self._protected = await self._run(self._host.protected)
        await self.apply_all(give_back=True)

    async def apply_all(self, *, give_back: bool = False) -> None:
        rules = await self._run(self._read_rules)
        for device in await self._run(self._host.devices):
            await self._apply(device, rules)
        if give_back:
            for busid, (_devnum, rule) in list(self.bound.items()):
                device = await self._run(self._host.read, busid)
                now = rules.rule_for(device) if device is not None else None
                if device is not None and (now is None or now.via is not Via.USBIP_HOST):
                    if self.bound.get(busid, (None, None))[1] is not rule:
                        continue  # (unplugged, or bound again, meanwhile)
                    log.info("%s: no rule exports it through usbip-host now (%s was "
                             "removed): given back to its driver", device, rule.where or rule)
                    del self.bound[busid]
                    self._unbinding.add(busid)
                    try:
                        await self._run(self._host.unbind, busid)
                    except UsbipError as exc:
                        self._unbinding.discard(busid)
                        log.warning("%s: cannot give it back: %s", device, exc)

    async def event(self, event: HotplugEvent) -> None:
        """A hotplug event. The caller hands them over one at a time, in the order the
        kernel sent them (the service's queue)."""
        busid = event.busid
        if event.action == "remove":
            self._left(busid)
            return
        if event.action == "unbind":
            # (the kernel's unbind event seldom names the driver: it is gone already;
            # whose unbind it was is read from sysfs once things settled)
            if event.driver in (usbip_host.DRIVER, None):
                if busid in self._unbinding:
                    self._unbinding.discard(busid)
                elif busid in self.bound:
                    # An unplug sends "remove" right after: wait for it before taking
                    # this for an admin's unbind, and bind nothing there meanwhile (the
                    # kernel gives the device to its driver at once: a "bind" comes).
                    self._settling.add(busid)
                    asyncio.get_running_loop().call_later(UNBIND_SETTLE, self._settled, busid)
            return
        if event.action == "bind" and event.driver == usbip_host.DRIVER:
            return  # (ours, or an admin's: either way exported now)
        device = await self._run(self._host.read, busid)
        if device is not None:
            await self._apply(device, await self._run(self._read_rules))

    # --- the work -----------------------------------------------------------------------

    def _read_rules(self) -> ExportRules:
        try:
            return self._rules()
        except StoreError as exc:
            self._warn_once(("store", str(exc)), "%s: its rules are not applied", exc)
            return ExportRules()

    def _stored_hold(self, busid: str) -> int | None:
        """The devnum `usbipy unbind -b` recorded for ``busid`` (blocking: a file)."""
        if self._store is None:
            return None
        try:
            return self._store.load().unbound.get(busid)
        except StoreError:
            return None  # (said where the rules are read)

    async def _held_back(self, device: PluggedDevice) -> bool:
        held = self.held.get(device.busid)
        if held is None:
            held = await self._run(self._stored_hold, device.busid)
        if held is None:
            return False
        if held == device.devnum:
            return True
        self.held.pop(device.busid, None)  # (plugged in again since: the rules apply)
        return False

    async def _apply(self, device: PluggedDevice, rules: ExportRules) -> None:
        rule = rules.rule_for(device)
        if rule is None or device.busid in self._settling or await self._held_back(device):
            return
        busid = device.busid
        if busid in self._protected:
            self._warn_once(("root", busid), "%s: not exported (%s): it holds %s, that this "
                            "machine runs from", device, rule.where or rule,
                            holds(self._protected[busid]))
            return
        if rule.via is Via.LIBUSB:
            self._warn_once(("libusb", f"{busid}/{device.devnum}"),
                            "%s: exported through libusb (%s)", device, rule.where or rule)
            return
        if not self._usbip_host_rules:
            self._warn_once(("off", busid), "%s: not exported (%s): usbipyd runs with "
                            "--no-usbip-host", device, rule.where or rule)
            return
        if device.driver == usbip_host.DRIVER:
            self.bound.setdefault(busid, (device.devnum, rule))
            return
        if not await self._run(self._host.stub_loaded):
            self._warn_once(("stub", busid), "%s: not exported (%s): the usbip-host driver "
                            "is not loaded (modprobe usbip-host)", device, rule.where or rule)
            return
        try:
            await self._run(self._host.bind, busid)
        except UsbipError as exc:
            # (a device still being probed: its "bind" event brings it back here)
            log.debug("%s: bind failed: %s", device, exc)
            return
        self.bound[busid] = (device.devnum, rule)
        if self._on_bind is not None:
            self._on_bind(busid)
        log.info("%s: bound to usbip-host (%s)", device, rule.where or rule)

    def _settled(self, busid: str) -> None:
        task = asyncio.ensure_future(self._unbound(busid))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _unbound(self, busid: str) -> None:
        bound = self.bound.get(busid)
        if bound is None or busid not in self._settling:
            self._settling.discard(busid)
            return  # (removed meanwhile: an unplug)
        device = await self._run(self._host.read, busid)
        if busid not in self._settling or self.bound.get(busid) is not bound:
            return  # (removed, or bound again, while it was read)
        self._settling.discard(busid)
        if device is not None and device.driver == usbip_host.DRIVER:
            return  # (another driver's unbind: the one usbip-host took it from)
        self.bound.pop(busid, None)
        if device is None or device.devnum != bound[0]:
            return
        self.held[busid] = device.devnum
        log.info("%s: unbound from usbip-host by hand: left to its driver until it is "
                 "plugged in again", device)

    def _left(self, busid: str) -> None:
        self.held.pop(busid, None)
        self._settling.discard(busid)
        if self._store is not None:  # (a hold lasts until the device is unplugged)
            store = self._store
            self._worker.submit(self._release_hold, store, busid)
        bound = self.bound.pop(busid, None)
        if bound is not None:
            self.departures += 1
            log.info("%s: unplugged: its session ends (exported by %s)", printable(busid),
                     bound[1].where or bound[1])
        if self._gone is not None:
            self._gone(busid)

    @staticmethod
    def _release_hold(store: RuleStore, busid: str) -> None:
        try:
            store.release(busid)
        except StoreError as exc:
            log.warning("%s", exc)

    def _warn_once(self, key: tuple[str, str], message: str, *args: Any) -> None:
        if key not in self._warned:
            self._warned.add(key)
            log.warning(message, *args)
