"""What a transfer is, for both clients: pure functions, no I/O.

The asyncio client (:mod:`.userspace`) and the blocking one (:mod:`.sync`)
differ only in how they wait. What a control transfer's SETUP packet is,
how an isochronous URB lays out its packets and reads back their results,
a transfer in words for its error, and how a URB that timed out ended once
it was unlinked: all of that is here, once.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from ..protocol import Direction, IsoPacket, RetSubmit, RetUnlink
from ..protocol.constants import ECONNRESET, ENOENT
from ..usb.requests import DIR_IN, SETUP
from .errors import TransferTimeout, urb_error

#: Seconds to connect and finish a TLS handshake.
CONNECT_TIMEOUT = 30.0
#: Seconds to wait for RET_UNLINK after a transfer timed out; a server that does
#: not answer by then has lost track of the URB, and the connection is closed.
UNLINK_TIMEOUT = 10.0

#: URB statuses of an unlinked URB (usb_kill_urb: -ENOENT; usb_unlink_urb: -ECONNRESET;
#: the constants are the statuses, negative).
UNLINKED = frozenset({ENOENT, ECONNRESET})

#: The SETUP field of a URB to an endpoint other than 0.
NO_SETUP = bytes(8)


@dataclass(frozen=True, slots=True)
class IsoResult:
    """One isochronous packet's outcome: its status (0 or -errno) and its data
    (IN; empty for OUT), cut from the URB's buffer at the packet's offset."""

    status: int
    data: bytes
    actual_length: int


def control_request(bmRequestType: int, bRequest: int, wValue: int, wIndex: int,
                    wLength_or_data: int | bytes) -> tuple[Direction, int, bytes, bytes]:
    """A control transfer's direction, buffer length, SETUP packet and OUT data.

    ``wLength_or_data`` is the length to read or the bytes to write, by the
    direction bit of ``bmRequestType`` (USB 2.0, 9.3)."""
    if bmRequestType & DIR_IN:
        if not isinstance(wLength_or_data, int):
            raise TypeError("an IN control transfer takes a length, not data")
        return (Direction.IN, wLength_or_data,
                SETUP.pack(bmRequestType, bRequest, wValue, wIndex, wLength_or_data), b"")
    if isinstance(wLength_or_data, int):
        if wLength_or_data:
            raise TypeError("an OUT control transfer takes data, not a length")
        wLength_or_data = b""
    data = bytes(wLength_or_data)
    return (Direction.OUT, len(data),
            SETUP.pack(bmRequestType, bRequest, wValue, wIndex, len(data)), data)


def iso_layout(lengths: Sequence[int]) -> list[IsoPacket]:
    """Packets back to back in the transfer buffer, as usb_fill_iso_packets lays them."""
    packets = []
    offset = 0
    for length in lengths:
        if length < 0:
            raise ValueError("an isochronous packet's length cannot be negative")
        packets.append(IsoPacket(offset, length))
        offset += length
    if not packets:
        raise ValueError("an isochronous transfer needs at least one packet")
    return packets


def iso_results(ret: RetSubmit, sent: list[IsoPacket], direction: Direction
                ) -> list[IsoResult]:
    """Each packet's outcome. RET_SUBMIT's IN data has the packets' actual bytes
    back to back (stub_tx.c sends each packet's actual_length only); the offsets
    are the ones sent."""
    got = ret.iso_packets or sent
    results = []
    at = 0
    for packet in got:
        if direction is Direction.IN:
            data = ret.data[at:at + packet.actual_length]
            at += packet.actual_length
        else:
            data = b""
        results.append(IsoResult(packet.status, data, packet.actual_length))
    return results


def describe(ep: int, direction: Direction, setup: bytes,
             iso_packets: list[IsoPacket] | None) -> str:
    """A transfer in words, for its error (built only then: it costs microseconds)."""
    if ep == 0:
        bmRequestType, bRequest, wValue, wIndex, wLength = SETUP.unpack(setup)
        return (f"control request {bmRequestType:#04x} {bRequest:#04x} (wValue {wValue:#06x}, "
                f"wIndex {wIndex:#06x}, wLength {wLength})")
    kind = "isochronous transfer" if iso_packets is not None else "transfer"
    if direction is Direction.IN:
        return f"{kind} from endpoint {ep | 0x80:#04x}"
    return f"{kind} to endpoint {ep:#04x}"


def checked(ret: RetSubmit, ep: int, direction: Direction, setup: bytes,
            iso_packets: list[IsoPacket] | None) -> RetSubmit:
    """``ret`` when the URB succeeded; else the :func:`urb_error` for its status."""
    if ret.status:
        raise urb_error(ret, describe(ep, direction, setup, iso_packets))
    return ret


def unlink_grace(timeout: float) -> float:
    """How long the server has to answer the unlink of a URB that timed out after
    ``timeout`` seconds: as long again, from 1 s to :data:`UNLINK_TIMEOUT`."""
    return min(UNLINK_TIMEOUT, max(1.0, timeout))


def after_unlink(seqnum: int, raced: RetSubmit | None, unlinked: RetUnlink | None,
                 what: str, timeout: float) -> RetSubmit:
    """How a URB that timed out ended, once unlinked: its RET_SUBMIT when one came
    before the RET_UNLINK (``raced``) and says it completed, else the error.

    A RET_UNLINK of status 0 with no RET_SUBMIT is a URB usbip-host completed while
    it was being unlinked (stub_complete() in stub_tx.c answers it with the
    RET_UNLINK alone): its data is lost. Any other status than an unlinked one is
    the URB's own error.
    """
    if raced is not None:
        if raced.status not in UNLINKED:
            return raced
    elif unlinked is not None:
        if unlinked.status == 0:
            raise TransferTimeout(what, timeout, completed=True)
        if unlinked.status not in UNLINKED:
            raise urb_error(RetSubmit(seqnum, unlinked.status), what)
    raise TransferTimeout(what, timeout)
