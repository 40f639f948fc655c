"""An emulated USB mass-storage device: Bulk-Only Transport (BOT 1.0) over a SCSI disk.

The host sends a 31-byte CBW on bulk OUT, moves the data phase on bulk IN or
OUT, and reads a 13-byte CSW on bulk IN. IN URBs that arrive before there is
anything to send wait in order. READ data is read from the image as URBs ask
for it, so a large READ never sits in memory whole.
"""

from __future__ import annotations

import asyncio
import logging
import struct
from collections import deque
from dataclasses import dataclass

from ..backends.base import Completion, SubmitResult
from ..backends.emulated import EmulatedDevice, Stall, UrbQueue
from ..protocol import CmdSubmit, Speed
from ..protocol.constants import EPIPE, ESHUTDOWN
from ..usb.descriptors import Configuration, Device, Endpoint, Interface, TransferType
from ..usb.requests import Setup
from .scsi import GOOD, READ_ERROR, WRITE_ERROR, ScsiCommand, ScsiDisk
from .storage import ImageFile

log = logging.getLogger(__name__)

CBW = struct.Struct("<IIIBBB16s")
CSW = struct.Struct("<IIIB")
CBW_SIGNATURE = 0x43425355
CSW_SIGNATURE = 0x53425355
CSW_PASSED, CSW_FAILED, CSW_PHASE_ERROR = 0, 1, 2

BULK_ONLY_RESET = 0xFF
GET_MAX_LUN = 0xFE

EP_IN = 0x81
EP_OUT = 0x02


@dataclass(slots=True)
class _InData:
    """The device's side of an IN data phase."""

    command: ScsiCommand
    host_length: int  # dCBWDataTransferLength
    tag: int
    offset: int = 0  # bytes sent so far

    @property
    def remaining(self) -> int:
        return min(self.command.data_in_length, self.host_length) - self.offset


@dataclass(slots=True)
class _OutData:
    """The device's side of an OUT data phase (a WRITE)."""

    offset: int  # next byte on the storage
    remaining: int
    host_length: int
    tag: int


class MassStorage(EmulatedDevice):
    """A high-speed USB stick: SCSI transparent command set, Bulk-Only Transport."""

    descriptor = Device(
        idVendor=0x1209, idProduct=0x0002, bcdDevice=0x0100, speed=Speed.HIGH,
        manufacturer="usbipy", product="usbipy mass storage", serial_number="MSC00000001",
        configurations=(
            Configuration(
                interfaces=(
                    Interface(
                        0, 0x08, 0x06, 0x50,  # mass storage, SCSI transparent, Bulk-Only
                        endpoints=(
                            Endpoint(EP_IN, TransferType.BULK, 512),
                            Endpoint(EP_OUT, TransferType.BULK, 512),
                        ),
                    ),
                ),
            ),
        ),
    )

    def __init__(self, storage: ImageFile) -> None:
        super().__init__()
        self.storage = storage
        self.disk = ScsiDisk(storage)
        self._in_queue: deque[_InData | bytes] = deque()  # data phases and CSWs
        self._out: _OutData | None = None
        self._urbs = UrbQueue()
        self._busy = False  # a flush is running; the CSW comes after it
        #: Counts resets: a flush that began before one queues no CSW after it.
        self._epoch = 0

    async def detach(self) -> None:
        self._urbs.fail_all(ESHUTDOWN)
        self._bot_reset()
        await super().detach()

    def close(self) -> None:
        self.storage.close()

    # --- control ------------------------------------------------------------

    def interface_request(self, interface: int, setup: Setup, data: bytes) -> bytes | None:
        # BOT 3.1 and 3.2: the class requests of the one interface.
        if setup.bmRequestType == 0x21 and setup.bRequest == BULK_ONLY_RESET:
            self._bot_reset()
            return None
        if setup.bmRequestType == 0xA1 and setup.bRequest == GET_MAX_LUN:
            return b"\0"  # one logical unit
        raise Stall

    def _bot_reset(self) -> None:
        """Bulk-Only Mass Storage Reset: ready for a CBW; halts stay until cleared.
        Nothing of the commands before it is sent any more: no data phase, no CSW
        (a CSW of an earlier command would answer the next CBW with the wrong tag)."""
        self._in_queue.clear()
        self._out = None
        self._busy = False
        self._epoch += 1

    def on_configuration(self, value: int) -> None:
        if value == 0:
            # Deconfigured: a port reset, or SET_CONFIGURATION again. The endpoints'
            # state is gone with it (USB 2.0, 9.1.1.5): URBs still waiting end as
            # on a disabled endpoint, and the transport starts afresh.
            self._urbs.fail_all(ESHUTDOWN)
            self._bot_reset()

    def on_clear_halt(self, endpoint: Endpoint) -> None:
        if endpoint.bEndpointAddress == EP_IN:
            self._pump()

    def halt(self, address: int) -> None:
        super().halt(address)
        if address == EP_IN:
            self._urbs.fail_all(EPIPE)

    # --- bulk ------------------------------------------------------------------

    def transfer(self, endpoint: Endpoint, urb: CmdSubmit) -> SubmitResult:
        if endpoint.bEndpointAddress == EP_OUT:
            return self._bulk_out(urb.data)
        if not self._urbs and not self._busy and self._in_queue:
            return self._next_in(urb.transfer_buffer_length)
        return self._urbs.wait(urb)

    def _bulk_out(self, data: bytes) -> Completion:
        out = self._out
        if out is not None:
            return self._data_out(out, data)
        if len(data) != CBW.size:
            return self._invalid_cbw(f"{len(data)}-byte CBW")
        signature, tag, length, flags, lun, cb_length, cb = CBW.unpack(data)
        if signature != CBW_SIGNATURE or lun != 0 or not 1 <= cb_length <= 16:
            return self._invalid_cbw(f"signature {signature:#x}, LUN {lun}, CB length {cb_length}")
        command = self.disk.command(cb[:cb_length])
        host_in = bool(flags & 0x80)
        if command.status != GOOD:
            self._no_data_phase(tag, length, host_in, CSW_FAILED)
        elif command.write is not None:
            offset, size = command.write
            if host_in or size != length:
                self._no_data_phase(tag, length, host_in, CSW_PHASE_ERROR)
            elif size:
                self._out = _OutData(offset, size, length, tag)
            else:
                self._queue_csw(tag, 0, CSW_PASSED)
        elif command.data_in_length:
            if not host_in or command.data_in_length > length:
                self._no_data_phase(tag, length, host_in, CSW_PHASE_ERROR)
            else:
                self._in_queue.append(_InData(command, length, tag))
        elif command.flush:
            self._flush_then_csw(tag, length)
        else:
            # No data: a host that offered a data phase gets a stall and the residue.
            self._no_data_phase(tag, length, host_in, CSW_PASSED)
        self._pump()
        return Completion(actual_length=CBW.size)

    def _invalid_cbw(self, why: str) -> Completion:
        # BOT 6.6.1: stall both pipes until a reset recovery.
        log.warning("invalid CBW (%s): stalling until reset recovery", why)
        self.halt(EP_IN)
        self.halt(EP_OUT)
        return Completion(actual_length=0)

    def _no_data_phase(self, tag: int, length: int, host_in: bool, status: int) -> None:
        """No data phase from the device: stall the pipe the host wants data on."""
        if length:
            self.halt(EP_IN if host_in else EP_OUT)
        self._queue_csw(tag, length, status)

    @staticmethod
    def _csw(tag: int, residue: int, status: int) -> bytes:
        return CSW.pack(CSW_SIGNATURE, tag, residue, status)

    def _queue_csw(self, tag: int, residue: int, status: int) -> None:
        self._in_queue.append(self._csw(tag, residue, status))

    def _data_out(self, out: _OutData, data: bytes) -> Completion:
        chunk = data[: out.remaining]
        try:
            self.storage.write(out.offset, chunk)
        except OSError:
            log.exception("write to the disk image failed")
            self._out = None
            self.disk.sense = WRITE_ERROR
            self.halt(EP_OUT)
            self._queue_csw(out.tag, out.remaining, CSW_FAILED)
            self._pump()
            return Completion(status=EPIPE)
        out.offset += len(chunk)
        out.remaining -= len(chunk)
        if out.remaining == 0:
            self._out = None
            self._queue_csw(out.tag, 0, CSW_PASSED)
            self._pump()
        return Completion(actual_length=len(chunk))

    def _flush_then_csw(self, tag: int, length: int) -> None:
        self._busy = True
        epoch = self._epoch
        future = asyncio.get_running_loop().run_in_executor(None, self.storage.flush)

        def done(f: asyncio.Future[None]) -> None:
            if self._epoch != epoch:  # (reset meanwhile: its CSW answers nothing now)
                f.exception()  # (retrieved: never logged as unhandled)
                return
            self._busy = False
            status = CSW_PASSED if f.exception() is None else CSW_FAILED
            self._queue_csw(tag, length, status)
            self._pump()

        future.add_done_callback(done)

    def _next_in(self, urb_length: int) -> Completion:
        """Serve one IN URB from the head of the queue (which is not empty)."""
        head = self._in_queue[0]
        if isinstance(head, bytes):
            self._in_queue.popleft()
            return Completion(data=head[:urb_length])
        take = min(urb_length, head.remaining)
        command = head.command
        if command.read is not None:
            try:
                data = self.storage.read(command.read[0] + head.offset, take)
            except OSError:
                log.exception("read from the disk image failed")
                return self._read_failed(head)
        else:
            data = command.data_in[head.offset : head.offset + take]
        head.offset += len(data)
        if head.remaining == 0 or len(data) < take:
            self._in_queue.popleft()
            residue = head.host_length - head.offset
            if residue and len(data) == urb_length:
                # The host still expects data and our last packet was not short:
                # stall so that it ends the data phase (BOT 6.7.2, case Hi > Di).
                self.halt(EP_IN)
            # The CSW goes right after its data phase, ahead of anything queued later.
            self._in_queue.appendleft(self._csw(head.tag, residue, CSW_PASSED))
        return Completion(data=data)

    def _read_failed(self, head: _InData) -> Completion:
        """A read error: end the data phase with a stall (BOT 6.7.2), then a CSW of
        FAILED, with MEDIUM ERROR / UNRECOVERED READ ERROR for REQUEST SENSE (SBC-3 4.15)."""
        self._in_queue.popleft()
        self.disk.sense = READ_ERROR
        self._in_queue.appendleft(self._csw(head.tag, head.host_length - head.offset,
                                            CSW_FAILED))
        self.halt(EP_IN)
        return Completion(status=EPIPE)

    def _pump(self) -> None:
        """Complete waiting IN URBs while there is something to send."""
        while not self._busy and self._in_queue and EP_IN not in self.halted:
            waiter = self._urbs.pop()
            if waiter is None:
                return
            urb, future = waiter
            future.set_result(self._next_in(urb.transfer_buffer_length))
