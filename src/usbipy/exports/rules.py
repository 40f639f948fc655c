"""Export rules: which plugged-in devices usbipyd exports, and through what.

A rule names devices as the access policy does (a busid, that is a port path;
VID:PID patterns; serials; a name from [names]), and also by interface class,
and says how to export them: through the kernel's usbip-host, or through
libusb. Within one field any listed pattern may match; across fields all
must. Rules are tried first to last; the first that matches a device exports
it. A device no rule matches is left to its own driver.

Pure: no I/O. The engine (exports/engine.py) asks :meth:`ExportRules.rule_for`
for every device that appears.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

from ..escape import printable
from ..linux.sysfs import UsbDevice
from ..policy import DeviceFacts, DeviceSelector
from ..usb.classes import UsbClass


class Via(enum.Enum):
    """How a device is exported."""

    USBIP_HOST = "usbip-host"  # the kernel's stub serves its URBs
    LIBUSB = "libusb"  # usbipyd serves them through libusb


@dataclass(frozen=True)
class PluggedDevice:
    """What a rule can know about a device plugged in here."""

    busid: str
    vendor: int
    product: int
    serial: str | None = None
    device_class: int = 0
    interface_classes: tuple[int, ...] = ()
    #: The device's address on its bus: a device replugged at the same port gets a
    #: new one (the kernel's devnum), which tells "replugged" from "still there".
    devnum: int = 0
    #: The driver bound to it now ("usb", "usbip-host"), where that is known.
    driver: str | None = None

    @classmethod
    def of(cls, device: UsbDevice) -> PluggedDevice:
        info = device.info
        return cls(device.busid, info.idVendor, info.idProduct, device.serial,
                   info.bDeviceClass, tuple(i.bInterfaceClass for i in info.interfaces),
                   info.devnum, device.driver)

    @property
    def facts(self) -> DeviceFacts:
        return DeviceFacts(self.busid, self.vendor, self.product, self.serial)

    @property
    def is_hub(self) -> bool:
        return self.device_class == UsbClass.HUB

    @property
    def classes(self) -> tuple[int, ...]:
        """The device's class (when it says one) and its interfaces' classes."""
        return ((self.device_class,) if self.device_class else ()) + self.interface_classes

    def __str__(self) -> str:
        serial = f" serial {printable(self.serial)}" if self.serial else ""
        return f"{printable(self.busid)} ({self.vendor:04x}:{self.product:04x}{serial})"


def parse_device_spec(spec: str) -> tuple[str, str | None]:
    """'VID:PID' or 'VID:PID:SERIAL' (hex ids as lsusb prints them; wildcards * and
    ? in the ids) -> (vid_pid, serial). ValueError with what is wrong."""
    from ..config.values import vid_pid_valid

    parts = spec.split(":", 2)
    vid_pid = ":".join(parts[:2]).lower()
    if len(parts) < 2 or not vid_pid_valid(vid_pid):
        raise ValueError(f"bad device {spec!r}: expected VID:PID[:SERIAL], four hex digits "
                         "each, such as 0483:df11 or 0483:df11:SERIAL")
    serial = parts[2] if len(parts) == 3 and parts[2] else None
    return vid_pid, serial


@dataclass(frozen=True)
class ExportRule:
    """Export the devices ``device`` and ``interface_class`` match, ``via`` this."""

    device: DeviceSelector
    via: Via = Via.USBIP_HOST
    #: Interface classes, any of which the device (or one of its interfaces) has.
    interface_class: tuple[int, ...] = ()
    #: Where it was written: "usbipyd.toml line 12", or "usbipy bind".
    where: str = field(default="", compare=False)

    @classmethod
    def for_device(cls, spec: str, via: Via = Via.USBIP_HOST, where: str = "") -> ExportRule:
        """The rule `usbipy bind --device VID:PID[:SERIAL]` records."""
        vid_pid, serial = parse_device_spec(spec)
        return cls(DeviceSelector(vid_pid=(vid_pid,), serial=(serial,) if serial else ()),
                   via, where=where)

    @property
    def spec(self) -> str | None:
        """VID:PID[:SERIAL] when that is all the rule says (what `bind --device` writes)."""
        d = self.device
        if (len(d.vid_pid) != 1 or len(d.serial) > 1 or d.busid or d.name
                or self.interface_class):
            return None
        return d.vid_pid[0] + (f":{d.serial[0]}" if d.serial else "")

    def matches(self, device: PluggedDevice) -> bool:
        if self.interface_class and not set(self.interface_class) & set(device.classes):
            return False
        return self.device.matches(device.facts)

    def __str__(self) -> str:
        what = str(self.device) if not self.device.empty else ""
        if self.interface_class:
            classes = "|".join(f"{c:02x}" for c in self.interface_class)
            what = f"{what} interface_class={classes}".strip()
        where = f" ({self.where})" if self.where else ""
        return f"export {what or 'every device'} via {self.via.value}{where}"


class ExportRules:
    """Rules in order; the first that matches a device exports it."""

    def __init__(self, rules: Iterable[ExportRule] = ()) -> None:
        self.rules = tuple(rules)

    def __iter__(self) -> Iterator[ExportRule]:
        return iter(self.rules)

    def __len__(self) -> int:
        return len(self.rules)

    def __add__(self, other: ExportRules) -> ExportRules:
        return ExportRules((*self.rules, *other.rules))

    def rule_for(self, device: PluggedDevice) -> ExportRule | None:
        """The rule that exports ``device``, or None (it is left to its own driver).
        A hub is never exported: its children are the devices."""
        if device.is_hub:
            return None
        return next((rule for rule in self.rules if rule.matches(device)), None)

    def via(self, via: Via) -> ExportRules:
        return ExportRules(rule for rule in self.rules if rule.via is via)
