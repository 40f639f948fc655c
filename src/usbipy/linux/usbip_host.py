"""The kernel's stub driver, usbip-host, through sysfs.

``bind``/``unbind`` do what `usbip bind`/`usbip unbind` do. A bound device
is exported by handing the client's connected socket to the kernel
(usbip_sockfd): from then on every URB is served by usbip-host.
"""

from __future__ import annotations

import errno
import logging
from enum import IntEnum

from ..errors import UsbipError
from . import sysfs
from .modules import load_hint

log = logging.getLogger("usbipy.usbip_host")

DRIVER = "usbip-host"


class StubStatus(IntEnum):
    """usbip_status of a bound device (enum usbip_device_status, SDEV_ST_*)."""

    AVAILABLE = 1
    USED = 2
    ERROR = 3


class UsbipHostError(UsbipError):
    """A bind, unbind or export through usbip-host failed; the message says what to do."""


def driver_loaded() -> bool:
    return sysfs.usb_driver_dir(DRIVER).is_dir()


def _require_driver() -> None:
    if not driver_loaded():
        raise UsbipHostError(f"the {DRIVER} driver is not loaded: {load_hint('usbip-host')}")


def _device(busid: str) -> sysfs.UsbDevice:
    try:
        return sysfs.read_device(busid)
    except sysfs.SysfsError:
        raise UsbipHostError(f"no USB device with busid {busid} (see 'usbipy list -l')"
                             ) from None


def bind(busid: str) -> sysfs.UsbDevice:
    """Give the device at ``busid`` to usbip-host, as `usbip bind -b BUSID`."""
    _require_driver()
    device = _device(busid)
    if device.on_vhci:
        raise UsbipHostError(f"{busid} is attached through vhci_hcd: exporting it again "
                             "would loop")
    if device.is_hub:
        raise UsbipHostError(f"{busid} is a hub: hubs cannot be exported")
    if device.driver == DRIVER:
        raise UsbipHostError(f"{busid} is already bound to {DRIVER}")
    drivers = sysfs.SYSFS_ROOT / "bus/usb/drivers"
    try:
        if device.driver is not None:
            sysfs.write_attr(drivers / device.driver / "unbind", busid)
        # match_busid first: usbip-host's probe refuses busids it was not told about.
        sysfs.write_attr(drivers / DRIVER / "match_busid", f"add {busid}")
    except OSError as exc:
        raise UsbipHostError(f"cannot unbind {busid} from {device.driver}: "
                             f"{exc.strerror or exc}") from exc
    try:
        sysfs.write_attr(drivers / DRIVER / "bind", busid)
    except OSError as exc:
        _forget(busid)
        raise UsbipHostError(f"cannot bind {busid} to {DRIVER}: {exc.strerror or exc}"
                             ) from exc
    log.info("bound %s to %s", busid, DRIVER)
    return device


def _forget(busid: str) -> None:
    try:
        sysfs.write_attr(sysfs.usb_driver_dir(DRIVER) / "match_busid", f"del {busid}")
    except OSError as exc:
        log.warning("cannot remove %s from match_busid: %s", busid, exc)


def unbind(busid: str) -> None:
    """Take the device back from usbip-host and let its own driver probe it again."""
    _require_driver()
    device = _device(busid)
    if device.driver != DRIVER:
        raise UsbipHostError(f"{busid} is not bound to {DRIVER}")
    driver = sysfs.usb_driver_dir(DRIVER)
    try:
        sysfs.write_attr(driver / "unbind", busid)
    except OSError as exc:
        raise UsbipHostError(f"cannot unbind {busid}: {exc.strerror or exc}") from exc
    _forget(busid)
    try:
        # rebind makes the kernel probe the device again: its usual driver takes it.
        sysfs.write_attr(driver / "rebind", busid)
    except OSError as exc:
        if exc.errno != errno.ENODEV:
            raise UsbipHostError(f"cannot rebind {busid}: {exc.strerror or exc}") from exc
    log.info("unbound %s from %s", busid, DRIVER)


def stub_status(device: sysfs.UsbDevice) -> StubStatus | None:
    """usbip_status of a device bound to usbip-host; None when it cannot be read."""
    try:
        return StubStatus(int(sysfs.read_attr(device.sys_path / "usbip_status")))
    except (sysfs.SysfsError, ValueError):
        return None


def hand_off(device: sysfs.UsbDevice, fd: int) -> None:
    """Give the connected socket ``fd`` to usbip-host (what usbipd does on import)."""
    sysfs.write_attr(device.sys_path / "usbip_sockfd", f"{fd}\n")


def disconnect(device: sysfs.UsbDevice) -> None:
    """End the connection usbip-host serves ``device`` on: "-1" to usbip_sockfd shuts
    the stub's session down and makes the device available again (stub_dev.c,
    usbip_sockfd_store)."""
    sysfs.write_attr(device.sys_path / "usbip_sockfd", "-1\n")


def bound_devices() -> list[sysfs.UsbDevice]:
    """Every device bound to usbip-host now, read fresh from sysfs as usbipd does."""
    driver = sysfs.usb_driver_dir(DRIVER)
    try:
        names = [n for n in driver.iterdir() if sysfs.is_device_busid(n.name)]
    except OSError:
        return []
    devices = []
    for name in sorted(names):
        try:
            devices.append(sysfs.read_device(name.name))
        except (sysfs.SysfsError, OSError):
            continue
    return devices
