"""Linux sysfs: USB devices as the kernel describes them, and attribute writes.

Everything that reads or writes /sys goes through here, with the root taken
from :data:`SYSFS_ROOT` at call time, so a test can point it at a fake tree.
"""

from __future__ import annotations

import errno
import os
from dataclasses import dataclass
from pathlib import Path

from ..errors import UsbipError
from ..protocol import DeviceInfo, InterfaceInfo, Speed

#: Where sysfs is mounted.
SYSFS_ROOT = Path("/sys")

#: The kernel's "speed" attribute, as usbip's read_attr_speed maps it.
SPEEDS = {
    "1.5": Speed.LOW, "12": Speed.FULL, "480": Speed.HIGH, "53.3-480": Speed.WIRELESS,
    "5000": Speed.SUPER, "10000": Speed.SUPER_PLUS, "20000": Speed.SUPER_PLUS,
}


class SysfsError(UsbipError):
    """A sysfs attribute could not be read or written."""


def usb_devices_dir() -> Path:
    return SYSFS_ROOT / "bus/usb/devices"


def usb_driver_dir(driver: str) -> Path:
    return SYSFS_ROOT / "bus/usb/drivers" / driver


def read_attr(path: Path) -> str:
    try:
        return path.read_text().strip()
    except OSError as exc:
        raise SysfsError(f"cannot read {path}: {exc.strerror or exc}") from exc


def write_attr(path: Path, value: str) -> None:
    """One write(2) of ``value``, as sysfs store functions expect.

    Raises OSError with the errno the kernel's store function returned, so a
    caller can tell EBUSY (a port taken meanwhile) from the rest.
    """
    fd = os.open(path, os.O_WRONLY)
    try:
        written = os.write(fd, value.encode())
        if written != len(value):
            raise OSError(errno.EIO, f"short write to {path}")
    finally:
        os.close(fd)


@dataclass(frozen=True)
class UsbDevice:
    """A USB device (not an interface) under /sys/bus/usb/devices."""

    busid: str
    sys_path: Path
    info: DeviceInfo
    #: The device-level driver bound to it ("usb", "usbip-host") or None.
    driver: str | None
    #: Its iSerialNumber string as the kernel read it, if it has one.
    serial: str | None = None

    @property
    def is_hub(self) -> bool:
        return self.info.bDeviceClass == 0x09

    @property
    def on_vhci(self) -> bool:
        """Attached through vhci-hcd: exporting it again would loop."""
        return "vhci_hcd" in str(self.sys_path)


def is_device_busid(name: str) -> bool:
    """'1-1' or '3-1.2' is a device; '1-1:1.0' is an interface, 'usb1' a root hub."""
    return "-" in name and ":" not in name and name[0].isdigit()


def _int(path: Path, base: int = 10, default: int | None = None) -> int:
    try:
        return int(read_attr(path), base)
    except (SysfsError, ValueError):
        if default is None:
            raise SysfsError(f"cannot read a number from {path}") from None
        return default


def read_device(busid: str) -> UsbDevice:
    """The device at ``busid``; SysfsError when there is none."""
    link = usb_devices_dir() / busid
    if not link.exists():
        raise SysfsError(f"no USB device with busid {busid}")
    path = link.resolve()
    config = _int(path / "bConfigurationValue", default=0)
    ninterfaces = _int(path / "bNumInterfaces", default=0)
    interfaces: list[InterfaceInfo] = []
    for n in range(ninterfaces):
        # usbip's read_interface looks at "<busid>:<config>.<n>".
        intf = path / f"{busid}:{config}.{n}"
        interfaces.append(InterfaceInfo(
            _int(intf / "bInterfaceClass", 16, 0),
            _int(intf / "bInterfaceSubClass", 16, 0),
            _int(intf / "bInterfaceProtocol", 16, 0),
        ))
    try:
        speed = SPEEDS.get(read_attr(path / "speed"), Speed.UNKNOWN)
    except SysfsError:
        speed = Speed.UNKNOWN
    info = DeviceInfo(
        path=str(path), busid=busid,
        busnum=_int(path / "busnum"), devnum=_int(path / "devnum"), speed=speed,
        idVendor=_int(path / "idVendor", 16), idProduct=_int(path / "idProduct", 16),
        bcdDevice=_int(path / "bcdDevice", 16, 0),
        bDeviceClass=_int(path / "bDeviceClass", 16, 0),
        bDeviceSubClass=_int(path / "bDeviceSubClass", 16, 0),
        bDeviceProtocol=_int(path / "bDeviceProtocol", 16, 0),
        bConfigurationValue=config, bNumConfigurations=_int(path / "bNumConfigurations", 10, 1),
        bNumInterfaces=ninterfaces, interfaces=tuple(interfaces),
    )
    return UsbDevice(busid, path, info, driver_of(path), serial_of(busid))


def serial_of(busid: str) -> str | None:
    """The device's iSerialNumber string as the kernel read it; None when it has none."""
    try:
        return read_attr(usb_devices_dir() / busid / "serial")
    except SysfsError:
        return None


def driver_of(device_dir: Path) -> str | None:
    """The driver bound to the device or interface at ``device_dir``, if any."""
    link = device_dir / "driver"
    try:
        return os.path.basename(os.readlink(link))
    except OSError:
        return None  # none bound, or no such device


def usb_devices() -> list[UsbDevice]:
    """Every USB device (root hubs and interfaces left out), sorted by busid."""
    try:
        names = os.listdir(usb_devices_dir())
    except OSError:
        return []
    devices = []
    for name in names:
        if not is_device_busid(name):
            continue
        try:
            devices.append(read_device(name))
        except (SysfsError, OSError):
            continue  # unplugged while we looked
    return sorted(devices, key=lambda d: [int(p) for p in d.busid.replace("-", ".").split(".")])
