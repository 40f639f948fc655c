"""The one interface every exported device implements.

An exported device is what a client imports: an emulated device written in
Python, a device held by the kernel's usbip-host, or one opened through libusb.
The server only ever talks to this interface.

Cancellation (USBIP_CMD_UNLINK) is asyncio cancellation: the server cancels
the awaitable that :meth:`ExportedDevice.submit` returned, and the device undoes
whatever it started (a libusb transfer, a queued read) when that happens.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

from ..protocol import CmdSubmit, DeviceInfo, IsoPacket, OpStatus


@dataclass(slots=True)
class Completion:
    """How a URB ended: what RET_SUBMIT will carry."""

    #: 0 or a negative errno (-EPIPE for a stall, -ENODEV for a gone device, ...).
    status: int = 0
    #: IN data; for isochronous IN, the packets' data back to back.
    data: bytes = b""
    #: Bytes moved. None means len(data) for IN and the whole buffer for OUT.
    actual_length: int | None = None
    iso_packets: list[IsoPacket] | None = None
    error_count: int = 0
    start_frame: int = 0
    #: Why the URB was refused as the client's mistake (an isochronous URB to a bulk
    #: endpoint, say): the server logs it as the client's, at WARNING and rate
    #: limited, not as a fault of the device.
    refused: str | None = None


#: A URB's outcome: known at once (no task needed), or later.
SubmitResult = Completion | Awaitable[Completion]


class ExportedDevice(ABC):
    """A USB device that usbipyd exports and whose URBs this process serves."""

    #: How it is served, as the status page names it ("emulated", "libusb").
    via: str = "emulated"
    #: Filled in by the registry when the device is added, unless the backend knows it.
    busid: str = ""
    busnum: int = 0
    devnum: int = 0
    #: The device's serial number (iSerialNumber), for access rules; None if none.
    serial: str | None = None
    #: Set by the server while a client holds the device: a device calls it on the
    #: event loop to drop that client cleanly (unplugged, unbound).
    drop_client: Callable[[], None] | None = None

    @property
    @abstractmethod
    def info(self) -> DeviceInfo:
        """The record that OP_REP_DEVLIST and OP_REP_IMPORT send."""

    async def attach(self) -> None:
        """A client imported the device. Loop-only; blocking work goes to a thread."""
        return None

    async def detach(self) -> None:
        """The client went away: release everything. Loop-only; blocking work goes
        to a thread. The device is offered again only once this returns."""
        return None

    @abstractmethod
    def submit(self, urb: CmdSubmit) -> SubmitResult:
        """Start a URB. Return a Completion when the result is known at once, or an
        awaitable (a Future or coroutine) that the server may cancel on UNLINK."""

    def close(self) -> None:
        """The server shuts down: make everything durable and free resources."""
        return None


class HandOffDevice(ABC):
    """A device whose URBs another party serves, such as the kernel's usbip-host.

    On IMPORT the server checks :meth:`import_status`, passes the connected
    socket to :meth:`hand_off`, sends OP_REP_IMPORT and closes its own copy of
    the socket: the connection lives on in the other party. Both calls block
    (sysfs); the server makes them in a worker thread.
    """

    #: Who serves its URBs, as the status page names it.
    via: str = "usbip-host"
    busid: str = ""
    serial: str | None = None

    @property
    @abstractmethod
    def info(self) -> DeviceInfo:
        """The record that OP_REP_DEVLIST and OP_REP_IMPORT send."""

    @abstractmethod
    def import_status(self) -> OpStatus:
        """OK when the device can be imported now; DEV_BUSY, DEV_ERR or NA otherwise."""

    @abstractmethod
    def hand_off(self, fd: int) -> None:
        """Give the connected socket ``fd`` to the party that serves the URBs.

        Raises OSError when it refuses."""

    def take_back(self) -> None:
        """End the session the other party serves (a client no longer allowed).

        Blocking, like :meth:`hand_off`; OSError when it cannot."""
        raise OSError(f"{type(self).__name__} cannot end its session")


#: Anything the registry can list and a client can import.
AnyDevice = ExportedDevice | HandOffDevice


class DeviceSource(ABC):
    """Devices whose set changes under us (the kernel's usbip-host bindings, libusb
    bindings and hotplug): asked afresh on every DEVLIST and IMPORT, as usbipd does."""

    @abstractmethod
    async def devices(self) -> Sequence[AnyDevice]:
        """The devices now. Loop-only; blocking work goes to a thread."""

    async def check(self) -> None:
        """Called periodically: notice devices that left while imported."""
        return None

    def close(self) -> None:
        """The server shuts down."""
        return None
