"""Real USB devices exported through libusb (python-libusb1), with no kernel module.

Each URB becomes an asynchronous libusb transfer, as many in flight per
endpoint as the client sends. One thread runs libusb's event loop; it hands
each completion to the asyncio loop with ``call_soon_threadsafe``, so the
loop never blocks on USB. UNLINK cancels the transfer. The requests that
usbip-host intercepts (SET_CONFIGURATION, SET_INTERFACE, CLEAR_FEATURE
ENDPOINT_HALT, port reset) go to the libusb calls that do them, in a worker
thread since those calls block.
"""

from __future__ import annotations

import asyncio
import errno
import functools
import logging
import struct
import threading
import time
from collections.abc import Callable, Coroutine
from typing import Any

from .. import sysfs
from ..errors import UsbipError
from ..protocol import CmdSubmit, DeviceInfo, Direction, InterfaceInfo, IsoPacket, Speed
from .base import Completion, ExportedDevice, SubmitResult
from .bindings import Binding, BindingStore
from .libusb_status import (
    LIBUSB_ERROR_NO_DEVICE,
    TRANSFER_NO_DEVICE,
    error_errno,
    transfer_errno,
)

try:
    import usb1
except ImportError:  # an optional dependency: only this backend needs it
    usb1 = None

log = logging.getLogger("usbipy.libusb")

_SETUP = struct.Struct("<BBHHH")
URB_SHORT_NOT_OK = 0x0001
URB_ZERO_PACKET = 0x0040

# bmRequestType, bRequest of the requests usbip-host does itself (stub_rx.c)
SET_CONFIGURATION = (0x00, 9)
SET_INTERFACE = (0x01, 11)
CLEAR_FEATURE_ENDPOINT = (0x02, 1)
SET_PORT_FEATURE = (0x23, 3)
ENDPOINT_HALT = 0
PORT_RESET = 4

#: libusb_speed -> enum usb_device_speed
LIBUSB_SPEEDS = {0: Speed.UNKNOWN, 1: Speed.LOW, 2: Speed.FULL, 3: Speed.HIGH,
                 4: Speed.SUPER, 5: Speed.SUPER_PLUS}

#: Transfer types in bmAttributes.
CONTROL, ISOCHRONOUS, BULK, INTERRUPT = range(4)

#: How long detach waits for cancelled transfers to come back.
CANCEL_TIMEOUT = 2.0
#: How long after a plain transfer error to look whether the device was unplugged.
UNPLUG_SETTLE = 0.25


class LibusbUnavailable(UsbipError):
    pass


def libusb_available() -> bool:
    return usb1 is not None


def require_usb1() -> Any:
    if usb1 is None:
        raise LibusbUnavailable("python-libusb1 is not installed: pip install 'usbipy[libusb]'")
    return usb1


class LibusbEvents:
    """A libusb context and the thread that handles its events."""

    def __init__(self) -> None:
        lib = require_usb1()
        self.context = lib.USBContext()
        self.context.open()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="libusb-events", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.context.handleEventsTimeout(0.1)
            except usb1.USBErrorInterrupted:
                continue
            except Exception:  # keep serving the other devices
                log.exception("libusb event handling failed")
                time.sleep(0.1)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.context.close()


def busid_of(device: Any) -> str:
    """The Linux busid ("2-1", "1-1.4") from the bus and port path libusb reports."""
    ports = device.getPortNumberList()
    return f"{device.getBusNumber()}-{'.'.join(str(p) for p in ports)}"


def _sysfs_serial(busid: str) -> str | None:
    try:
        return sysfs.read_attr(sysfs.usb_devices_dir() / busid / "serial")
    except sysfs.SysfsError:
        return None


def _serial(busid: str, device: Any) -> str | None:
    """From sysfs where there is one (no need to open the device), else from libusb."""
    serial = _sysfs_serial(busid)
    if serial is not None:
        return serial
    try:
        return str(device.getSerialNumber())
    except Exception:
        return None


class LibusbDevice(ExportedDevice):
    """A device opened through libusb while a client has it imported."""

    def __init__(self, events: LibusbEvents, device: Any, busid: str | None = None) -> None:
        self._events = events
        self._device = device
        self.busid = busid or busid_of(device)
        self.busnum = device.getBusNumber()
        self.devnum = device.getDeviceAddress()
        self._info = self._read_info()
        self._handle: Any = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._transfers: dict[Any, asyncio.Future[Completion]] = {}
        self._claimed: list[int] = []
        self._detached_drivers: list[int] = []
        self._endpoints: dict[int, int] = {}
        self.gone = False

    @property
    def usb_device(self) -> Any:
        """The usb1.USBDevice."""
        return self._device

    @property
    def identity(self) -> tuple[int, int]:
        """Bus and address: a replugged device gets a new address."""
        return (self.busnum, self.devnum)

    def _read_info(self) -> DeviceInfo:
        dev = self._device
        try:
            config = int(sysfs.read_attr(sysfs.usb_devices_dir() / self.busid
                                         / "bConfigurationValue"))
        except (sysfs.SysfsError, ValueError):
            config = 0
        configs = list(dev.iterConfigurations())
        active = next((c for c in configs if c.getConfigurationValue() == config),
                      configs[0] if configs else None)
        interfaces: list[InterfaceInfo] = []
        if active is not None:
            for interface in active:
                setting = next(iter(interface))
                interfaces.append(InterfaceInfo(setting.getClass(), setting.getSubClass(),
                                                setting.getProtocol()))
        path = sysfs.usb_devices_dir() / self.busid
        return DeviceInfo(
            path=str(path.resolve()) if path.exists() else f"/libusb/{self.busid}",
            busid=self.busid, busnum=self.busnum, devnum=self.devnum,
            speed=LIBUSB_SPEEDS.get(dev.getDeviceSpeed(), Speed.UNKNOWN),
            idVendor=dev.getVendorID(), idProduct=dev.getProductID(),
            bcdDevice=dev.getbcdDevice(), bDeviceClass=dev.getDeviceClass(),
            bDeviceSubClass=dev.getDeviceSubClass(),
            bDeviceProtocol=dev.getDeviceProtocol(),
            bConfigurationValue=active.getConfigurationValue() if active is not None else 0,
            bNumConfigurations=dev.getNumConfigurations(),
            bNumInterfaces=len(interfaces), interfaces=tuple(interfaces),
        )

    @property
    def info(self) -> DeviceInfo:
        return self._info

    # --- import and release ------------------------------------------------------------

    def attach(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._handle = self._device.open()
        try:
            self._claim_all()
        except Exception:
            self._release_all()
            self._handle.close()
            self._handle = None
            raise
        log.info("opened %s (%04x:%04x) through libusb", self.busid, self._info.idVendor,
                 self._info.idProduct)

    def _active_config(self) -> Any:
        value = self._handle.getConfiguration()
        for config in self._device.iterConfigurations():
            if config.getConfigurationValue() == value:
                return config
        return None

    def _claim_all(self) -> None:
        config = self._active_config()
        self._endpoints = {}
        if config is None:
            return  # unconfigured: nothing to claim until SET_CONFIGURATION
        for interface in config:
            setting = next(iter(interface))
            number = setting.getNumber()
            if self._handle.kernelDriverActive(number):
                self._handle.detachKernelDriver(number)
                self._detached_drivers.append(number)
            self._handle.claimInterface(number)
            self._claimed.append(number)
            self._map_endpoints(setting)

    def _map_endpoints(self, setting: Any) -> None:
        for endpoint in setting:
            self._endpoints[endpoint.getAddress()] = endpoint.getAttributes() & 0x03

    def _release_all(self) -> None:
        for number in self._claimed:
            try:
                self._handle.releaseInterface(number)
            except Exception as exc:
                log.debug("release of interface %d: %s", number, exc)
        self._claimed = []

    def _reattach_drivers(self) -> None:
        for number in self._detached_drivers:
            try:
                self._handle.attachKernelDriver(number)
            except Exception as exc:
                log.debug("reattaching the kernel driver of interface %d: %s", number, exc)
        self._detached_drivers = []

    def detach(self) -> None:
        handle = self._handle
        self.drop_client = None
        if handle is None:
            return
        for transfer in list(self._transfers):
            try:
                transfer.cancel()
            except Exception:
                pass  # completed meanwhile
        # The event thread completes the cancellations; wait for them, briefly.
        deadline = time.monotonic() + CANCEL_TIMEOUT
        while self._pending_in_event_thread() and time.monotonic() < deadline:
            time.sleep(0.002)
        try:
            self._release_all()
            self._reattach_drivers()
        finally:
            self._handle = None
            try:
                handle.close()
            except Exception as exc:
                log.debug("closing %s: %s", self.busid, exc)
        self._transfers.clear()
        log.info("released %s", self.busid)

    def _pending_in_event_thread(self) -> bool:
        return any(t.isSubmitted() for t in self._transfers)

    def close(self) -> None:
        if self._handle is not None:
            self.detach()

    # --- URBs ----------------------------------------------------------------------------

    def submit(self, urb: CmdSubmit) -> SubmitResult:
        if self.gone or self._handle is None:
            return Completion(status=-errno.ENODEV)
        if urb.ep == 0:
            return self._control(urb)
        address = urb.ep | (0x80 if urb.direction is Direction.IN else 0)
        kind = self._endpoints.get(address)
        if kind is None:
            # usb_submit_urb's answer for an endpoint the current setting lacks
            return Completion(status=-errno.ENOENT)
        iso = urb.iso_packets
        transfer = self._handle.getTransfer(iso_packets=len(iso) if iso is not None else 0)
        buffer: int | bytes
        if urb.direction is Direction.IN:
            # URB_SHORT_NOT_OK is applied on completion: libusb's version of the flag
            # reports a plain error, the kernel reports -EREMOTEIO.
            buffer = urb.transfer_buffer_length
        else:
            buffer = urb.data
            transfer.setAddZeroPacket(bool(urb.transfer_flags & URB_ZERO_PACKET))
        if kind == ISOCHRONOUS or iso is not None:
            packets = iso or []
            if urb.direction is Direction.OUT:
                # libusb lays packets out back to back; URB packets have their own offsets
                buffer = b"".join(urb.data[p.offset:p.offset + p.length] for p in packets)
            else:
                buffer = sum(p.length for p in packets)
            transfer.setIsochronous(address, buffer, self._completed, urb, 0,
                                    [p.length for p in packets])
        elif kind == INTERRUPT:
            transfer.setInterrupt(address, buffer, self._completed, urb, 0)
        else:
            transfer.setBulk(address, buffer, self._completed, urb, 0)
        return self._submit(transfer)

    def _control(self, urb: CmdSubmit) -> SubmitResult:
        request_type, request, value, index, length = _SETUP.unpack(urb.setup)
        kind = (request_type, request)
        if kind == SET_CONFIGURATION:
            return self._blocking(self._set_configuration, value)
        if kind == SET_INTERFACE:
            return self._blocking(self._set_interface, index, value)
        if kind == CLEAR_FEATURE_ENDPOINT and value == ENDPOINT_HALT:
            return self._blocking(self._handle.clearHalt, index & 0xFF)
        if kind == SET_PORT_FEATURE and value == PORT_RESET:
            return self._blocking(self._handle.resetDevice)
        transfer = self._handle.getTransfer()
        data: int | bytes = length if request_type & 0x80 else urb.data[:length]
        transfer.setControl(request_type, request, value, index, data, self._completed, urb, 0)
        return self._submit(transfer)

    def _submit(self, transfer: Any) -> SubmitResult:
        assert self._loop is not None
        future: asyncio.Future[Completion] = self._loop.create_future()
        self._transfers[transfer] = future
        try:
            transfer.submit()
        except usb1.USBError as exc:
            del self._transfers[transfer]
            if exc.value == LIBUSB_ERROR_NO_DEVICE:
                self._mark_gone()
            return Completion(status=error_errno(exc.value))
        future.add_done_callback(lambda f: self._unlinked(transfer) if f.cancelled() else None)
        return future

    def _unlinked(self, transfer: Any) -> None:
        try:
            transfer.cancel()
        except Exception:
            pass  # it completed meanwhile; its result is dropped, as usbip-host does

    def _completed(self, transfer: Any) -> None:
        """In the libusb event thread: read the result while the buffer is valid."""
        urb: CmdSubmit = transfer.getUserData()
        status = transfer.getStatus()
        completion = Completion(status=transfer_errno(status))
        if urb.iso_packets is not None:
            self._iso_result(transfer, urb, completion)
        elif urb.direction is Direction.IN:
            actual = transfer.getActualLength()
            completion.data = bytes(transfer.getBuffer()[:actual])
            if (urb.transfer_flags & URB_SHORT_NOT_OK and completion.status == 0
                    and actual < urb.transfer_buffer_length and urb.ep != 0):
                completion.status = -errno.EREMOTEIO
        else:
            completion.actual_length = transfer.getActualLength()
        assert self._loop is not None
        try:
            self._loop.call_soon_threadsafe(self._finish, transfer, completion,
                                            status == TRANSFER_NO_DEVICE)
        except RuntimeError:
            pass  # the loop is closed: the server is gone

    def _disconnected(self) -> bool:
        """Whether the device is being unplugged: usbfs answers ENODEV at once, before
        sysfs and libusb's device list catch up."""
        handle = self._handle
        if handle is None:
            return True
        try:
            handle.kernelDriverActive(self._claimed[0] if self._claimed else 0)
        except usb1.USBError as exc:
            return bool(exc.value == LIBUSB_ERROR_NO_DEVICE)
        return False

    @staticmethod
    def _iso_result(transfer: Any, urb: CmdSubmit, completion: Completion) -> None:
        assert urb.iso_packets is not None
        packets: list[IsoPacket] = []
        chunks: list[bytes] = []
        errors = 0
        for request, (status, data) in zip(urb.iso_packets, transfer.iterISO(), strict=True):
            packet_status = transfer_errno(status)
            errors += packet_status != 0
            packets.append(IsoPacket(request.offset, request.length, len(data), packet_status))
            if urb.direction is Direction.IN:
                chunks.append(bytes(data))
        completion.iso_packets = packets
        completion.error_count = errors
        if urb.direction is Direction.IN:
            completion.data = b"".join(chunks)  # usbip sends iso IN data packed
        else:
            completion.actual_length = sum(p.actual_length for p in packets)

    def _finish(self, transfer: Any, completion: Completion, no_device: bool) -> None:
        if self.gone and completion.status in (-errno.ECONNRESET, -errno.EPROTO):
            completion.status = -errno.ENODEV  # failed because the device left
        elif (completion.status == -errno.EPROTO and not self.gone
              and self._loop is not None):
            # The host controller fails the URBs of a device being unplugged with a
            # plain error, a moment before usbfs and sysfs know it is gone: look
            # again shortly, and tell the client -ENODEV as usbip-host would.
            self._loop.call_later(UNPLUG_SETTLE, self._recheck, transfer, completion)
            return
        self._complete(transfer, completion, no_device)

    def _recheck(self, transfer: Any, completion: Completion) -> None:
        gone = self._disconnected() or _still_plugged(self) is False
        if gone:
            completion.status = -errno.ENODEV
        self._complete(transfer, completion, gone)

    def _complete(self, transfer: Any, completion: Completion, no_device: bool) -> None:
        if log.isEnabledFor(logging.DEBUG):
            urb: CmdSubmit = transfer.getUserData()
            log.debug("%s: seqnum %d ep %d %s: status %d, %d bytes", self.busid, urb.seqnum,
                      urb.ep, urb.direction.name, completion.status,
                      len(completion.data) if urb.direction is Direction.IN
                      else completion.actual_length or 0)
        future = self._transfers.pop(transfer, None)
        if future is not None and not future.done():
            future.set_result(completion)
        try:
            transfer.close()
        except Exception:
            pass  # the handle closed first and took its transfers with it
        if no_device:
            self._mark_gone()
        elif self.gone and not self._transfers:
            self._drop_soon()

    def _blocking(self, fn: Callable[..., Any], *args: Any) -> Coroutine[Any, Any, Completion]:
        async def run() -> Completion:
            loop = asyncio.get_running_loop()
            try:
                await loop.run_in_executor(None, fn, *args)
            except usb1.USBError as exc:
                if exc.value == LIBUSB_ERROR_NO_DEVICE:
                    self._mark_gone()
                return Completion(status=error_errno(exc.value))
            return Completion()
        return run()

    def _set_configuration(self, value: int) -> None:
        if self._handle.getConfiguration() == value:
            return  # as configured: leave the interfaces (and their state) alone
        self._release_all()
        self._handle.setConfiguration(value)
        self._claim_all()

    def _set_interface(self, interface: int, alt: int) -> None:
        self._handle.setInterfaceAltSetting(interface, alt)
        config = self._active_config()
        for intf in config or ():
            for setting in intf:
                if setting.getNumber() == interface and setting.getAlternateSetting() == alt:
                    self._map_endpoints(setting)

    # --- unplug ----------------------------------------------------------------------------

    def _mark_gone(self) -> None:
        """The device is unplugged: fail what comes, then drop the client cleanly."""
        if not self.gone:
            self.gone = True
            log.warning("%s is gone", self.busid)
        if not self._transfers:
            self._drop_soon()

    def _drop_soon(self) -> None:
        # After the completions already scheduled: their RET_SUBMITs go out first.
        if self._loop is not None:
            self._loop.call_soon(self.drop)
        else:
            self.drop()

    def drop(self) -> None:
        """Drop the client that holds the device, if any."""
        drop = self.drop_client
        if drop is not None:
            self.drop_client = None
            drop()

    def unplugged(self) -> None:
        """The device left (found by the periodic check); runs on the event loop.

        Its transfers are cancelled and answered -ENODEV; any that libusb cannot
        cancel any more are answered after a grace period, then the client goes."""
        if self.gone:
            return
        self._mark_gone()
        for transfer in list(self._transfers):
            self._unlinked(transfer)
        if self._loop is not None:
            self._loop.call_later(CANCEL_TIMEOUT, self._abandon_transfers)

    def _abandon_transfers(self) -> None:
        for future in self._transfers.values():
            if not future.done():
                future.set_result(Completion(status=-errno.ENODEV))
        self._transfers.clear()
        self._drop_soon()


class LibusbSource:
    """The devices bound for export through libusb, found afresh on each request.

    A device keeps its :class:`LibusbDevice` while it stays plugged in at the
    same address, so the registry can tell that an imported device is busy.
    """

    def __init__(self, store: BindingStore | None = None,
                 events: LibusbEvents | None = None) -> None:
        self.store = store if store is not None else BindingStore()
        self._events = events
        self._devices: dict[str, LibusbDevice] = {}
        self._unseen_warned: set[str] = set()

    @property
    def events(self) -> LibusbEvents:
        if self._events is None:
            self._events = LibusbEvents()
        return self._events

    def __call__(self) -> list[LibusbDevice]:
        bindings = self.store.load()
        if not bindings:
            return [d for d in self._devices.values() if d.drop_client is not None]
        found = self._scan(bindings)
        unseen = self._unseen(bindings, found)
        if unseen and not any(d.drop_client is not None for d in self._devices.values()):
            # libusb keeps its device list up to date from udev's events; with no udev
            # daemon it never sees a device plugged in later. With nothing open, a new
            # context scans afresh.
            log.info("libusb's device list is stale: scanning again")
            self._events, events = None, self._events
            if events is not None:
                events.close()
            self._devices = {}
            found = self._scan(bindings)
            unseen = self._unseen(bindings, found)
        for busid in unseen:
            if busid not in self._unseen_warned:
                self._unseen_warned.add(busid)
                log.warning("%s is plugged in but not in libusb's device list: libusb learns "
                            "of new devices from udev; is the udev daemon running?", busid)
        # An imported device stays ours until its client lets go, plugged in or not.
        for busid, device in self._devices.items():
            if busid not in found and device.drop_client is not None:
                found[busid] = device
        self._devices = found
        return list(found.values())

    def _scan(self, bindings: list[Binding]) -> dict[str, LibusbDevice]:
        found: dict[str, LibusbDevice] = {}
        for device in self.events.context.getDeviceList(skip_on_error=True):
            try:
                busid = busid_of(device)
                vid, pid = device.getVendorID(), device.getProductID()
            except Exception:
                continue
            if (sysfs.is_device_busid(busid)
                    and sysfs.driver_of(sysfs.usb_devices_dir() / busid) == "usbip-host"):
                continue  # the kernel stub has it
            serial = functools.partial(_serial, busid, device)
            if not any(b.matches(busid, vid, pid, serial) for b in bindings):
                continue
            known = self._devices.get(busid)
            if known is not None and known.identity == (device.getBusNumber(),
                                                         device.getDeviceAddress()):
                found[busid] = known
            else:
                try:
                    found[busid] = LibusbDevice(self.events, device, busid)
                except Exception as exc:
                    log.warning("cannot read %s through libusb: %s", busid, exc)
        return found

    @staticmethod
    def _unseen(bindings: list[Binding], found: dict[str, LibusbDevice]) -> list[str]:
        """Bound devices that sysfs shows (Linux) and libusb's list lacks, or whose
        address there is out of date (replugged)."""
        unseen = []
        for device in sysfs.usb_devices():
            info = device.info
            if device.driver == "usbip-host":
                continue
            if not any(b.matches(device.busid, info.idVendor, info.idProduct,
                                 functools.partial(_sysfs_serial, device.busid))
                       for b in bindings):
                continue
            known = found.get(device.busid)
            if known is None or known.devnum != info.devnum:
                unseen.append(device.busid)
        return unseen

    def unbound(self) -> list[LibusbDevice]:
        """Imported devices whose binding was removed: the caller drops their clients."""
        bindings = self.store.load()
        result = []
        for busid, device in self._devices.items():
            info = device.info
            serial = functools.partial(_serial, busid, device.usb_device)
            if device.drop_client is not None and not any(
                    b.matches(busid, info.idVendor, info.idProduct, serial) for b in bindings):
                result.append(device)
        return result

    def check(self) -> None:
        """Drop the clients of devices that were unplugged or unbound meanwhile.

        Called periodically: an idle device has no transfer that would fail."""
        imported = [d for d in self._devices.values() if d.drop_client is not None]
        if not imported:
            return
        present: set[tuple[int, int]] | None = None
        for device in imported:
            plugged = _still_plugged(device)
            if plugged is None:  # no sysfs: ask libusb (which needs hotplug events)
                if present is None:
                    present = {(d.getBusNumber(), d.getDeviceAddress()) for d in
                               self.events.context.getDeviceList(skip_on_error=True)}
                plugged = device.identity in present
            if not plugged:
                device.unplugged()
        for device in self.unbound():
            log.info("%s was unbound: dropping its client", device.busid)
            device.drop()

    def close(self) -> None:
        for device in self._devices.values():
            device.close()
        if self._events is not None:
            self._events.close()
            self._events = None


def _still_plugged(device: LibusbDevice) -> bool | None:
    """On Linux, sysfs knows at once whether the device at this busid is the same one
    (libusb's own list lags without a udev daemon); None where there is no sysfs."""
    if not sysfs.usb_devices_dir().is_dir():
        return None
    try:
        return int(sysfs.read_attr(sysfs.usb_devices_dir() / device.busid / "devnum")
                   ) == device.devnum
    except (sysfs.SysfsError, ValueError):
        return False
