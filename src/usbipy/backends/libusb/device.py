"""A real USB device exported through libusb (python-libusb1), with no kernel module.

Each URB becomes an asynchronous libusb transfer (``urbs.py``), as many in
flight per endpoint as the client sends; the event thread (``events.py``)
hands each completion to the asyncio loop. UNLINK cancels the transfer. The
requests that usbip-host intercepts (SET_CONFIGURATION, SET_INTERFACE,
CLEAR_FEATURE(ENDPOINT_HALT), port reset) go to the libusb calls that do
them. Every blocking libusb call (open, claim, release, those requests)
runs in a worker thread, so one device never stalls the server's loop.
"""

from __future__ import annotations

import asyncio
import errno
import logging
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

from ...linux import sysfs
from ...protocol import CmdSubmit, DeviceInfo, Direction, InterfaceInfo, Speed
from ...usb.descriptors import TransferType
from ...usb.requests import (
    CLEAR_FEATURE,
    DIR_IN,
    ENDPOINT_HALT,
    PORT_REQUEST_TYPE,
    PORT_RESET,
    RECIPIENT_ENDPOINT,
    RECIPIENT_INTERFACE,
    SET_CONFIGURATION,
    SET_FEATURE,
    SET_INTERFACE,
    SETUP,
)
from ..base import Completion, ExportedDevice, SubmitResult
from . import events
from .events import LibusbEvents
from .status import LIBUSB_ERROR_NO_DEVICE, TRANSFER_NO_DEVICE, error_errno
from .unplug import UNPLUG_SETTLE, handle_gone, still_plugged
from .urbs import completion_of, fill_transfer

if TYPE_CHECKING:
    from ...exports.rules import ExportRule

log = logging.getLogger("usbipy.libusb")

#: libusb_speed -> enum usb_device_speed
LIBUSB_SPEEDS = {0: Speed.UNKNOWN, 1: Speed.LOW, 2: Speed.FULL, 3: Speed.HIGH,
                 4: Speed.SUPER, 5: Speed.SUPER_PLUS}

#: How long a release waits for cancelled transfers to come back from libusb.
CANCEL_TIMEOUT = 2.0


def busid_of(device: Any) -> str:
    """The Linux busid ("2-1", "1-1.4") from the bus and port path libusb reports."""
    ports = device.getPortNumberList()
    return f"{device.getBusNumber()}-{'.'.join(str(p) for p in ports)}"


def _settle(future: asyncio.Future[Completion], result: SubmitResult) -> None:
    """``future`` gets what ``result`` gives: its completion, error or cancellation (and an
    unlink of ``future`` cancels ``result``)."""
    if isinstance(result, Completion):
        future.set_result(result)
        return
    inner = asyncio.ensure_future(result)

    def copy(done: asyncio.Future[Completion]) -> None:
        if future.done():
            return
        if done.cancelled():
            future.cancel()
        elif done.exception() is not None:
            future.set_exception(done.exception())  # type: ignore[arg-type]
        else:
            future.set_result(done.result())

    inner.add_done_callback(copy)
    future.add_done_callback(lambda f: inner.cancel() if f.cancelled() else None)


class LibusbDevice(ExportedDevice):
    """A device opened through libusb while a client has it imported."""

    via = "libusb"

    def __init__(self, events: LibusbEvents, device: Any, busid: str | None = None) -> None:
        self._events = events
        self._device = device
        self.busid = busid or busid_of(device)
        self.busnum = device.getBusNumber()
        self.devnum = device.getDeviceAddress()
        self._info = self._read_info()
        # (made in the source's worker thread: a sysfs read is fine here)
        self.serial = sysfs.serial_of(self.busid)
        #: The export rule that exports it (set by the source).
        self.rule: ExportRule | None = None
        self._handle: Any = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._transfers: dict[Any, asyncio.Future[Completion]] = {}
        #: Set when no transfer is with libusb any more (a release waits for it).
        self._idle = asyncio.Event()
        self._claimed: list[int] = []
        self._detached_drivers: list[int] = []
        self._endpoints: dict[int, TransferType] = {}
        self.gone = False
        #: From the start of an import until its release is done: a scan must not
        #: drop the libusb context under a device being opened or closed.
        self._in_use = False
        #: Every call on the handle (open, claim, the intercepted requests, release,
        #: close) runs here, one at a time and in order: a release queued behind a
        #: SET_CONFIGURATION waits for it rather than closing the handle under it.
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="libusb-device")
        self._abandon_timer: asyncio.TimerHandle | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        #: Whether a request done by a libusb call (SET_CONFIGURATION, SET_INTERFACE,
        #: CLEAR_FEATURE(ENDPOINT_HALT), port reset) is under way, and the control
        #: requests that came after it, waiting. The default control pipe serves its
        #: requests in order (USB 2.0, 5.5.5), and usbip-host's receive thread submits
        #: the next request only once its own call has returned (stub_rx.c): a later
        #: request must not overtake it (usbtest's test 10 checks the order). The queue
        #: moves on when the call returns, not when the client stops waiting for it (an
        #: unlink does not stop a libusb call).
        self._ep0_busy = False
        self._ep0_queue: deque[tuple[CmdSubmit, asyncio.Future[Completion]]] = deque()

    @property
    def usb_device(self) -> Any:
        """The usb1.USBDevice."""
        return self._device

    @property
    def identity(self) -> tuple[int, int]:
        """Bus and address: a replugged device gets a new address."""
        return (self.busnum, self.devnum)

    @property
    def is_open(self) -> bool:
        """Whether a client has the device (libusb holds it open, or is opening or
        closing it)."""
        return self._in_use or self._handle is not None

    async def _call(self, fn: Callable[..., Any], *args: Any) -> Any:
        """``fn(*args)`` on this device's worker thread."""
        return await asyncio.get_running_loop().run_in_executor(self._worker, fn, *args)

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

    # --- import and release: blocking libusb calls, in a worker thread ------------------

    async def attach(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._cancel_abandon()
        self.gone = False
        self._in_use = True
        try:
            self._handle = await self._call(self._open)
        except BaseException:
            self._in_use = False
            raise
        log.info("opened %s (%04x:%04x) through libusb", self.busid, self._info.idVendor,
                 self._info.idProduct)

    def _open(self) -> Any:
        handle = self._device.open()
        self._handle = handle
        try:
            self._claim_all()
        except Exception:
            self._release_all()
            self._handle = None
            handle.close()
            raise
        return handle

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
            self._endpoints[endpoint.getAddress()] = TransferType(endpoint.getAttributes() & 3)

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

    async def detach(self) -> None:
        self.drop_client = None
        self._cancel_abandon()
        try:
            await self._release()
        finally:
            self._in_use = False

    async def _release(self) -> None:
        if self._handle is None:
            return
        self._cancel_all()
        if self._transfers:
            # The event thread completes the cancellations; a transfer must not
            # outlive its handle.
            self._idle.clear()
            try:
                await asyncio.wait_for(self._idle.wait(), CANCEL_TIMEOUT)
            except TimeoutError:
                log.warning("%s: %d transfers did not come back from libusb", self.busid,
                            len(self._transfers))
        await self._call(self._close_handle)  # after any intercepted request still running
        self._transfers.clear()
        log.info("released %s", self.busid)

    def _cancel_all(self) -> None:
        for transfer in list(self._transfers):
            self._unlinked(transfer)

    def _close_handle(self) -> None:
        handle = self._handle
        if handle is None:
            return
        try:
            self._release_all()
            self._reattach_drivers()
        finally:
            self._handle = None
            try:
                handle.close()
            except Exception as exc:
                log.debug("closing %s: %s", self.busid, exc)

    def close(self) -> None:
        """Server shutdown: whatever a release left, closed now."""
        self._cancel_all()
        self._worker.shutdown(wait=True)  # an intercepted request finishes first
        self._close_handle()

    # --- URBs ----------------------------------------------------------------------------

    def submit(self, urb: CmdSubmit) -> SubmitResult:
        if self.gone or self._handle is None:
            return Completion(status=-errno.ENODEV)
        if urb.ep == 0:
            return self._control(urb)
        address = urb.ep | (DIR_IN if urb.direction is Direction.IN else 0)
        kind = self._endpoints.get(address)
        if kind is None:
            # usb_submit_urb's answer for an endpoint the current setting lacks
            return Completion(status=-errno.ENOENT)
        iso = urb.iso_packets
        transfer = self._handle.getTransfer(iso_packets=len(iso) if iso is not None else 0)
        fill_transfer(transfer, urb, address, kind, self._completed)
        return self._submit(transfer)

    def _control(self, urb: CmdSubmit) -> SubmitResult:
        if self._ep0_busy or self._ep0_queue:
            assert self._loop is not None
            future: asyncio.Future[Completion] = self._loop.create_future()
            self._ep0_queue.append((urb, future))
            return future
        return self._control_now(urb)

    def _control_now(self, urb: CmdSubmit) -> SubmitResult:
        if self.gone or self._handle is None:
            return Completion(status=-errno.ENODEV)
        request_type, request, value, index, length = SETUP.unpack(urb.setup)
        # The requests usbip-host does itself rather than pass on (stub_rx.c).
        if request_type == 0 and request == SET_CONFIGURATION:
            return self._intercepted(self._set_configuration, value)
        if request_type == RECIPIENT_INTERFACE and request == SET_INTERFACE:
            return self._intercepted(self._set_interface, index, value)
        if (request_type == RECIPIENT_ENDPOINT and request == CLEAR_FEATURE
                and value == ENDPOINT_HALT and index & 0x7F):
            # (the default pipe's goes to the device as it is: usb_clear_halt sends just
            # that, and libusb_clear_halt refuses endpoint 0, usbfs's proc_clearhalt)
            return self._intercepted(self._handle.clearHalt, index & 0xFF)
        if request_type == PORT_REQUEST_TYPE and request == SET_FEATURE and value == PORT_RESET:
            return self._intercepted(self._handle.resetDevice)
        transfer = self._handle.getTransfer()
        data: int | bytes = length if request_type & DIR_IN else urb.data[:length]
        transfer.setControl(request_type, request, value, index, data, self._completed, urb, 0)
        return self._submit(transfer)

    def _submit(self, transfer: Any) -> SubmitResult:
        assert self._loop is not None
        future: asyncio.Future[Completion] = self._loop.create_future()
        self._transfers[transfer] = future
        try:
            transfer.submit()
        except events.usb1.USBError as exc:
            del self._transfers[transfer]
            if exc.value == LIBUSB_ERROR_NO_DEVICE:
                self._mark_gone()
            return Completion(status=error_errno(exc.value))
        future.add_done_callback(lambda f: self._unlinked(transfer) if f.cancelled() else None)
        return future

    @staticmethod
    def _unlinked(transfer: Any) -> None:
        try:
            transfer.cancel()
        except Exception:
            pass  # it completed meanwhile; its result is dropped, as usbip-host does

    def _completed(self, transfer: Any) -> None:
        """In the libusb event thread: read the result, then hand it to the loop."""
        completion = completion_of(transfer)
        no_device = transfer.getStatus() == TRANSFER_NO_DEVICE
        assert self._loop is not None
        try:
            self._loop.call_soon_threadsafe(self._finish, transfer, completion, no_device)
        except RuntimeError:
            pass  # the loop is closed: the server is gone

    def _finish(self, transfer: Any, completion: Completion, no_device: bool) -> None:
        if self.gone and completion.status in (-errno.ECONNRESET, -errno.EPROTO):
            completion.status = -errno.ENODEV  # failed because the device left
        elif (completion.status == -errno.EPROTO and not self.gone
              and self._loop is not None):
            # Perhaps an unplug that usbfs and sysfs do not know of yet: look again
            # shortly, and tell the client -ENODEV as usbip-host would.
            self._loop.call_later(UNPLUG_SETTLE, self._start_recheck, transfer, completion)
            return
        self._complete(transfer, completion, no_device)

    def _start_recheck(self, transfer: Any, completion: Completion) -> None:
        task = asyncio.ensure_future(self._recheck(transfer, completion))
        self._tasks.add(task)  # (the loop keeps only a weak reference to a task)
        task.add_done_callback(self._tasks.discard)

    async def _recheck(self, transfer: Any, completion: Completion) -> None:
        gone = await self._call(self._unplugged_now)
        if gone:
            completion.status = -errno.ENODEV
        self._complete(transfer, completion, gone)

    def _unplugged_now(self) -> bool:
        """Blocking (a usbfs ioctl, a sysfs read): whether the device has left."""
        return (handle_gone(self._handle, self._claimed[0] if self._claimed else 0)
                or still_plugged(self.busid, self.devnum) is False)

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
        if not self._transfers:
            self._idle.set()
        try:
            transfer.close()
        except Exception:
            pass  # the handle closed first and took its transfers with it
        if no_device:
            self._mark_gone()
        elif self.gone and not self._transfers:
            self._drop_soon()

    def _intercepted(self, fn: Callable[..., Any], *args: Any) -> SubmitResult:
        """A request done by ``fn(*args)``, a libusb call on the worker thread; the
        control requests after it wait until the call has returned."""
        loop = self._loop
        assert loop is not None
        try:
            call = self._worker.submit(fn, *args)
        except RuntimeError:  # (the worker is shut down: the device is being closed)
            return Completion(status=-errno.ENODEV)
        self._ep0_busy = True

        def returned(_: object) -> None:
            try:
                loop.call_soon_threadsafe(self._ep0_next)
            except RuntimeError:
                pass  # the loop is closed: the server is gone

        call.add_done_callback(returned)

        async def result() -> Completion:
            try:
                await asyncio.wrap_future(call)
            except events.usb1.USBError as exc:
                if exc.value == LIBUSB_ERROR_NO_DEVICE:
                    self._mark_gone()
                return Completion(status=error_errno(exc.value))
            return Completion()

        return result()

    def _ep0_next(self) -> None:
        """The libusb call returned: submit the control requests that waited, in order,
        up to the next one done by a libusb call. One unlinked while it waited is never
        submitted."""
        self._ep0_busy = False
        queue = self._ep0_queue
        while queue and not self._ep0_busy:
            urb, future = queue.popleft()
            if future.done():
                continue
            try:
                _settle(future, self._control_now(urb))
            except Exception as exc:  # (its client gets EPROTO, as for any URB that raised)
                future.set_exception(exc)

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
        self._cancel_all()
        if self._loop is not None:
            self._abandon_timer = self._loop.call_later(CANCEL_TIMEOUT,
                                                        self._abandon_transfers)

    def _cancel_abandon(self) -> None:
        """The grace period of an unplug belongs to its client only."""
        if self._abandon_timer is not None:
            self._abandon_timer.cancel()
            self._abandon_timer = None

    def _abandon_transfers(self) -> None:
        self._abandon_timer = None
        for future in self._transfers.values():
            if not future.done():
                future.set_result(Completion(status=-errno.ENODEV))
        self._transfers.clear()
        self._idle.set()
        self._drop_soon()
