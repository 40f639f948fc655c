"""A USB/IP URB as a libusb transfer, and a finished transfer as a Completion.

The layouts differ in two places: libusb lays isochronous packets back to
back where a URB gives each its own offset, and libusb has no -EREMOTEIO
for a short read with URB_SHORT_NOT_OK (it reports a plain error), so the
flag is applied here, on completion, as the kernel would.
"""

from __future__ import annotations

import errno
from collections.abc import Callable
from typing import Any

from ...protocol import CmdSubmit, Direction, IsoPacket
from ...usb.descriptors import TransferType
from ...usb.urb import UrbFlag
from ..base import Completion
from .status import transfer_errno


def fill_transfer(transfer: Any, urb: CmdSubmit, address: int, kind: TransferType,
                  callback: Callable[[Any], None]) -> None:
    """Set ``transfer`` up for ``urb`` to the non-control endpoint ``address``."""
    iso = urb.iso_packets
    buffer: int | bytes
    if urb.direction is Direction.IN:
        buffer = urb.transfer_buffer_length
    else:
        buffer = urb.data
        transfer.setAddZeroPacket(bool(urb.transfer_flags & UrbFlag.ZERO_PACKET))
    if kind == TransferType.ISOCHRONOUS or iso is not None:
        packets = iso or []
        if urb.direction is Direction.OUT:
            buffer = b"".join(urb.data[p.offset:p.offset + p.length] for p in packets)
        else:
            buffer = sum(p.length for p in packets)
        transfer.setIsochronous(address, buffer, callback, urb, 0, [p.length for p in packets])
    elif kind == TransferType.INTERRUPT:
        transfer.setInterrupt(address, buffer, callback, urb, 0)
    else:
        transfer.setBulk(address, buffer, callback, urb, 0)


def completion_of(transfer: Any) -> Completion:
    """The result of a finished transfer; in the event thread, while its buffer is valid."""
    urb: CmdSubmit = transfer.getUserData()
    completion = Completion(status=transfer_errno(transfer.getStatus()))
    if urb.iso_packets is not None:
        _iso_result(transfer, urb, completion)
    elif urb.direction is Direction.IN:
        actual = transfer.getActualLength()
        completion.data = bytes(transfer.getBuffer()[:actual])
        if (urb.transfer_flags & UrbFlag.SHORT_NOT_OK and completion.status == 0
                and actual < urb.transfer_buffer_length and urb.ep != 0):
            completion.status = -errno.EREMOTEIO
    else:
        completion.actual_length = transfer.getActualLength()
    return completion


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
