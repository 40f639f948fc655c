"""The kernel's virtual USB device controller, usbip-vudc, through sysfs: device mode.

In device mode (`usbipd -e`) the exported device is a gadget: a USB function
the kernel implements (configfs, or a legacy gadget module) bound to a UDC that
usbip-vudc provides. Each such UDC is a platform device, ``usbip-vudc.N``,
which is also its bus id on the wire. usbipd hands the client's socket to it
(``usbip_sockfd``) and the kernel serves every URB from then on, as usbip-host
does for a device (drivers/usb/usbip/vudc_sysfs.c).

What the record on the wire says follows tools/usb/usbip/libsrc/
usbip_device_driver.c: the ids and class from the gadget's device descriptor
(``dev_desc``, readable once a gadget is bound), the speed from the UDC's
``current_speed``, and bus 0, device 0, no configuration and no interfaces.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..protocol import DeviceInfo, Speed
from ..usb.parse import DescriptorError, parse_device
from . import sysfs
from .usbip_host import StubStatus

DRIVER = "usbip-vudc"

#: The UDC's current_speed (usb_speed_string, drivers/usb/common/common.c).
SPEEDS = {
    "low-speed": Speed.LOW, "full-speed": Speed.FULL, "high-speed": Speed.HIGH,
    "wireless": Speed.WIRELESS, "super-speed": Speed.SUPER,
    "super-speed-plus": Speed.SUPER_PLUS,
}


@dataclass(frozen=True)
class Gadget:
    """One usbip-vudc UDC, and the gadget bound to it (if any)."""

    #: usbip-vudc.N: the platform device, and the bus id a client imports.
    busid: str
    #: /sys/devices/platform/usbip-vudc.N
    sys_path: Path
    #: The gadget's device record; None while no gadget is bound (nothing to export).
    info: DeviceInfo | None
    #: The gadget driver bound to the UDC (a configfs gadget's directory name).
    function: str | None

    @property
    def status(self) -> StubStatus | None:
        """usbip_status (the same SDEV_ST_* values as usbip-host's)."""
        try:
            return StubStatus(int(sysfs.read_attr(self.sys_path / "usbip_status")))
        except (sysfs.SysfsError, ValueError):
            return None


def driver_dir() -> Path:
    return sysfs.SYSFS_ROOT / "bus/platform/drivers" / DRIVER


def driver_loaded() -> bool:
    return driver_dir().is_dir()


def gadgets() -> list[Gadget]:
    """Every usbip-vudc UDC now, read fresh from sysfs as usbipd -e does."""
    try:
        names = sorted(p.name for p in driver_dir().iterdir() if p.name.startswith(DRIVER))
    except OSError:
        return []
    found = []
    for name in names:
        path = (driver_dir() / name).resolve()
        udc = path / "udc" / name
        found.append(Gadget(busid=name, sys_path=path, info=_info(name, path, udc),
                            function=_uevent(udc).get("USB_UDC_DRIVER")))
    return found


def _info(busid: str, path: Path, udc: Path) -> DeviceInfo | None:
    try:
        descriptor = parse_device((path / "dev_desc").read_bytes())
    except (OSError, DescriptorError):  # (ENODEV: no gadget bound)
        return None
    try:
        speed = SPEEDS.get(sysfs.read_attr(udc / "current_speed"), Speed.UNKNOWN)
    except sysfs.SysfsError:
        speed = Speed.UNKNOWN
    return DeviceInfo(
        path=str(path), busid=busid, busnum=0, devnum=0, speed=speed,
        idVendor=descriptor.idVendor, idProduct=descriptor.idProduct,
        bcdDevice=descriptor.bcdDevice, bDeviceClass=descriptor.bDeviceClass,
        bDeviceSubClass=descriptor.bDeviceSubClass,
        bDeviceProtocol=descriptor.bDeviceProtocol, bConfigurationValue=0,
        bNumConfigurations=descriptor.bNumConfigurations, bNumInterfaces=0)


def _uevent(path: Path) -> dict[str, str]:
    try:
        text = (path / "uevent").read_text()
    except OSError:
        return {}
    return dict(line.partition("=")[::2] for line in text.splitlines() if "=" in line)


def hand_off(gadget: Gadget, fd: int) -> None:
    """Give the connected socket ``fd`` to the UDC (what usbipd -e does on import)."""
    sysfs.write_attr(gadget.sys_path / "usbip_sockfd", f"{fd}\n")


def disconnect(gadget: Gadget) -> None:
    """End the connection the UDC serves: "-1" to usbip_sockfd (vudc_sysfs.c)."""
    sysfs.write_attr(gadget.sys_path / "usbip_sockfd", "-1\n")
