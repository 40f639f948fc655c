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
busid, PyUSB sees every device the server exports. A device is held (imported)
while PyUSB has it open: from its first request until
``usb.util.dispose_resources(dev)``, or until the Device object is collected.
Enumerating imports each device just long enough to read its descriptors, so
a ``find()`` keeps no device from other clients.

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
import logging
import ssl
import threading
import time
from array import array
from collections.abc import Callable
from dataclasses import asdict, dataclass
from types import SimpleNamespace
from typing import Any, NoReturn, ParamSpec, TypeVar
from urllib.parse import unquote, urlsplit

import usb.backend
from usb.core import USBError, USBTimeoutError

from .client.errors import (
    Cancelled,
    ClientError,
    DeviceGone,
    ImportRefused,
    Overflow,
    ServerGone,
    Stalled,
    TransferTimeout,
    UrbError,
)
from .client.sync import Device, connect, list_devices
from .client.userspace import CONNECT_TIMEOUT
from .escape import printable
from .keepalive import DEFAULT, Keepalive
from .protocol import DeviceInfo, OpStatus, Speed
from .protocol.constants import USBIP_PORT
from .usb.descriptors import DescriptorType
from .usb.parse import (
    ConfigurationDescriptor,
    DescriptorError,
    DeviceDescriptor,
    EndpointDescriptor,
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
)

__all__ = ["UsbipBackend", "get_backend", "parse_address"]

log = logging.getLogger("usbipy.pyusb")
_P = ParamSpec("_P")
_T = TypeVar("_T")

# libusb's error codes (libusb.h), which PyUSB's own backends put in USBError
LIBUSB_ERROR_IO = -1
LIBUSB_ERROR_NO_DEVICE = -4
LIBUSB_ERROR_BUSY = -6
LIBUSB_ERROR_TIMEOUT = -7
LIBUSB_ERROR_OVERFLOW = -8
LIBUSB_ERROR_PIPE = -9
LIBUSB_ERROR_INTERRUPTED = -10

#: libusb's speed codes (enum libusb_speed), by the kernel's (enum usb_device_speed).
_SPEEDS = {Speed.LOW: 1, Speed.FULL: 2, Speed.HIGH: 3, Speed.WIRELESS: 3, Speed.SUPER: 4,
           Speed.SUPER_PLUS: 5}

#: Seconds a device may answer DEV_BUSY when opened right after it was released
#: (usbip-host resets a device after its connection ends, then offers it again).
REOPEN_WAIT = 5.0
#: Seconds for the descriptor requests the backend makes by itself.
DESCRIPTOR_TIMEOUT = 5.0


def parse_address(address: str, busid: str | None = None) -> tuple[str, int, str | None]:
    """(host, port, busid) from ``"HOST"``, ``"HOST:PORT"``, ``"[V6]:PORT"`` or
    ``"usbip://HOST[:PORT][/BUSID]"``; ValueError naming what is wrong."""
    if "://" in address:
        url = urlsplit(address)
        if url.scheme != "usbip":
            raise ValueError(f"not a usbip:// URL: {printable(address)}")
        host = url.hostname
        try:
            port = url.port or USBIP_PORT
        except ValueError:
            raise ValueError(f"bad port in {printable(address)}") from None
        path = unquote(url.path.strip("/"))
        if path:
            if busid is not None and busid != path:
                raise ValueError(f"the URL names busid {printable(path)}, busid= says "
                                 f"{printable(busid)}")
            busid = path
    else:
        host, port = address, USBIP_PORT
        if address.startswith("["):
            host, _, rest = address[1:].partition("]")
            if rest:
                if not rest.startswith(":") or not rest[1:].isdigit():
                    raise ValueError(f"bad address {printable(address)}")
                port = int(rest[1:])
        elif address.count(":") == 1:
            host, _, text = address.partition(":")
            if not text.isdigit():
                raise ValueError(f"bad port in {printable(address)}")
            port = int(text)
    if not host:
        raise ValueError(f"no host in {printable(address)}")
    if not 0 < port < 65536:
        raise ValueError(f"port {port} out of range")
    return host, port, busid


@dataclass(frozen=True)
class _DeviceId:
    """What PyUSB holds for an enumerated device (its ``dev``)."""

    info: DeviceInfo

    @property
    def busid(self) -> str:
        return self.info.busid


class _Descriptor(SimpleNamespace):
    """A descriptor as PyUSB reads it: fields as attributes."""


class UsbipBackend(usb.backend.IBackend):  # type: ignore[misc]
    """PyUSB's backend interface over USB/IP; see :func:`get_backend`."""

    def __init__(self, host: str, port: int = USBIP_PORT, busid: str | None = None, *,
                 tls: ssl.SSLContext | None = None, server_hostname: str | None = None,
                 keepalive: Keepalive = DEFAULT, timeout: float = CONNECT_TIMEOUT) -> None:
        self.host = host
        self.port = port
        self.busid = busid
        self._options: dict[str, Any] = dict(tls=tls, server_hostname=server_hostname,
                                             keepalive=keepalive, timeout=timeout)
        self._lock = threading.Lock()
        #: Imported devices, by busid: the one asked for, and the opened ones.
        self._sessions: dict[str, Device] = {}
        #: Descriptors read, by busid, with the identity of the device they were
        #: read from (another device may be plugged in at the same busid later).
        self._device_descriptors: dict[str, tuple[tuple[int, ...], DeviceDescriptor]] = {}
        self._configurations: dict[str, list[ConfigurationDescriptor]] = {}

    def __repr__(self) -> str:
        return (f"<UsbipBackend usbip://{printable(self.host)}:{self.port}"
                f"{'/' + printable(self.busid) if self.busid else ''}>")

    # --- enumeration and descriptors ---------------------------------------------

    def enumerate_devices(self) -> list[_DeviceId]:
        try:
            listed = list_devices(self.host, self.port, **self._options)
        except ClientError as exc:
            _raise(exc)
        found = []
        for info in listed:
            if self.busid is not None and info.busid != self.busid:
                continue
            try:
                self._read_descriptors(info)
            except (ClientError, DescriptorError) as exc:
                # (a device another client holds, or one that answers nonsense)
                log.warning("%s:%d: %s left out: %s", printable(self.host), self.port,
                            printable(info.busid), exc)
                continue
            found.append(_DeviceId(info))
        if self.busid is not None and not found:
            log.warning("%s:%d exports no device %s", printable(self.host), self.port,
                        printable(self.busid))
        return found

    def _read_descriptors(self, info: DeviceInfo) -> None:
        busid = info.busid
        identity = _identity(info)
        known = self._device_descriptors.get(busid)
        if known is not None and known[0] == identity:
            return
        with self._lock:
            held = self._sessions.get(busid)
        device = held if held is not None and not held.closed else connect(
            self.host, busid, self.port, **self._options)
        try:
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
            if device is not held:
                device.close()
        self._device_descriptors[busid] = (identity, descriptor)
        self._configurations[busid] = configurations

    def get_parent(self, dev: _DeviceId) -> None:
        return None

    def get_device_descriptor(self, dev: _DeviceId) -> _Descriptor:
        info = dev.info
        descriptor = asdict(self._device_descriptors[info.busid][1])
        return _Descriptor(**descriptor, bus=info.busnum, address=info.devnum,
                           port_number=None, port_numbers=None,
                           speed=_SPEEDS.get(info.speed))

    def _configuration(self, dev: _DeviceId, config: int) -> ConfigurationDescriptor:
        try:
            return self._configurations[dev.busid][config]
        except IndexError:
            _raise_code("No such configuration", LIBUSB_ERROR_NO_DEVICE, errno.ENOENT)

    def get_configuration_descriptor(self, dev: _DeviceId, config: int) -> _Descriptor:
        c = self._configuration(dev, config)
        return _Descriptor(
            bLength=c.bLength, bDescriptorType=c.bDescriptorType, wTotalLength=c.wTotalLength,
            bNumInterfaces=c.bNumInterfaces, bConfigurationValue=c.bConfigurationValue,
            iConfiguration=c.iConfiguration, bmAttributes=c.bmAttributes,
            bMaxPower=c.bMaxPower, extra_descriptors=list(c.extra))

    def get_interface_descriptor(self, dev: _DeviceId, intf: int, alt: int,
                                 config: int) -> _Descriptor:
        try:
            i = self._configuration(dev, config).interfaces[intf][alt]
        except IndexError:
            _raise_code("No such interface", LIBUSB_ERROR_NO_DEVICE, errno.ENOENT)
        return _Descriptor(
            bLength=i.bLength, bDescriptorType=i.bDescriptorType,
            bInterfaceNumber=i.bInterfaceNumber, bAlternateSetting=i.bAlternateSetting,
            bNumEndpoints=i.bNumEndpoints, bInterfaceClass=i.bInterfaceClass,
            bInterfaceSubClass=i.bInterfaceSubClass, bInterfaceProtocol=i.bInterfaceProtocol,
            iInterface=i.iInterface, extra_descriptors=list(i.extra))

    def get_endpoint_descriptor(self, dev: _DeviceId, ep: int, intf: int, alt: int,
                                config: int) -> _Descriptor:
        try:
            e = self._configuration(dev, config).interfaces[intf][alt].endpoints[ep]
        except IndexError:
            _raise_code("No such endpoint", LIBUSB_ERROR_NO_DEVICE, errno.ENOENT)
        return _Descriptor(
            bLength=e.bLength, bDescriptorType=e.bDescriptorType,
            bEndpointAddress=e.bEndpointAddress, bmAttributes=e.bmAttributes,
            wMaxPacketSize=e.wMaxPacketSize, bInterval=e.bInterval, bRefresh=e.bRefresh,
            bSynchAddress=e.bSynchAddress, extra_descriptors=list(e.extra))

    # --- opening and closing -------------------------------------------------------

    def _session(self, busid: str) -> Device:
        with self._lock:
            device = self._sessions.get(busid)
            if device is not None and not device.closed:
                return device
            deadline = time.monotonic() + REOPEN_WAIT
            while True:
                try:
                    device = connect(self.host, busid, self.port, **self._options)
                    break
                except ImportRefused as exc:
                    if exc.status is not OpStatus.DEV_BUSY or time.monotonic() > deadline:
                        _raise(exc)
                    time.sleep(0.1)
                except ClientError as exc:
                    _raise(exc)
            self._sessions[busid] = device
            return device

    def _release(self, busid: str) -> None:
        with self._lock:
            device = self._sessions.pop(busid, None)
        if device is not None:
            device.close()

    def open_device(self, dev: _DeviceId) -> Device:
        return self._session(dev.busid)

    def close_device(self, dev_handle: Device) -> None:
        self._release(dev_handle.info.busid)

    def close(self) -> None:
        """Release every device this backend imported."""
        with self._lock:
            devices = list(self._sessions.values())
            self._sessions.clear()
        for device in devices:
            device.close()

    # --- requests ------------------------------------------------------------------

    def set_configuration(self, dev_handle: Device, config_value: int) -> None:
        _call(dev_handle.control, 0x00, SET_CONFIGURATION, config_value, 0, b"",
              timeout=DESCRIPTOR_TIMEOUT)

    def get_configuration(self, dev_handle: Device) -> int:
        data = _call(dev_handle.control, DIR_IN, GET_CONFIGURATION, 0, 0, 1,
                     timeout=DESCRIPTOR_TIMEOUT)
        if len(data) != 1:
            _raise_code("GET_CONFIGURATION answered no byte", LIBUSB_ERROR_IO, errno.EIO)
        return data[0]

    def set_interface_altsetting(self, dev_handle: Device, intf: int, altsetting: int) -> None:
        _call(dev_handle.control, RECIPIENT_INTERFACE, SET_INTERFACE, altsetting, intf, b"",
              timeout=DESCRIPTOR_TIMEOUT)

    def claim_interface(self, dev_handle: Device, intf: int) -> None:
        """Nothing to do: the import made the whole device this client's alone."""

    def release_interface(self, dev_handle: Device, intf: int) -> None:
        """Nothing to do (see :meth:`claim_interface`)."""

    def clear_halt(self, dev_handle: Device, ep: int) -> None:
        # usbip-host sees CLEAR_FEATURE(ENDPOINT_HALT) and calls usb_clear_halt()
        # (stub_rx.c, tweak_clear_halt_cmd), which resets the host side's toggle too.
        _call(dev_handle.control, RECIPIENT_ENDPOINT, CLEAR_FEATURE, ENDPOINT_HALT, ep, b"",
              timeout=DESCRIPTOR_TIMEOUT)

    def reset_device(self, dev_handle: Device) -> None:
        # The hub request vhci-hcd sends for a port reset: usbip-host answers it with
        # usb_reset_device() (stub_rx.c, tweak_reset_device_cmd); usbipyd the same way.
        _call(dev_handle.control, PORT_REQUEST_TYPE, SET_FEATURE, PORT_RESET, 0, b"",
              timeout=DESCRIPTOR_TIMEOUT)

    def is_kernel_driver_active(self, dev_handle: Device, intf: int) -> bool:
        return False  # no driver of this host has the device

    def detach_kernel_driver(self, dev_handle: Device, intf: int) -> None:
        pass

    def attach_kernel_driver(self, dev_handle: Device, intf: int) -> None:
        pass

    # --- transfers -----------------------------------------------------------------

    # (The transfers are PyUSB's hot path: no helper calls in them that a line can do.)

    def ctrl_transfer(self, dev_handle: Device, bmRequestType: int, bRequest: int,
                      wValue: int, wIndex: int, data: array[int], timeout: int) -> int:
        try:
            if bmRequestType & DIR_IN:
                got = dev_handle.control(bmRequestType, bRequest, wValue, wIndex,
                                         len(data) * data.itemsize,
                                         timeout=timeout / 1000 if timeout else None)
                n = len(got)
                memoryview(data).cast("B")[:n] = got
                return n
            dev_handle.control(bmRequestType, bRequest, wValue, wIndex, data.tobytes(),
                               timeout=timeout / 1000 if timeout else None)
        except ClientError as exc:
            _raise(exc)
        return len(data) * data.itemsize

    def bulk_write(self, dev_handle: Device, ep: int, intf: int, data: array[int],
                   timeout: int) -> int:
        try:
            return dev_handle.bulk_write(ep, data.tobytes(),
                                         timeout=timeout / 1000 if timeout else None)
        except ClientError as exc:
            _raise(exc)

    def bulk_read(self, dev_handle: Device, ep: int, intf: int, buff: array[int],
                  timeout: int) -> int:
        try:
            got = dev_handle.bulk_read(ep, len(buff) * buff.itemsize,
                                       timeout=timeout / 1000 if timeout else None)
        except ClientError as exc:
            _raise(exc)
        n = len(got)
        memoryview(buff).cast("B")[:n] = got
        return n

    def intr_write(self, dev_handle: Device, ep: int, intf: int, data: array[int],
                   timeout: int) -> int:
        return _call(dev_handle.interrupt_write, ep, _bytes(data), timeout=_seconds(timeout))

    def intr_read(self, dev_handle: Device, ep: int, intf: int, buff: array[int],
                  timeout: int) -> int:
        got = _call(dev_handle.interrupt_read, ep, len(buff) * buff.itemsize,
                    timeout=_seconds(timeout))
        return _fill(buff, got)

    def iso_write(self, dev_handle: Device, ep: int, intf: int, data: array[int],
                  timeout: int) -> int:
        """One isochronous URB: ``data`` cut into packets of the endpoint's size."""
        raw = _bytes(data)
        size = self._packet_size(dev_handle, ep)
        packets = [raw[i:i + size] for i in range(0, len(raw), size)] or [b""]
        results = _call(dev_handle.iso_write, ep, packets, timeout=_seconds(timeout))
        return sum(r.actual_length for r in results)

    def iso_read(self, dev_handle: Device, ep: int, intf: int, buff: array[int],
                 timeout: int) -> int:
        """One isochronous URB of as many packets as fill ``buff``; what came, packet
        after packet, at the start of ``buff`` (a packet's error leaves it out)."""
        length = len(buff) * buff.itemsize
        size = self._packet_size(dev_handle, ep)
        count = max(1, -(-length // size))
        lengths = [size] * count
        lengths[-1] = length - size * (count - 1) or size
        results = _call(dev_handle.iso_read, ep, lengths, timeout=_seconds(timeout))
        return _fill(buff, b"".join(r.data for r in results if r.status == 0))

    def _packet_size(self, dev_handle: Device, ep: int) -> int:
        endpoints: list[EndpointDescriptor] = [
            e for c in self._configurations.get(dev_handle.info.busid, ())
            for e in c.all_endpoints if e.bEndpointAddress == ep]
        size = max((e.max_packet_bytes for e in endpoints), default=0)
        if not size:
            _raise_code(f"no isochronous endpoint {ep:#04x}", LIBUSB_ERROR_IO, errno.EINVAL)
        return size


def get_backend(address: str, busid: str | None = None, *,
                tls: ssl.SSLContext | None = None, server_hostname: str | None = None,
                keepalive: Keepalive = DEFAULT,
                timeout: float = CONNECT_TIMEOUT) -> UsbipBackend:
    """A PyUSB backend for the devices of the USB/IP server at ``address``.

    ``address``: ``"HOST"``, ``"HOST:PORT"``, ``"[V6ADDR]:PORT"`` or
    ``"usbip://HOST[:PORT][/BUSID]"``; ``busid`` picks one device. ``tls``
    (:func:`usbipy.tls.client_context`) for mutual TLS, ``keepalive`` for the
    dead-peer timeout, ``timeout`` (seconds) to connect and import.
    """
    host, port, busid = parse_address(address, busid)
    return UsbipBackend(host, port, busid, tls=tls, server_hostname=server_hostname,
                        keepalive=keepalive, timeout=timeout)


# --- helpers -------------------------------------------------------------------------


def _identity(info: DeviceInfo) -> tuple[int, ...]:
    return (info.busnum, info.devnum, info.idVendor, info.idProduct, info.bcdDevice)


def _seconds(timeout_ms: int | None) -> float | None:
    # PyUSB passes milliseconds, and 0 as libusb's "no timeout"
    return timeout_ms / 1000 if timeout_ms else None


def _bytes(data: array[int]) -> bytes:
    return data.tobytes()


def _fill(buff: array[int], got: bytes) -> int:
    n = len(got)
    memoryview(buff).cast("B")[:n] = got
    return n


def _call(fn: Callable[_P, _T], *args: _P.args, **kwargs: _P.kwargs) -> _T:
    try:
        return fn(*args, **kwargs)
    except ClientError as exc:
        _raise(exc)


def _raise(exc: ClientError) -> NoReturn:
    """``exc`` as the USBError a libusb backend raises for the same thing."""
    if isinstance(exc, TransferTimeout):
        raise USBTimeoutError(str(exc), LIBUSB_ERROR_TIMEOUT, errno.ETIMEDOUT) from exc
    if isinstance(exc, Stalled):
        raise USBError(str(exc), LIBUSB_ERROR_PIPE, errno.EPIPE) from exc
    if isinstance(exc, Overflow):
        raise USBError(str(exc), LIBUSB_ERROR_OVERFLOW, errno.EOVERFLOW) from exc
    if isinstance(exc, Cancelled):
        raise USBError(str(exc), LIBUSB_ERROR_INTERRUPTED, errno.EINTR) from exc
    if isinstance(exc, (DeviceGone, ServerGone)):
        raise USBError(str(exc), LIBUSB_ERROR_NO_DEVICE, errno.ENODEV) from exc
    if isinstance(exc, ImportRefused) and exc.status is OpStatus.DEV_BUSY:
        raise USBError(str(exc), LIBUSB_ERROR_BUSY, errno.EBUSY) from exc
    if isinstance(exc, UrbError):
        raise USBError(str(exc), LIBUSB_ERROR_IO, errno.EIO) from exc
    raise USBError(str(exc), LIBUSB_ERROR_NO_DEVICE, errno.ENODEV) from exc


def _raise_code(text: str, code: int, number: int) -> NoReturn:
    raise USBError(text, code, number)
