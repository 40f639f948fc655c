"""Emulated devices: the standard requests answered from declarative descriptors.

Write a device by subclassing :class:`EmulatedDevice`, giving it a
:class:`~usbipy.devices.descriptors.Device` and overriding two hooks:

* :meth:`EmulatedDevice.control_request` for class and vendor requests,
* :meth:`EmulatedDevice.transfer` for URBs to endpoints other than 0.

Everything else (GET_DESCRIPTOR, SET_CONFIGURATION, endpoint halt ...) is done
here. A request nobody handles STALLs (-EPIPE), as a real device does.
"""

from __future__ import annotations

import asyncio
import struct
from collections import deque

from ..protocol import CmdSubmit, DeviceInfo, Direction, InterfaceInfo
from ..protocol.constants import EINVAL, EPIPE, ESHUTDOWN
from ..usb.descriptors import DescriptorSet, DescriptorType, Device, Endpoint, TransferType
from ..usb.requests import (
    CLEAR_FEATURE,
    DEVICE_REMOTE_WAKEUP,
    ENDPOINT_HALT,
    GET_CONFIGURATION,
    GET_DESCRIPTOR,
    GET_INTERFACE,
    GET_STATUS,
    PORT_REQUEST_TYPE,
    PORT_RESET,
    RECIPIENT_DEVICE,
    RECIPIENT_ENDPOINT,
    RECIPIENT_INTERFACE,
    SET_ADDRESS,
    SET_CONFIGURATION,
    SET_FEATURE,
    SET_INTERFACE,
    TYPE_STANDARD,
    Setup,
)
from .base import Completion, ExportedDevice, SubmitResult

#: A client may ask for any descriptor index and length: bound the reply cache.
MAX_CACHED_DESCRIPTORS = 64


class Stall(Exception):
    """Raised by a request handler to STALL the request (-EPIPE)."""


_STALL = Completion(status=EPIPE)
_ISOCHRONOUS = int(TransferType.ISOCHRONOUS)


class UrbQueue:
    """URBs waiting for data, completed first in, first out.

    Cancelled waiters (UNLINK) are skipped, so a cancelled URB never takes data.
    """

    def __init__(self) -> None:
        self._waiters: deque[tuple[CmdSubmit, asyncio.Future[Completion]]] = deque()

    def __len__(self) -> int:
        return len(self._waiters)

    def wait(self, urb: CmdSubmit) -> asyncio.Future[Completion]:
        future: asyncio.Future[Completion] = asyncio.get_running_loop().create_future()
        self._waiters.append((urb, future))
        return future

    def __bool__(self) -> bool:
        """Whether a live (not cancelled) URB is waiting."""
        while self._waiters and self._waiters[0][1].done():
            self._waiters.popleft()
        return bool(self._waiters)

    def pop(self) -> tuple[CmdSubmit, asyncio.Future[Completion]] | None:
        """The oldest live waiter, taken off the queue; the caller completes its future."""
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter[1].done():
                return waiter
        return None

    def fail_all(self, status: int) -> None:
        while self._waiters:
            _urb, future = self._waiters.popleft()
            if not future.done():
                future.set_result(Completion(status=status))


class EmulatedDevice(ExportedDevice):
    """A USB device implemented in Python from declarative descriptors."""

    #: The device's descriptors; set by subclasses (class attribute or in __init__).
    descriptor: Device

    def __init__(self) -> None:
        self.descriptors = DescriptorSet(self.descriptor)
        self.configuration = 0  # bConfigurationValue; 0 = unconfigured
        self.alternate: dict[int, int] = {}
        self.halted: set[int] = set()  # bEndpointAddress of halted endpoints
        self._endpoints: dict[int, Endpoint] = {}  # bEndpointAddress -> endpoint, current config
        #: GET_DESCRIPTOR replies by (SETUP bytes, buffer length): descriptors do not change,
        #: and hosts ask for the same ones again and again.
        self._descriptor_replies: dict[tuple[bytes, int], Completion] = {}
        self._info: DeviceInfo | None = None
        self.serial = self.descriptor.serial_number

    # --- ExportedDevice -----------------------------------------------------

    @property
    def info(self) -> DeviceInfo:
        if self._info is None or self._info.busid != self.busid:
            d = self.descriptor
            cfg = d.configurations[0]
            self._info = DeviceInfo(
                path=f"/sys/devices/platform/usbipy/usb{self.busnum}/{self.busid}",
                busid=self.busid, busnum=self.busnum, devnum=self.devnum, speed=d.speed,
                idVendor=d.idVendor, idProduct=d.idProduct, bcdDevice=d.bcdDevice,
                bDeviceClass=d.bDeviceClass, bDeviceSubClass=d.bDeviceSubClass,
                bDeviceProtocol=d.bDeviceProtocol,
                # usbipd reports the active configuration; an exported device idles in its first.
                bConfigurationValue=cfg.bConfigurationValue,
                bNumConfigurations=len(d.configurations),
                bNumInterfaces=cfg.bNumInterfaces,
                # (class, subclass, protocol) of each interface, alternate setting 0
                interfaces=tuple(
                    InterfaceInfo(i.bInterfaceClass, i.bInterfaceSubClass, i.bInterfaceProtocol)
                    for i in cfg.interfaces if i.bAlternateSetting == 0),
            )
        return self._info

    async def attach(self) -> None:
        self.reset()

    async def detach(self) -> None:
        self.reset()

    def reset(self) -> None:
        if self.configuration:
            self.on_configuration(0)
        self.configuration = 0
        self.alternate.clear()
        self.halted.clear()
        self._endpoints.clear()

    def submit(self, urb: CmdSubmit) -> SubmitResult:
        if urb.ep == 0:
            return self._control(urb)
        address = urb.ep | (0x80 if urb.direction is Direction.IN else 0)
        endpoint = self._endpoints.get(address)
        if endpoint is None:
            # No such endpoint in the active configuration: the kernel refuses the URB.
            return Completion(status=ESHUTDOWN)
        if (urb.iso_packets is not None) != (endpoint.bmAttributes & 0x03 == _ISOCHRONOUS):
            # The URB is refused alone, -EINVAL as usb_submit_urb() would answer an
            # isochronous URB without packets. (usbip-host drops the whole connection
            # when a submit fails: stub_rx.c, SDEV_EVENT_ERROR_SUBMIT; a client's one
            # bad URB need not cost it its device.)
            kind = endpoint.transfer_type.name.lower()
            return Completion(status=EINVAL, refused=(
                f"seqnum {urb.seqnum}: isochronous packets for {kind} endpoint {address:#04x}"
                if urb.iso_packets is not None else
                f"seqnum {urb.seqnum}: no isochronous packets for {kind} endpoint "
                f"{address:#04x}"))
        if address in self.halted:
            return _STALL
        return self.transfer(endpoint, urb)

    # --- hooks for subclasses ------------------------------------------------

    def control_request(self, setup: Setup, data: bytes) -> bytes | None:
        """A request to the device or an endpoint that the standard requests do not
        answer: class and vendor requests, and GET_DESCRIPTOR of a type the
        descriptor model does not know (BOS, Microsoft OS descriptors).

        Return the IN data (bytes) or None for an OUT request; raise Stall to refuse.
        """
        raise Stall

    def interface_request(self, interface: int, setup: Setup, data: bytes) -> bytes | None:
        """A request to ``interface`` (bInterfaceNumber, checked to exist in the
        active configuration) that the standard requests do not answer: class
        requests, and GET_DESCRIPTOR of class descriptors (a HID report
        descriptor). A composite device overrides this rather than routing on
        wIndex itself. The default passes it to :meth:`control_request`.
        """
        return self.control_request(setup, data)

    def transfer(self, endpoint: Endpoint, urb: CmdSubmit) -> SubmitResult:
        """A URB to a non-control endpoint of the active configuration."""
        return _STALL

    def on_configuration(self, value: int) -> None:
        """The host selected configuration ``value`` (0 = deconfigured)."""

    def on_interface(self, interface: int, alternate: int) -> None:
        """The host selected an alternate setting."""

    def on_clear_halt(self, endpoint: Endpoint) -> None:
        """The host cleared a halt on ``endpoint`` (data toggles reset)."""

    def halt(self, address: int) -> None:
        """Halt an endpoint (a functional stall) until the host clears it."""
        self.halted.add(address)

    # --- standard requests -----------------------------------------------------

    def _control(self, urb: CmdSubmit) -> Completion:
        raw = urb.setup
        if raw[0] == 0x80 and raw[1] == GET_DESCRIPTOR:
            key = (raw, urb.transfer_buffer_length)
            cached = self._descriptor_replies.get(key)
            if cached is None:
                cached = self._control_request(urb)
                if len(self._descriptor_replies) < MAX_CACHED_DESCRIPTORS:
                    self._descriptor_replies[key] = cached
            return cached
        return self._control_request(urb)

    def _control_request(self, urb: CmdSubmit) -> Completion:
        setup = Setup.parse(urb.setup)
        if setup.bmRequestType == PORT_REQUEST_TYPE and setup.bRequest == SET_FEATURE and (
            setup.wValue == PORT_RESET
        ):
            # usbip-host turns the hub's SET_FEATURE(PORT_RESET) into a device reset.
            self.reset()
            return Completion(actual_length=0)
        try:
            if setup.type == TYPE_STANDARD:
                reply = self._standard_request(setup, urb.data)
            else:
                reply = self._other_request(setup, urb.data)
        except Stall:
            return _STALL
        if setup.is_in:
            data = (reply or b"")[: min(setup.wLength, urb.transfer_buffer_length)]
            return Completion(data=data)
        return Completion(actual_length=len(urb.data))

    def _standard_request(self, setup: Setup, data: bytes) -> bytes | None:
        request = setup.bRequest
        recipient = setup.recipient
        if request == GET_DESCRIPTOR and recipient == RECIPIENT_DEVICE:
            return self._get_descriptor(setup)
        if request == SET_ADDRESS:
            return None  # vhci-hcd assigns addresses itself; nothing to do
        if request == GET_CONFIGURATION:
            return bytes((self.configuration,))
        if request == SET_CONFIGURATION:
            self._set_configuration(setup.wValue & 0xFF)
            return None
        if request == GET_STATUS:
            return self._get_status(setup)
        if request in (SET_FEATURE, CLEAR_FEATURE):
            self._feature(setup, request == SET_FEATURE)
            return None
        if request == GET_INTERFACE and recipient == RECIPIENT_INTERFACE:
            self._interface(setup.wIndex & 0xFF, None)
            return bytes((self.alternate.get(setup.wIndex & 0xFF, 0),))
        if request == SET_INTERFACE and recipient == RECIPIENT_INTERFACE:
            self._set_interface(setup.wIndex & 0xFF, setup.wValue)
            return None
        # e.g. GET_DESCRIPTOR to an interface (HID report descriptor)
        return self._other_request(setup, data)

    def _other_request(self, setup: Setup, data: bytes) -> bytes | None:
        """A request the descriptor model does not answer: to its interface or the device."""
        if setup.recipient == RECIPIENT_INTERFACE:
            number = setup.wIndex & 0xFF
            self._interface(number, None)  # Stall unless it exists in the active configuration
            return self.interface_request(number, setup, data)
        return self.control_request(setup, data)

    def _get_descriptor(self, setup: Setup) -> bytes:
        kind, index = setup.wValue >> 8, setup.wValue & 0xFF
        ds = self.descriptors
        if kind == DescriptorType.DEVICE:
            return ds.device_descriptor
        if kind == DescriptorType.CONFIGURATION and index < len(ds.configuration_descriptors):
            return ds.configuration_descriptors[index]
        if kind == DescriptorType.STRING:
            string = ds.string_descriptor(index, setup.wIndex)
            if string is not None:
                return string
        if kind == DescriptorType.DEVICE_QUALIFIER and ds.device_qualifier is not None:
            return ds.device_qualifier
        if kind in (DescriptorType.DEVICE, DescriptorType.CONFIGURATION, DescriptorType.STRING,
                    DescriptorType.DEVICE_QUALIFIER):
            raise Stall  # a type the model owns, at an index it does not have
        reply = self.control_request(setup, b"")  # BOS, Microsoft OS descriptors ...
        if reply is None:
            raise Stall
        return reply

    def _set_configuration(self, value: int) -> None:
        configs = {c.bConfigurationValue: c for c in self.descriptor.configurations}
        if value and value not in configs:
            raise Stall
        if self.configuration:
            self.on_configuration(0)
        self.configuration = value
        self.alternate.clear()
        self.halted.clear()
        self._endpoints.clear()
        if value:
            for intf in configs[value].interfaces:
                if intf.bAlternateSetting == 0:
                    self.alternate[intf.bInterfaceNumber] = 0
                    self._endpoints.update({e.bEndpointAddress: e for e in intf.endpoints})
            self.on_configuration(value)

    def _interface(self, number: int, alternate: int | None) -> list[Endpoint]:
        """Endpoints of an interface's setting in the active configuration; Stall if none."""
        if not self.configuration or number not in self.alternate:
            raise Stall
        alt = self.alternate[number] if alternate is None else alternate
        for config in self.descriptor.configurations:
            if config.bConfigurationValue != self.configuration:
                continue
            for intf in config.interfaces:
                if intf.bInterfaceNumber == number and intf.bAlternateSetting == alt:
                    return list(intf.endpoints)
        raise Stall

    def _set_interface(self, number: int, alternate: int) -> None:
        old = self._interface(number, None)
        new = self._interface(number, alternate)
        for ep in old:
            self._endpoints.pop(ep.bEndpointAddress, None)
            self.halted.discard(ep.bEndpointAddress)
        self._endpoints.update({e.bEndpointAddress: e for e in new})
        self.alternate[number] = alternate
        self.on_interface(number, alternate)

    def _get_status(self, setup: Setup) -> bytes:
        recipient = setup.recipient
        if recipient == RECIPIENT_DEVICE:
            config = next(
                (c for c in self.descriptor.configurations
                 if c.bConfigurationValue == (self.configuration or 1)), None
            )
            self_powered = bool(config and config.bmAttributes & 0x40)
            return struct.pack("<H", int(self_powered))
        if recipient == RECIPIENT_INTERFACE:
            self._interface(setup.wIndex & 0xFF, None)
            return b"\0\0"
        if recipient == RECIPIENT_ENDPOINT:
            address = setup.wIndex & 0xFF
            if address & 0x7F and address not in self._endpoints:
                raise Stall
            return struct.pack("<H", int(address in self.halted))
        raise Stall

    def _feature(self, setup: Setup, set_it: bool) -> None:
        recipient = setup.recipient
        if recipient == RECIPIENT_ENDPOINT and setup.wValue == ENDPOINT_HALT:
            address = setup.wIndex & 0xFF
            if address & 0x7F == 0:
                return  # ep0 halts clear themselves on the next SETUP
            endpoint = self._endpoints.get(address)
            if endpoint is None:
                raise Stall
            if set_it:
                self.halted.add(address)
            else:
                self.halted.discard(address)
                self.on_clear_halt(endpoint)
            return
        if recipient == RECIPIENT_DEVICE and setup.wValue == DEVICE_REMOTE_WAKEUP:
            return
        raise Stall
