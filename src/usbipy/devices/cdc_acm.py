"""An emulated USB CDC-ACM serial port (the client's /dev/ttyACMn)."""

from __future__ import annotations

import asyncio
import struct
from dataclasses import dataclass

from ..backends.base import Completion, SubmitResult
from ..backends.emulated import EmulatedDevice, Stall, UrbQueue
from ..protocol import CmdSubmit, Speed
from ..protocol.constants import EPIPE, ESHUTDOWN
from ..usb.descriptors import Configuration, Device, Endpoint, Interface, TransferType
from ..usb.requests import Setup
from .serial_backends import EchoBackend, SerialBackend

# CDC PSTN requests (CDC PSTN 1.2, 6.3)
SEND_ENCAPSULATED_COMMAND = 0x00
GET_ENCAPSULATED_RESPONSE = 0x01
SET_LINE_CODING = 0x20
GET_LINE_CODING = 0x21
SET_CONTROL_LINE_STATE = 0x22
SEND_BREAK = 0x23

EP_NOTIFY = 0x83
COMM_INTERFACE = 0  # bInterfaceNumber of the communications interface
EP_IN = 0x81
EP_OUT = 0x02

_LINE_CODING = struct.Struct("<IBBB")

#: Class-specific functional descriptors of the communications interface.
_FUNCTIONAL = bytes.fromhex(
    "0524001001"  # Header: CDC 1.10
    "0524010001"  # Call Management: no call management, data interface 1
    "04240202"  # ACM: SET/GET_LINE_CODING, SET_CONTROL_LINE_STATE, SERIAL_STATE
    "0524060001"  # Union: control interface 0, data interface 1
)


@dataclass
class LineCoding:
    dwDTERate: int = 115200
    bCharFormat: int = 0  # 1 stop bit
    bParityType: int = 0  # none
    bDataBits: int = 8


class CdcAcm(EmulatedDevice):
    """A high-speed CDC-ACM port bridged to a :class:`SerialBackend`."""

    descriptor = Device(
        idVendor=0x1209, idProduct=0x0003, bcdDevice=0x0100, speed=Speed.HIGH,
        bDeviceClass=0x02,  # communications device
        manufacturer="usbipy", product="usbipy CDC-ACM serial", serial_number="ACM0001",
        configurations=(
            Configuration(
                interfaces=(
                    Interface(
                        COMM_INTERFACE, 0x02, 0x02, 0x01,  # CDC, ACM, AT commands (V.250)
                        endpoints=(Endpoint(EP_NOTIFY, TransferType.INTERRUPT, 16, 9),),
                        class_descriptors=_FUNCTIONAL,
                    ),
                    Interface(
                        1, 0x0A, 0x00, 0x00,  # CDC data
                        endpoints=(
                            Endpoint(EP_IN, TransferType.BULK, 512),
                            Endpoint(EP_OUT, TransferType.BULK, 512),
                        ),
                    ),
                ),
            ),
        ),
    )

    #: Bytes from the backend held for the USB host; beyond this the backend's
    #: writes wait (an echo then holds back the OUT URB that caused them).
    MAX_RX = 1 << 20

    def __init__(self, backend: SerialBackend | None = None) -> None:
        super().__init__()
        self.backend: SerialBackend = backend or EchoBackend()
        self.line_coding = LineCoding()
        self.dtr = False
        self.rts = False
        self._rx = bytearray()
        self._in_urbs = UrbQueue()
        self._notify_urbs = UrbQueue()
        self._drained: asyncio.Future[None] | None = None

    async def attach(self) -> None:
        await super().attach()
        self.backend.start(self._from_backend)

    async def detach(self) -> None:
        self.backend.stop()
        self._flush()
        if self._drained is not None and not self._drained.done():
            self._drained.cancel()
        await super().detach()

    def on_configuration(self, value: int) -> None:
        if value == 0:
            # Deconfigured: a port reset, or SET_CONFIGURATION again (USB 2.0,
            # 9.1.1.5): the endpoints' buffers are emptied, as a USB serial
            # adapter's FIFOs are, and URBs still waiting end as on a disabled
            # endpoint. A writer held back by a full buffer goes on.
            self._flush()
            if self._drained is not None and not self._drained.done():
                self._drained.set_result(None)

    def _flush(self) -> None:
        self._in_urbs.fail_all(ESHUTDOWN)
        self._notify_urbs.fail_all(ESHUTDOWN)
        self._rx.clear()

    def close(self) -> None:
        close = getattr(self.backend, "close", None)
        if close is not None:
            close()

    def interface_request(self, interface: int, setup: Setup, data: bytes) -> bytes | None:
        # PSTN 1.2, 6.3: the class requests go to the communications interface;
        # the data interface has none.
        if interface != COMM_INTERFACE:
            raise Stall
        if setup.bmRequestType == 0x21:
            if setup.bRequest == SET_LINE_CODING:
                if len(data) < _LINE_CODING.size:
                    raise Stall
                self.line_coding = LineCoding(*_LINE_CODING.unpack_from(data))
                return None
            if setup.bRequest == SET_CONTROL_LINE_STATE:
                self.dtr = bool(setup.wValue & 1)
                self.rts = bool(setup.wValue & 2)
                return None
            if setup.bRequest == SEND_BREAK:
                return None
        if setup.bmRequestType == 0xA1 and setup.bRequest == GET_LINE_CODING:
            lc = self.line_coding
            return _LINE_CODING.pack(lc.dwDTERate, lc.bCharFormat, lc.bParityType, lc.bDataBits)
        raise Stall

    def transfer(self, endpoint: Endpoint, urb: CmdSubmit) -> SubmitResult:
        address = endpoint.bEndpointAddress
        if address == EP_OUT:
            return self._bulk_out(urb)
        if address == EP_IN:
            if self._rx and not self._in_urbs:
                return Completion(data=self._take(urb.transfer_buffer_length))
            return self._in_urbs.wait(urb)
        if address == EP_NOTIFY:
            # No line-state changes to report: the URB waits until it is unlinked.
            return self._notify_urbs.wait(urb)
        return Completion(status=EPIPE)

    def _bulk_out(self, urb: CmdSubmit) -> SubmitResult:
        wrote = self.backend.write(urb.data)
        done = Completion(actual_length=len(urb.data))
        if wrote is None and len(self._rx) < self.MAX_RX:
            return done
        return self._after(wrote, done)

    async def _after(self, wrote: asyncio.Future[None] | None, done: Completion) -> Completion:
        if wrote is not None:
            await wrote
        while len(self._rx) >= self.MAX_RX:
            if self._drained is None or self._drained.done():
                self._drained = asyncio.get_running_loop().create_future()
            await asyncio.shield(self._drained)
        return done

    def _take(self, length: int) -> bytes:
        data = bytes(self._rx[:length])
        del self._rx[:length]
        if len(self._rx) < self.MAX_RX and self._drained is not None and not self._drained.done():
            self._drained.set_result(None)
        return data

    def _from_backend(self, data: bytes) -> None:
        self._rx += data
        while self._rx:
            waiter = self._in_urbs.pop()
            if waiter is None:
                return
            urb, future = waiter
            future.set_result(Completion(data=self._take(urb.transfer_buffer_length)))
