"""vhci-hcd through sysfs: hand it an imported socket, detach a port, list the ports.

This is what `usbip attach/detach/port` do, with the same files: the attach
and detach attributes of vhci_hcd.0, its status tables, and the per-port
records in /var/run/vhci_hcd that remember which server each port came from.
C `usbip port` reads the records usbipy writes, and the other way round.
"""

from __future__ import annotations

import errno
import json
import os
import socket
from dataclasses import dataclass
from enum import IntEnum
from pathlib import Path

from ..errors import UsbipError
from ..protocol import DeviceInfo, Speed
from ..tls import TlsSession
from . import sysfs
from .modules import load_hint, module_installed

#: Where `usbip attach` records each port's server (VHCI_STATE_PATH).
VHCI_STATE_DIR = Path("/var/run/vhci_hcd")


class VhciError(UsbipError):
    """vhci-hcd is missing, full, or refused a request; the message says what to do."""


class PortStatus(IntEnum):
    """A vhci port's state (VDEV_ST_* of enum usbip_device_status)."""

    NULL = 4
    NOTASSIGNED = 5
    USED = 6
    ERROR = 7

    @property
    def label(self) -> str:
        """As usbip_status_string prints it."""
        return {4: "Port Available", 5: "Port Initializing", 6: "Port in Use",
                7: "Port Error"}[self.value]


SPEED_LABELS = {
    Speed.UNKNOWN: "Unknown Speed", Speed.LOW: "Low Speed(1.5Mbps)",
    Speed.FULL: "Full Speed(12Mbps)", Speed.HIGH: "High Speed(480Mbps)",
    Speed.WIRELESS: "Wireless", Speed.SUPER: "Super Speed(5000Mbps)",
    Speed.SUPER_PLUS: "Super Speed Plus(10000Mbps)",
}


@dataclass(frozen=True)
class VhciPort:
    """One line of vhci_hcd's status table."""

    port: int
    #: "hs" (the USB 2 hub: low, full and high speed) or "ss" (SuperSpeed).
    hub: str
    status: PortStatus
    speed: Speed
    devid: int
    local_busid: str

    @property
    def in_use(self) -> bool:
        return self.status not in (PortStatus.NULL, PortStatus.NOTASSIGNED)


@dataclass(frozen=True)
class Record:
    """/var/run/vhci_hcd/portN: "host port busid".

    usbipy adds a second line, which C `usbip port` does not read: the TLS
    session as JSON, when the connection is encrypted.
    """

    host: str
    service: str
    busid: str
    #: version, cipher, peer (the server's verified identity), kernel
    tls: dict[str, object] | None = None

    @property
    def url(self) -> str:
        return f"usbip://{self.host}:{self.service}/{self.busid}"


@dataclass(frozen=True)
class ImportedDevice:
    """A vhci port with a device on it, as `usbip port` shows it."""

    port: VhciPort
    #: The device as the local kernel enumerated it (None while it enumerates).
    local: sysfs.UsbDevice | None
    record: Record | None

    @property
    def remote_busnum(self) -> int:
        return self.port.devid >> 16

    @property
    def remote_devnum(self) -> int:
        return self.port.devid & 0xFFFF


def controller_dir() -> Path:
    return sysfs.SYSFS_ROOT / "devices/platform/vhci_hcd.0"


def require_vhci() -> Path:
    hc = controller_dir()
    if not (hc / "attach").exists():
        hint = load_hint("vhci-hcd")
        if not module_installed("vhci-hcd"):
            hint += "; or use the userspace client (usbipy.connect, usbipy.pyusb), which "
            hint += "needs no module"
        raise VhciError(f"vhci-hcd is not loaded: {hint}")
    return hc


def _parse_status(text: str) -> list[VhciPort]:
    ports = []
    for line in text.splitlines()[1:]:  # the first line is the header
        fields = line.split()
        if len(fields) < 7:
            continue
        hub, port, status, speed, devid, _sockfd, local_busid = fields[:7]
        try:
            ports.append(VhciPort(int(port), hub, PortStatus(int(status)),
                                  Speed(int(speed)) if int(speed) in Speed._value2member_map_
                                  else Speed.UNKNOWN, int(devid, 16), local_busid))
        except ValueError:
            continue
    return ports


def read_ports() -> list[VhciPort]:
    """Every port of every vhci controller, by port number."""
    hc = require_vhci()
    controllers = len([p for p in hc.parent.iterdir() if p.name.startswith("vhci_hcd.")])
    ports: list[VhciPort] = []
    for n in range(max(1, controllers)):
        name = "status" if n == 0 else f"status.{n}"
        ports.extend(_parse_status(sysfs.read_attr(hc / name) + "\n"))
    return sorted(ports, key=lambda p: p.port)


def free_port(ports: list[VhciPort], speed: Speed) -> VhciPort | None:
    """A free port on the hub that matches ``speed``, as usbip_vhci_get_free_port."""
    hub = "ss" if speed >= Speed.SUPER else "hs"
    return next((p for p in ports if p.hub == hub and p.status is PortStatus.NULL), None)


def attach_socket(sock: socket.socket, device: DeviceInfo) -> int:
    """Give vhci-hcd a socket that has just imported ``device``; returns the port."""
    hc = require_vhci()
    tried: set[int] = set()
    while True:
        ports = [p for p in read_ports() if p.port not in tried]
        port = free_port(ports, device.speed)
        if port is None:
            hub = "SuperSpeed" if device.speed >= Speed.SUPER else "high-speed"
            raise VhciError(f"no free {hub} port on vhci-hcd: detach a device "
                            "('usbipy port', 'usbipy detach -p PORT') or load vhci-hcd "
                            "with more ports")
        line = f"{port.port} {sock.fileno()} {device.devid} {int(device.speed)}"
        try:
            sysfs.write_attr(hc / "attach", line)
            return port.port
        except OSError as exc:
            if exc.errno == errno.EBUSY:
                tried.add(port.port)  # another attach took it meanwhile: try the next one
                continue
            raise VhciError(f"vhci-hcd refused the device: {exc.strerror or exc}") from exc


def record_path(port: int) -> Path:
    return VHCI_STATE_DIR / f"port{port}"


def write_record(port: int, record: Record, tls: TlsSession | None = None,
                 devid: int | None = None) -> None:
    """Write the port's record; with ``tls``, a second line for the device ``devid``."""
    VHCI_STATE_DIR.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd = os.open(record_path(port), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o700)
    with os.fdopen(fd, "w") as f:
        f.write(f"{record.host} {record.service} {record.busid}\n")
        if tls is not None:
            f.write(json.dumps({"tls": tls.as_dict(), "devid": devid}) + "\n")


def read_record(port: int) -> Record | None:
    try:
        lines = record_path(port).read_text().splitlines()
    except OSError:
        return None
    fields = lines[0].split() if lines else []
    if len(fields) < 3:
        return None
    tls = None
    if len(lines) > 1:
        try:
            extra = json.loads(lines[1])
        except ValueError:
            extra = None
        if isinstance(extra, dict) and isinstance(extra.get("tls"), dict):
            tls = {**extra["tls"], "devid": extra.get("devid")}
    return Record(fields[0], fields[1], fields[2], tls=tls)


def remove_record(port: int) -> None:
    try:
        record_path(port).unlink()
        VHCI_STATE_DIR.rmdir()  # as usbip detach: only succeeds when it is empty
    except OSError:
        pass


def detach(port: int) -> None:
    """`usbip detach -p PORT`."""
    hc = require_vhci()
    ports = {p.port: p for p in read_ports()}
    if port not in ports:
        raise VhciError(f"invalid port {port}: vhci-hcd has ports 0 to {len(ports) - 1}")
    if ports[port].status is PortStatus.NULL:
        raise VhciError(f"port {port} is already detached")
    remove_record(port)
    try:
        sysfs.write_attr(hc / "detach", str(port))
    except OSError as exc:
        raise VhciError(f"cannot detach port {port}: {exc.strerror or exc}") from exc


def imported_devices() -> list[ImportedDevice]:
    """The ports that hold a device, with what the local kernel and the record say."""
    result = []
    for port in read_ports():
        if not port.in_use:
            continue
        try:
            local: sysfs.UsbDevice | None = sysfs.read_device(port.local_busid)
        except sysfs.SysfsError:
            local = None
        record = read_record(port.port)
        if record is not None and record.tls is not None and (
                record.tls.get("devid") != port.devid):
            # written for another device: that session is gone, whatever is there now
            record = Record(record.host, record.service, record.busid)
        result.append(ImportedDevice(port, local, record))
    return result
