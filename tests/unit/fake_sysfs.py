"""A fake /sys tree with USB devices, usbip-host and vhci-hcd, for CLI tests.

Attribute files are plain files, so a test reads back what the code wrote.
The real sysfs behaviour is covered by the kernel tests; this checks what
usbipy writes where, and how it reports what it finds.
"""

from __future__ import annotations

import os
from pathlib import Path

VHCI_HEADER = "hub port sta spd dev      sockfd local_busid\n"


class FakeSysfs:
    def __init__(self, root: Path) -> None:
        self.root = root
        #: Sockets the fake kernel holds (dup'ed when written to attach/usbip_sockfd).
        self.held: list[int] = []
        #: The module tree /lib/modules stands for (empty: nothing installed).
        self.modules = root.parent / "lib-modules"
        self.devices = root / "bus/usb/devices"
        self.drivers = root / "bus/usb/drivers"
        self.devices.mkdir(parents=True)
        for driver in ("usb", "usb-storage", "hub"):
            (self.drivers / driver).mkdir(parents=True)
            for attr in ("bind", "unbind"):
                (self.drivers / driver / attr).write_text("")

    def add_device(self, busid: str, vid: int, pid: int, *, device_class: int = 0,
                   speed: str = "480", driver: str | None = "usb",
                   interfaces: tuple[tuple[int, int, int], ...] = ((8, 6, 0x50),),
                   parent: str = "pci0000:00/0000:00:05.0") -> Path:
        bus, _, _ = busid.partition("-")
        path = self.root / "devices" / parent / f"usb{bus}" / busid
        path.mkdir(parents=True)
        attrs = {
            "busnum": bus, "devnum": str(len(list(self.devices.iterdir())) + 2),
            "speed": speed, "idVendor": f"{vid:04x}", "idProduct": f"{pid:04x}",
            "bcdDevice": "0100", "bDeviceClass": f"{device_class:02x}",
            "bDeviceSubClass": "00", "bDeviceProtocol": "00", "bConfigurationValue": "1",
            "bNumConfigurations": "1", "bNumInterfaces": f"{len(interfaces):2d}",
        }
        for name, value in attrs.items():
            (path / name).write_text(value + "\n")
        for n, (c, s, p) in enumerate(interfaces):
            intf = path / f"{busid}:1.{n}"
            intf.mkdir()
            for name, number in (("bInterfaceClass", c), ("bInterfaceSubClass", s),
                                 ("bInterfaceProtocol", p)):
                (intf / name).write_text(f"{number:02x}\n")
        os.symlink(path, self.devices / busid)
        if driver is not None:
            self.set_driver(busid, driver)
        return path

    def set_driver(self, busid: str, driver: str) -> None:
        path = (self.devices / busid).resolve()
        link = path / "driver"
        if link.is_symlink():
            link.unlink()
        for bound in self.drivers.glob(f"*/{busid}"):  # (its old driver lets it go)
            bound.unlink()
        os.symlink(self.drivers / driver, link)
        if driver == "usbip-host":
            os.symlink(path, self.drivers / driver / busid)
            (path / "usbip_status").write_text("1\n")
            (path / "usbip_sockfd").write_text("")

    def add_vudc(self, n: int, descriptor: bytes | None = None, *,
                 speed: str = "high-speed", function: str | None = "msc") -> Path:
        """usbip-vudc.<n>, a UDC of the kernel's usbip-vudc; ``descriptor``: the device
        descriptor of the gadget bound to it (None: no gadget, dev_desc unreadable)."""
        name = f"usbip-vudc.{n}"
        path = self.root / "devices/platform" / name
        udc = path / "udc" / name
        udc.mkdir(parents=True)
        driver = self.root / "bus/platform/drivers/usbip-vudc"
        driver.mkdir(parents=True, exist_ok=True)
        for attr in ("bind", "unbind", "uevent"):
            (driver / attr).write_text("")
        os.symlink(path, driver / name)
        if descriptor is not None:
            (path / "dev_desc").write_bytes(descriptor)
        (path / "usbip_status").write_text("1\n")
        (path / "usbip_sockfd").write_text("")
        (udc / "current_speed").write_text((speed if descriptor else "UNKNOWN") + "\n")
        (udc / "uevent").write_text("USB_UDC_NAME=usbip-vudc\n" + (
            f"USB_UDC_DRIVER={function}\n" if descriptor and function else ""))
        return path

    def install_modules(self, *names: str) -> None:
        """This kernel's module tree (see the ``fake`` fixture) has ``names``."""
        base = self.modules / os.uname().release
        base.mkdir(parents=True, exist_ok=True)
        with open(base / "modules.dep", "a") as dep:
            for name in names:
                dep.write(f"kernel/drivers/usb/usbip/{name}.ko: "
                          "kernel/drivers/usb/usbip/usbip-core.ko\n")

    def load_usbip_host(self) -> Path:
        driver = self.drivers / "usbip-host"
        driver.mkdir()
        for attr in ("bind", "unbind", "match_busid", "rebind"):
            (driver / attr).write_text("")
        return driver

    def load_vhci(self, ports_per_hub: int = 2) -> Path:
        hc = self.root / "devices/platform/vhci_hcd.0"
        hc.mkdir(parents=True)
        for attr in ("attach", "detach"):
            (hc / attr).write_text("")
        (hc / "nports").write_text(f"{2 * ports_per_hub}\n")
        self.set_vhci_status({}, ports_per_hub)
        return hc

    def set_vhci_status(self, used: dict[int, tuple[int, int, str]], ports_per_hub: int = 2
                        ) -> None:
        """used: port -> (speed, devid, local busid); the rest are free."""
        lines = [VHCI_HEADER]
        for port in range(2 * ports_per_hub):
            hub = "hs" if port < ports_per_hub else "ss"
            if port in used:
                speed, devid, lbusid = used[port]
                lines.append(f"{hub}  {port:04d} 006 {speed:03d} {devid:08x} 000003 {lbusid}\n")
            else:
                lines.append(f"{hub}  {port:04d} 004 000 00000000 000000 0-0\n")
        (self.root / "devices/platform/vhci_hcd.0/status").write_text("".join(lines))


def written(path: Path) -> str:
    return path.read_text()
