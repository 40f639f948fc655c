"""A PyUSB backend: a device on a USB/IP server looks local to PyUSB.

An existing PyUSB program changes one line::

    import usb.core
    import usbipy.pyusb

    backend = usbipy.pyusb.get_backend("usbip://192.0.2.7/1-1")
    dev = usb.core.find(backend=backend, idVendor=0x1209)
    dev.set_configuration()
    print(usb.util.get_string(dev, dev.iProduct))

``get_backend`` takes ``"HOST"``, ``"HOST:PORT"``, ``"[V6ADDR]:PORT"`` or a URL
``usbip://HOST[:PORT][/BUSID]``, and ``busid=`` as a keyword; without a
busid, PyUSB sees every device the server exports. ``usbip://HOST/VID:PID``
(or ``VID:PID:SERIAL``) shows the devices with those ids, at whatever busid
they have (a serial is read by a short import of each candidate). A device is held (imported)
while PyUSB has it open: from its first request until every ``Device`` found
for it is disposed (``usb.util.dispose_resources``) or collected. Reading the
descriptors of a device not seen before imports it for a moment (usbip-host
resets a device after such an import): give the busid when you know it.

It implements PyUSB's ``usb.backend.IBackend`` on the blocking client
(:mod:`usbipy.client.sync`): control, bulk, interrupt and isochronous
transfers with PyUSB's timeouts (milliseconds, 0 for none; a transfer that
times out is unlinked on the server), set configuration and alternate
setting, clear halt, and reset (SET_FEATURE(PORT_RESET), which usbip-host
and usbipyd turn into a device reset). Errors are PyUSB's own, with libusb's
codes and errno values: a stall is ``USBError`` with errno EPIPE, a timeout
``USBTimeoutError``, a device or server gone ENODEV. Claiming an interface
needs nothing: an imported device is the client's alone.

PyUSB is an optional dependency: ``pip install usbipy[pyusb]``.
"""

from __future__ import annotations

import errno
import fnmatch
import logging
import ssl
import threading
import time
from array import array
from collections.abc import Callable
from dataclasses import asdict, dataclass
from types import SimpleNamespace
from typing import Any, NoReturn, ParamSpec, TypeVar

try:
    import usb.backend
    from usb.core import USBError, USBTimeoutError
except ImportError as exc:  # (an optional extra: say which)
    raise ImportError("usbipy.pyusb needs PyUSB: pip install 'usbipy[pyusb]'") from exc

from .client.address import parse_address
from .client.errors import (
    ClientError,
    DeviceGone,
    ImportRefused,
    Overflow,
    ServerGone,
    Stalled,
    TransferTimeout,
    UrbError,
)
from .client.identity import BUSY, DeviceSpec, serial_of
from .client.sync import Device, connect, list_devices
from .client.transfers import CONNECT_TIMEOUT
from .errors import UsbipError
from .escape import printable
from .keepalive import DEFAULT, Keepalive
from .protocol import DeviceInfo, Direction, OpStatus, Speed
from .protocol.constants import USBIP_PORT
from .usb.descriptors import DescriptorType
from .usb.parse import (
    ConfigurationDescriptor,
    DescriptorError,
    DeviceDescriptor,
    parse_configuration,
    parse_device,
)
from .usb.requests import (
    CLEAR_FEATURE,
    DIR_IN,
    ENDPOINT_HALT,
    GET_CONFIGURATION,
    GET_DESCRIPTOR,
    PORT_REQUEST_TYPE,
    PORT_RESET,
    RECIPIENT_ENDPOINT,
    RECIPIENT_INTERFACE,
    SET_CONFIGURATION,
    SET_FEATURE,
    SET_INTERFACE,
    SETUP,
)

__all__ = ["UsbipBackend", "get_backend", "parse_address"]

log = logging.getLogger("usbipy.pyusb")
_P = ParamSpec("_P")
_T = TypeVar("_T")

# libusb's error codes (libusb.h), which PyUSB's own backends put in USBError
LIBUSB_ERROR_IO = -1
LIBUSB_ERROR_NO_DEVICE = -4
LIBUSB_ERROR_NOT_FOUND = -5
LIBUSB_ERROR_BUSY = -6
LIBUSB_ERROR_TIMEOUT = -7
LIBUSB_ERROR_OVERFLOW = -8
LIBUSB_ERROR_PIPE = -9

#: libusb's speed codes (enum libusb_speed), by the kernel's (enum usb_device_speed).
_SPEEDS = {Speed.LOW: 1, Speed.FULL: 2, Speed.HIGH: 3, Speed.WIRELESS: 3, Speed.SUPER: 4,
           Speed.SUPER_PLUS: 5}

#: Seconds a device may answer DEV_BUSY when opened right after it was released
#: (usbip-host resets a device after its connection ends, then offers it again).
REOPEN_WAIT = 10.0
#: Seconds for the descriptor requests the backend makes by itself.
DESCRIPTOR_TIMEOUT = 5.0


@dataclass(frozen=True, eq=False)
class _DeviceId:
    """What PyUSB holds for an enumerated device (its ``dev``): the device as it
    was listed, and its descriptors as they were read then."""

    info: DeviceInfo
    descriptor: DeviceDescriptor
    configurations: tuple[ConfigurationDescriptor, ...]

    @property
    def busid(self) -> str:
        return self.info.busid

    @property
    def identity(self) -> tuple[str, int, int, int, int, int]:
        return _identity(self.info)


class _Descriptor(SimpleNamespace):
    """A descriptor as PyUSB reads it: fields as attributes."""


class _Handle:
    """What PyUSB holds for an opened device (its ``dev_handle``): the import
    it shares with the other handles of the same device, and the settings made
    through it (to size isochronous packets)."""

    def __init__(self, session: _Session, dev: _DeviceId) -> None:
        self.session = session
        self.device = session.device
        self.dev = dev
        self.configuration: int | None = None
        self.alternates: dict[int, int] = {}


class _Session:
    """One import (one connection), shared by every open handle of the device."""

    def __init__(self, device: Device, dev: _DeviceId) -> None:
        self.device = device
        self.dev = dev
        self.handles = 0


class UsbipBackend(usb.backend.IBackend):  # type: ignore[misc]
    """PyUSB's backend interface over USB/IP; see :func:`get_backend`."""

    def __init__(self, host: str, port: int = USBIP_PORT, busid: str | None = None, *,
                 tls: ssl.SSLContext | None = None, server_hostname: str | None = None,
                 keepalive: Keepalive = DEFAULT, timeout: float = CONNECT_TIMEOUT,
                 resume: bool = False, device: DeviceSpec | None = None) -> None:
        self.host = host
        self.port = port
        self.busid = busid
        #: By identity: only the devices with these ids (and serial), wherever they are.
        self.device = device
        #: Serials read (by a short import), by device identity.
        self._serials: dict[tuple[str, int, int, int, int, int], str | None] = {}
        self._options: dict[str, Any] = dict(tls=tls, server_hostname=server_hostname,
                                             keepalive=keepalive, timeout=timeout)
        #: Whether an open device resumes a lost connection (where the server offers it).
        self._resume = resume
        #: Guards _sessions, _opening and _known; never held over network I/O.
        self._lock = threading.Lock()
        #: The open imports, by busid.
        self._sessions: dict[str, _Session] = {}
        #: busid -> set while a thread imports it (others wait instead of colliding).
        self._opening: dict[str, threading.Event] = {}
        #: Devices whose descriptors were read, by identity: a device enumerated again
        #: is not imported again (for usbip-host, each import ends in a reset).
        self._known: dict[tuple[str, int, int, int, int, int], _DeviceId] = {}

    def __repr__(self) -> str:
        which = self.busid or (str(self.device) if self.device is not None else None)
        return (f"<UsbipBackend usbip://{printable(self.host)}:{self.port}"
                f"{'/' + printable(which) if which else ''}>")

    # --- enumeration and descriptors ---------------------------------------------

    def enumerate_devices(self) -> list[_DeviceId]:
        try:
            listed = list_devices(self.host, self.port, **self._options)
        except UsbipError as exc:
            _raise(exc)
        with self._lock:  # ours are held: the server lists them no more
            held = [s.dev for s in self._sessions.values() if not s.device.closed]
        found: list[_DeviceId] = []
        for info in sorted([*listed, *(d.info for d in held)], key=lambda i: _busid_key(
                i.busid)):
            if self.busid is not None and info.busid != self.busid:
                continue
            if any(d.busid == info.busid for d in found):
                continue
            if self.device is not None and not self._is_device(info):
                continue
            try:
                found.append(self._described(info))
            except (UsbipError, DescriptorError) as exc:
                # (a device another client holds, or one that answers nonsense)
                log.warning("%s:%d: %s left out: %s", printable(self.host), self.port,
                            printable(info.busid), exc)
        if self.busid is not None and not found:
            log.warning("%s:%d exports no device %s", printable(self.host), self.port,
                        printable(self.busid))
        return found

    def _is_device(self, info: DeviceInfo) -> bool:
        """Whether ``info`` has the ids (and serial) asked for; a serial is read once
        per device, by a short import."""
        spec = self.device
        assert spec is not None
        if not spec.matches_ids(info):
            return False
        if spec.serial is None:
            return True
        key = _identity(info)
        with self._lock:
            held = any(s.dev.busid == info.busid for s in self._sessions.values())
        if key not in self._serials and not held:
            try:
                device = self._import(info.busid)
            except UsbipError as exc:
                log.warning("%s:%d: %s left out: %s", printable(self.host), self.port,
                            printable(info.busid), exc)
                return False
            with device:
                try:
                    self._serials[key] = serial_of(
                        lambda t, r, v, i, n: device.control(t, r, v, i, n,
                                                             timeout=DESCRIPTOR_TIMEOUT))
                except UsbipError as exc:  # (a stall, a time-out: not a device to show)
                    log.warning("%s:%d: %s left out: its serial number cannot be read: %s",
                                printable(self.host), self.port, printable(info.busid), exc)
                    return False
        serial = self._serials.get(key)
        return serial is not None and fnmatch.fnmatchcase(serial, spec.serial)

    def _described(self, info: DeviceInfo) -> _DeviceId:
        """The device with its descriptors: known already, or read through a short
        import (or the open one)."""
        identity = _identity(info)
        with self._lock:
            known = self._known.get(identity)
            session = self._sessions.get(info.busid)
        if known is not None:
            return known
        if session is not None and not session.device.closed and (
                session.dev.identity == identity):
            return session.dev
        device = self._import(info.busid)
        try:
            if _identity(device.info) != identity:
                raise ClientError(f"{printable(info.busid)} changed while it was read")
            descriptor = parse_device(device.control(
                DIR_IN, GET_DESCRIPTOR, DescriptorType.DEVICE << 8, 0, 18,
                timeout=DESCRIPTOR_TIMEOUT))
            configurations = []
            for index in range(descriptor.bNumConfigurations):
                head = device.control(DIR_IN, GET_DESCRIPTOR,
                                      DescriptorType.CONFIGURATION << 8 | index, 0, 9,
                                      timeout=DESCRIPTOR_TIMEOUT)
                if len(head) < 4:
                    raise DescriptorError(f"configuration {index}: {len(head)} bytes came")
                total = int.from_bytes(head[2:4], "little")
                configurations.append(parse_configuration(device.control(
                    DIR_IN, GET_DESCRIPTOR, DescriptorType.CONFIGURATION << 8 | index, 0,
                    total, timeout=DESCRIPTOR_TIMEOUT)))
        finally:
            device.close()
        dev = _DeviceId(info, descriptor, tuple(configurations))
        with self._lock:
            self._known[identity] = dev
        return dev

    def _import(self, busid: str) -> Device:
        """Import ``busid``, waiting out DEV_BUSY (NA from usbipd) for a while: usbip-host
        offers a device again only once the reset after its last connection is done."""
        deadline = time.monotonic() + REOPEN_WAIT
        while True:
            try:
                return connect(self.host, busid, self.port, resume=self._resume,
                               **self._options)
            except ImportRefused as exc:
                if exc.status not in BUSY or time.monotonic() > deadline:
                    raise
            time.sleep(0.1)

    def get_parent(self, dev: _DeviceId) -> None:
        return None

    def get_device_descriptor(self, dev: _DeviceId) -> _Descriptor:
        info = dev.info
        ports = _port_numbers(info.busid)
        return _Descriptor(**asdict(dev.descriptor), bus=info.busnum, address=info.devnum,
                           port_number=ports[-1] if ports else None,
                           port_numbers=ports or None, speed=_SPEEDS.get(info.speed))

    def _configuration(self, dev: _DeviceId, config: int) -> ConfigurationDescriptor:
        if not 0 <= config < len(dev.configurations):
            _raise_code("No such configuration", LIBUSB_ERROR_NOT_FOUND, errno.ENOENT)
        return dev.configurations[config]

    def get_configuration_descriptor(self, dev: _DeviceId, config: int) -> _Descriptor:
        c = self._configuration(dev, config)
        return _Descriptor(
            bLength=c.bLength, bDescriptorType=c.bDescriptorType, wTotalLength=c.wTotalLength,
            bNumInterfaces=c.bNumInterfaces, bConfigurationValue=c.bConfigurationValue,
            iConfiguration=c.iConfiguration, bmAttributes=c.bmAttributes,
            bMaxPower=c.bMaxPower, extra_descriptors=list(c.extra))

    def get_interface_descriptor(self, dev: _DeviceId, intf: int, alt: int,
                                 config: int) -> _Descriptor:
        interfaces = self._configuration(dev, config).interfaces
        if not (0 <= intf < len(interfaces) and 0 <= alt < len(interfaces[intf])):
            raise IndexError("Invalid interface index")  # (as PyUSB's libusb1 backend)
        i = interfaces[intf][alt]
        return _Descriptor(
            bLength=i.bLength, bDescriptorType=i.bDescriptorType,
            bInterfaceNumber=i.bInterfaceNumber, bAlternateSetting=i.bAlternateSetting,
            bNumEndpoints=i.bNumEndpoints, bInterfaceClass=i.bInterfaceClass,
            bInterfaceSubClass=i.bInterfaceSubClass, bInterfaceProtocol=i.bInterfaceProtocol,
            iInterface=i.iInterface, extra_descriptors=list(i.extra))

    def get_endpoint_descriptor(self, dev: _DeviceId, ep: int, intf: int, alt: int,
                                config: int) -> _Descriptor:
        interfaces = self._configuration(dev, config).interfaces
        if not (0 <= intf < len(interfaces) and 0 <= alt < len(interfaces[intf])
                and 0 <= ep < len(interfaces[intf][alt].endpoints)):
            raise IndexError("Invalid endpoint index")  # (as PyUSB's libusb1 backend)
        e = interfaces[intf][alt].endpoints[ep]
        return _Descriptor(
            bLength=e.bLength, bDescriptorType=e.bDescriptorType,
            bEndpointAddress=e.bEndpointAddress, bmAttributes=e.bmAttributes,
            wMaxPacketSize=e.wMaxPacketSize, bInterval=e.bInterval, bRefresh=e.bRefresh,
            bSynchAddress=e.bSynchAddress, extra_descriptors=list(e.extra))

    # --- opening and closing -------------------------------------------------------

    def open_device(self, dev: _DeviceId) -> _Handle:
        busid = dev.busid
        while True:
            with self._lock:
                session = self._sessions.get(busid)
                if session is not None and session.device.closed:
                    del self._sessions[busid]  # (its connection is gone: import afresh)
                    session = None
                if session is not None:
                    if session.dev.identity != dev.identity:
                        _raise_code(f"{printable(busid)} is another device now (it was "
                                    "unplugged): find it again", LIBUSB_ERROR_NO_DEVICE,
                                    errno.ENODEV)
                    session.handles += 1
                    return _Handle(session, dev)
                opening = self._opening.get(busid)
                if opening is None:
                    self._opening[busid] = threading.Event()
                    break
            opening.wait(REOPEN_WAIT + CONNECT_TIMEOUT)  # (another thread imports it)
        try:
            device = self._import(busid)
        except UsbipError as exc:
            self._opened(busid, None)
            _raise(exc)
        if _identity(device.info) != dev.identity:
            device.close()
            self._opened(busid, None)
            _raise_code(f"{printable(busid)} is another device now (it was unplugged): "
                        "find it again", LIBUSB_ERROR_NO_DEVICE, errno.ENODEV)
        session = _Session(device, dev)
        session.handles = 1
        self._opened(busid, session)
        return _Handle(session, dev)

    def _opened(self, busid: str, session: _Session | None) -> None:
        with self._lock:
            if session is not None:
                self._sessions[busid] = session
            event = self._opening.pop(busid, None)
        if event is not None:
            event.set()

    def close_device(self, dev_handle: _Handle) -> None:
        session = dev_handle.session
        with self._lock:
            session.handles -= 1
            last = session.handles <= 0
            if last and self._sessions.get(session.dev.busid) is session:
                del self._sessions[session.dev.busid]
        if last:
            session.device.close()

    def close(self) -> None:
        """Release every device this backend imported."""
        with self._lock:
            sessions = list(self._sessions.values())
            self._sessions.clear()
        for session in sessions:
            session.device.close()

    # --- requests ------------------------------------------------------------------

    def set_configuration(self, dev_handle: _Handle, config_value: int) -> None:
        _call(dev_handle.device.control, 0x00, SET_CONFIGURATION, config_value, 0, b"",
              timeout=DESCRIPTOR_TIMEOUT)
        dev_handle.configuration = config_value
        dev_handle.alternates.clear()  # (USB 2.0 9.1.1.5: every interface at setting 0)

    def get_configuration(self, dev_handle: _Handle) -> int:
        data = _call(dev_handle.device.control, DIR_IN, GET_CONFIGURATION, 0, 0, 1,
                     timeout=DESCRIPTOR_TIMEOUT)
        if len(data) != 1:
            _raise_code("GET_CONFIGURATION answered no byte", LIBUSB_ERROR_IO, errno.EIO)
        return data[0]

    def set_interface_altsetting(self, dev_handle: _Handle, intf: int,
                                 altsetting: int) -> None:
        _call(dev_handle.device.control, RECIPIENT_INTERFACE, SET_INTERFACE, altsetting,
              intf, b"", timeout=DESCRIPTOR_TIMEOUT)
        dev_handle.alternates[intf] = altsetting

    def claim_interface(self, dev_handle: _Handle, intf: int) -> None:
        """Nothing to do: the import made the whole device this client's alone."""

    def release_interface(self, dev_handle: _Handle, intf: int) -> None:
        """Nothing to do (see :meth:`claim_interface`)."""

    def clear_halt(self, dev_handle: _Handle, ep: int) -> None:
        # usbip-host sees CLEAR_FEATURE(ENDPOINT_HALT) and calls usb_clear_halt()
        # (stub_rx.c, tweak_clear_halt_cmd), which resets the host side's toggle too.
        _call(dev_handle.device.control, RECIPIENT_ENDPOINT, CLEAR_FEATURE, ENDPOINT_HALT,
              ep, b"", timeout=DESCRIPTOR_TIMEOUT)

    def reset_device(self, dev_handle: _Handle) -> None:
        # The hub request vhci-hcd sends for a port reset: usbip-host answers it with
        # usb_reset_device() (stub_rx.c, tweak_reset_device_cmd); usbipyd the same way.
        _call(dev_handle.device.control, PORT_REQUEST_TYPE, SET_FEATURE, PORT_RESET, 0, b"",
              timeout=DESCRIPTOR_TIMEOUT)
        dev_handle.configuration = None
        dev_handle.alternates.clear()

    def is_kernel_driver_active(self, dev_handle: _Handle, intf: int) -> bool:
        return False  # no driver of this host has the device

    def detach_kernel_driver(self, dev_handle: _Handle, intf: int) -> None:
        pass

    def attach_kernel_driver(self, dev_handle: _Handle, intf: int) -> None:
        pass

    # --- transfers -----------------------------------------------------------------

    # (The transfers are PyUSB's hot path: no helper calls in them that a line can do.)

    def ctrl_transfer(self, dev_handle: _Handle, bmRequestType: int, bRequest: int,
                      wValue: int, wIndex: int, data: array[int], timeout: int) -> int:
        try:
            if bmRequestType & DIR_IN:
                got = dev_handle.device.control(bmRequestType, bRequest, wValue, wIndex,
                                                len(data) * data.itemsize,
                                                timeout=timeout / 1000 if timeout else None)
                n = len(got)
                memoryview(data).cast("B")[:n] = got
                return n
            out = data.tobytes()
            return dev_handle.device.transfer(
                0, Direction.OUT, data=out,
                setup=SETUP.pack(bmRequestType, bRequest, wValue, wIndex, len(out)),
                timeout=timeout / 1000 if timeout else None).actual_length
        except UsbipError as exc:
            _raise(exc)

    def bulk_write(self, dev_handle: _Handle, ep: int, intf: int, data: array[int],
                   timeout: int) -> int:
        try:
            return dev_handle.device.bulk_write(ep, data.tobytes(),
                                                timeout=timeout / 1000 if timeout else None)
        except UsbipError as exc:
            _raise(exc)

    def bulk_read(self, dev_handle: _Handle, ep: int, intf: int, buff: array[int],
                  timeout: int) -> int:
        try:
            got = dev_handle.device.bulk_read(ep, len(buff) * buff.itemsize,
                                              timeout=timeout / 1000 if timeout else None)
        except UsbipError as exc:
            _raise(exc)
        n = len(got)
        memoryview(buff).cast("B")[:n] = got
        return n

    def intr_write(self, dev_handle: _Handle, ep: int, intf: int, data: array[int],
                   timeout: int) -> int:
        return _call(dev_handle.device.interrupt_write, ep, data.tobytes(),
                     timeout=_seconds(timeout))

    def intr_read(self, dev_handle: _Handle, ep: int, intf: int, buff: array[int],
                  timeout: int) -> int:
        got = _call(dev_handle.device.interrupt_read, ep, len(buff) * buff.itemsize,
                    timeout=_seconds(timeout))
        return _fill(buff, got)

    def iso_write(self, dev_handle: _Handle, ep: int, intf: int, data: array[int],
                  timeout: int) -> int:
        """One isochronous URB: ``data`` cut into packets of the endpoint's size in the
        alternate setting in force; the bytes the device took."""
        raw = data.tobytes()
        if not raw:
            return 0
        size = _packet_size(dev_handle, ep)
        packets = [raw[i:i + size] for i in range(0, len(raw), size)]
        results = _call(dev_handle.device.iso_write, ep, packets, timeout=_seconds(timeout))
        return sum(r.actual_length for r in results if r.status == 0)

    def iso_read(self, dev_handle: _Handle, ep: int, intf: int, buff: array[int],
                 timeout: int) -> int:
        """One isochronous URB of as many packets as fill ``buff``; what came, packet
        after packet, at the start of ``buff`` (a packet with an error adds nothing)."""
        length = len(buff) * buff.itemsize
        if not length:
            return 0
        size = _packet_size(dev_handle, ep)
        lengths = [min(size, length - at) for at in range(0, length, size)]
        results = _call(dev_handle.device.iso_read, ep, lengths, timeout=_seconds(timeout))
        return _fill(buff, b"".join(r.data for r in results if r.status == 0))


def get_backend(address: str, busid: str | None = None, *,
                tls: ssl.SSLContext | None = None, server_hostname: str | None = None,
                keepalive: Keepalive = DEFAULT,
                timeout: float = CONNECT_TIMEOUT, resume: bool = False) -> UsbipBackend:
    """A PyUSB backend for the devices of the USB/IP server at ``address``.

    ``address``: ``"HOST"``, ``"HOST:PORT"``, ``"[V6ADDR]:PORT"`` or
    ``"usbip://HOST[:PORT][/BUSID]"``; ``busid`` picks one device. A device named by
    ``usbip://HOST/VID:PID[:SERIAL]`` is found at whatever busid it has, and with
    ``usbip://*/VID:PID[:SERIAL]`` on whichever server DNS-SD finds offering it. ``tls``
    (:func:`usbipy.tls.client_context`) for mutual TLS, ``keepalive`` for the
    dead-peer timeout, ``timeout`` (seconds) to connect and import; ``resume``:
    a lost connection is resumed in place where the server offers it (usbipyd).
    """
    host, port, busid = parse_address(address, busid)
    device = None
    if busid is not None and ":" in busid:  # usbip://HOST/VID:PID[:SERIAL]
        try:
            device = DeviceSpec.parse(busid)
        except ClientError as exc:
            raise ValueError(str(exc)) from None
        busid = None
    if host == "*":  # usbip://*/VID:PID[:SERIAL]: wherever DNS-SD finds it
        if device is None:
            raise ValueError(f"usbip://*/ names a device by VID:PID[:SERIAL]: "
                             f"{printable(address)}")
        from .client.fleet import locate

        try:
            found = locate(device, tls=tls, server_hostname=server_hostname)
        except UsbipError as exc:
            _raise(exc)
        host, port = found.host, found.port
    return UsbipBackend(host, port, busid, tls=tls, server_hostname=server_hostname,
                        keepalive=keepalive, timeout=timeout, resume=resume, device=device)


# --- helpers -------------------------------------------------------------------------


def _identity(info: DeviceInfo) -> tuple[str, int, int, int, int, int]:
    """What tells one device from another plugged in at the same busid later."""
    return (info.busid, info.busnum, info.devnum, info.idVendor, info.idProduct,
            info.bcdDevice)


def _busid_key(busid: str) -> tuple[int, ...]:
    """1-2 before 1-10: the order usbip lists busids in (by number, not by text)."""
    return tuple(int(n) if n.isdigit() else -1 for n in busid.replace("-", ".").split("."))


def _port_numbers(busid: str) -> tuple[int, ...]:
    """The hub ports from the root to the device, from its busid: 1-1.2 is (1, 2)."""
    _bus, _, path = busid.partition("-")
    parts = path.split(".")
    if not path or not all(p.isdigit() for p in parts):
        return ()
    return tuple(int(p) for p in parts)


def _packet_size(handle: _Handle, ep: int) -> int:
    """Bytes per (micro)frame of ``ep`` in the configuration and alternate settings
    that ``handle`` set (the first configuration and setting 0 until it sets any)."""
    configurations = handle.dev.configurations
    config = next((c for c in configurations if c.bConfigurationValue == handle.configuration),
                  configurations[0] if configurations else None)
    if config is not None:
        for alternates in config.interfaces:
            chosen = handle.alternates.get(alternates[0].bInterfaceNumber, 0)
            for alt in alternates:
                if alt.bAlternateSetting != chosen:
                    continue
                for endpoint in alt.endpoints:
                    if endpoint.bEndpointAddress == ep and endpoint.bytes_per_interval:
                        return endpoint.bytes_per_interval
    _raise_code(f"endpoint {ep:#04x} moves no data in the alternate setting in force "
                "(set_interface_altsetting first)", LIBUSB_ERROR_IO, errno.EINVAL)


def _seconds(timeout_ms: int | None) -> float | None:
    # PyUSB passes milliseconds, and 0 as libusb's "no timeout"
    return timeout_ms / 1000 if timeout_ms else None


def _fill(buff: array[int], got: bytes) -> int:
    n = len(got)
    memoryview(buff).cast("B")[:n] = got
    return n


def _call(fn: Callable[_P, _T], *args: _P.args, **kwargs: _P.kwargs) -> _T:
    try:
        return fn(*args, **kwargs)
    except UsbipError as exc:
        _raise(exc)


def _raise(exc: UsbipError) -> NoReturn:
    """``exc`` as the USBError a libusb backend raises for the same thing."""
    if isinstance(exc, TransferTimeout):
        raise USBTimeoutError(str(exc), LIBUSB_ERROR_TIMEOUT, errno.ETIMEDOUT) from exc
    if isinstance(exc, Stalled):
        raise USBError(str(exc), LIBUSB_ERROR_PIPE, errno.EPIPE) from exc
    if isinstance(exc, Overflow):
        raise USBError(str(exc), LIBUSB_ERROR_OVERFLOW, errno.EOVERFLOW) from exc
    if isinstance(exc, (DeviceGone, ServerGone)):
        raise USBError(str(exc), LIBUSB_ERROR_NO_DEVICE, errno.ENODEV) from exc
    if isinstance(exc, ImportRefused) and exc.status is OpStatus.DEV_BUSY:
        raise USBError(str(exc), LIBUSB_ERROR_BUSY, errno.EBUSY) from exc
    if isinstance(exc, UrbError):
        raise USBError(str(exc), LIBUSB_ERROR_IO, errno.EIO) from exc
    raise USBError(str(exc), LIBUSB_ERROR_NO_DEVICE, errno.ENODEV) from exc


def _raise_code(text: str, code: int, number: int) -> NoReturn:
    raise USBError(text, code, number)
