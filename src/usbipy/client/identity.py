"""Attach by identity: the device named by VID:PID[:SERIAL], found on one of several
servers, at whatever bus id it has today.

Each attempt reads the servers' device lists afresh, in the order given: the
first server that offers a match serves it, so a device that moved to another
port, or to another server of the list, is found again. A device list carries
the ids but no serial number (OP_REP_DEVLIST has no field for it): with a
serial, each candidate is imported for a moment, and its serial read from its
string descriptor, as a host reads it (GET_DESCRIPTOR). Several matches on one
server are an error that names them, unless the first is asked for.
"""

from __future__ import annotations

import fnmatch
import ssl
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from ..escape import printable
from ..exports.rules import parse_device_spec
from ..protocol import DeviceInfo, OpStatus
from ..usb.descriptors import DescriptorType
from ..usb.requests import GET_DESCRIPTOR
from .errors import ClientError, ImportRefused

#: GET_DESCRIPTOR, standard, device to host (USB 2.0, 9.4.3).
_GET_DESCRIPTOR_IN = 0x80
#: A string descriptor is at most 255 bytes (its bLength is a byte).
_STRING_MAX = 255
_LANGID_EN_US = 0x0409
#: Seconds an import may find the device busy right after a serial was read from it
#: (usbip-host frees a device a moment after its connection closes).
BUSY_AFTER_PROBE = 10.0
#: What an import of a device still being freed is answered: DEV_BUSY by usbipyd,
#: NA by usbipd (usbip_export_device refuses a device that is not available).
BUSY = (OpStatus.DEV_BUSY, OpStatus.NA)


class NoMatch(ClientError):
    """No server offers a device with these ids (now)."""


class SeveralMatches(ClientError):
    """More than one device on a server matches, and the first was not asked for."""


@dataclass(frozen=True)
class DeviceSpec:
    """VID:PID[:SERIAL], ids as lsusb prints them (wildcards * and ? allowed)."""

    vid_pid: str
    serial: str | None = None

    @classmethod
    def parse(cls, text: str) -> DeviceSpec:
        """ClientError, one line, for a spec that is not VID:PID[:SERIAL]."""
        try:
            vid_pid, serial = parse_device_spec(text)
        except ValueError as exc:
            raise ClientError(str(exc)) from None
        return cls(vid_pid, serial)

    def matches_ids(self, device: DeviceInfo) -> bool:
        return fnmatch.fnmatchcase(f"{device.idVendor:04x}:{device.idProduct:04x}",
                                   self.vid_pid)

    def __str__(self) -> str:
        return self.vid_pid + (f":{self.serial}" if self.serial else "")


@dataclass(frozen=True)
class Found:
    """Where the device is now."""

    host: str
    port: int
    busid: str
    device: DeviceInfo


#: (host, port) -> the devices it exports (blocking; raises ClientError or OSError).
ListFn = Callable[[str, int], Sequence[DeviceInfo]]
#: (host, port, busid) -> the device's serial number, or None (blocking).
SerialFn = Callable[[str, int, str], "str | None"]


def find(servers: Sequence[tuple[str, int]], spec: DeviceSpec, *, first: bool,
         list_devices: ListFn, read_serial: SerialFn) -> Found:
    """The device ``spec`` names, on the first of ``servers`` that offers it.

    NoMatch (naming each server that did not answer, and why) when none does;
    SeveralMatches when a server offers more than one and ``first`` is False."""
    failures: list[str] = []
    for host, port in servers:
        try:
            devices = list_devices(host, port)
        except (ClientError, OSError) as exc:
            failures.append(f"{printable(host)}:{port}: {exc}")
            continue
        candidates = [d for d in devices if spec.matches_ids(d)]
        if spec.serial is not None:
            matching = []
            for device in candidates:
                try:
                    serial = read_serial(host, port, device.busid)
                except (ClientError, OSError) as exc:
                    if isinstance(exc, ImportRefused):
                        continue  # (in use by another client: not ours to take anyway)
                    failures.append(f"{printable(host)}:{port}/{printable(device.busid)}: "
                                    f"{exc}")
                    continue
                if serial is not None and fnmatch.fnmatchcase(serial, spec.serial):
                    matching.append(device)
                    if first:
                        break
            candidates = matching
        if len(candidates) > 1 and not first:
            listed = ", ".join(f"{printable(d.busid)} ({d.idVendor:04x}:{d.idProduct:04x})"
                               for d in candidates)
            raise SeveralMatches(f"{len(candidates)} devices on {printable(host)}:{port} "
                                 f"match {printable(str(spec))}: {listed} (give a serial, a "
                                 "bus id with -b, or --first)")
        if candidates:
            chosen = candidates[0]
            return Found(host, port, chosen.busid, chosen)
    where = ", ".join(f"{printable(h)}:{p}" for h, p in servers)
    why = f" ({'; '.join(failures)})" if failures else ""
    raise NoMatch(f"no device {printable(str(spec))} on {where}{why}")


def serial_of(control: Callable[[int, int, int, int, int], bytes]) -> str | None:
    """The device's serial number, read from its string descriptors with ``control``
    (bmRequestType, bRequest, wValue, wIndex, wLength) -> data."""
    device = control(_GET_DESCRIPTOR_IN, GET_DESCRIPTOR,
                     DescriptorType.DEVICE << 8, 0, 18)
    index = device[16] if len(device) >= 17 else 0  # iSerialNumber (USB 2.0, table 9-8)
    if not index:
        return None
    languages = control(_GET_DESCRIPTOR_IN, GET_DESCRIPTOR,
                        DescriptorType.STRING << 8, 0, _STRING_MAX)
    langid = int.from_bytes(languages[2:4], "little") if len(languages) >= 4 else _LANGID_EN_US
    text = control(_GET_DESCRIPTOR_IN, GET_DESCRIPTOR,
                   DescriptorType.STRING << 8 | index, langid, _STRING_MAX)
    if len(text) < 2:
        return None
    return bytes(text[2:text[0]]).decode("utf-16-le", "replace")


def sync_functions(tls: ssl.SSLContext | None, server_hostname: str | None,
                   timeout: float) -> tuple[ListFn, SerialFn]:
    """The blocking client's device list and serial read, with these TLS settings."""
    from . import sync

    def list_devices(host: str, port: int) -> Sequence[DeviceInfo]:
        return sync.list_devices(host, port, tls=tls, server_hostname=server_hostname,
                                 timeout=timeout)

    def read_serial(host: str, port: int, busid: str) -> str | None:
        with sync.connect(host, busid, port, tls=tls, server_hostname=server_hostname,
                          timeout=timeout) as device:
            return serial_of(lambda t, r, v, i, n: device.control(t, r, v, i, n,
                                                                  timeout=timeout))

    return list_devices, read_serial
