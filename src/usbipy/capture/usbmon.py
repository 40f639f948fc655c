"""URBs as Linux usbmon records, each in a pcapng enhanced packet block.

The record is the 64-byte ``pcap_usb_header_mmapped`` of libpcap (the binary
usbmon API of drivers/usb/mon/mon_bin.c), then the iso descriptors, then the
data: a submission ('S') carries OUT data and the SETUP packet, a completion
('C') the IN data and the status. Wireshark's USB dissectors then decode the
class traffic on top: HID reports, SCSI over the bulk-only transport, CDC.

A record is packed with the enhanced packet block's header in one
``struct.pack`` call: capture runs on the server's hot path.
"""

from __future__ import annotations

import struct
import time
from collections.abc import Callable
from typing import Final

from ..protocol import CmdSubmit, Direction, IsoPacket
from ..usb.descriptors import DescriptorType, TransferType
from ..usb.parse import DescriptorError, parse_configuration
from ..usb.requests import GET_DESCRIPTOR
from .pcapng import EPB_TYPE

#: The enhanced packet block's head (28 bytes), then pcap_usb_header_mmapped (64):
#: id, event, transfer type, endpoint, device, bus, setup flag, data flag,
#: ts_sec, ts_usec, status, urb_len, data_len, setup (or error_count and
#: numdesc for iso), interval, start_frame, xfer_flags, ndesc.
HEAD: Final = struct.Struct("<IIIIIII" "QBBBBHbbqiiII8siiII")
USBMON_HEADER_SIZE: Final = 64
_EPB_OVERHEAD: Final = 28 + 4
_ISO_DESC: Final = struct.Struct("<iIII")
_ISO_REC: Final = struct.Struct("<ii")
_TRAILER: Final = struct.Struct("<I")
#: Padding to 4 bytes, by how many are missing.
_PADS: Final = (b"", b"\0", b"\0\0", b"\0\0\0")

EVENT_SUBMIT: Final = ord("S")
EVENT_COMPLETE: Final = ord("C")
#: usbmon's transfer types (mon_bin.c: xfer_to_pipe): iso 0, interrupt 1, control 2, bulk 3.
_USBMON_TYPE: Final = {TransferType.ISOCHRONOUS: 0, TransferType.INTERRUPT: 1,
                       TransferType.CONTROL: 2, TransferType.BULK: 3}
_NO_SETUP: Final = ord("-")
_DATA_IN_PENDING: Final = ord("<")  # an IN submission: its data comes with the completion
_DATA_OUT_DONE: Final = ord(">")  # an OUT completion: its data went with the submission
EINPROGRESS: Final = -115


def _now_us() -> int:
    return time.time_ns() // 1000


class UrbRecorder:
    """The records of one imported device's URBs, for one connection.

    ``emit`` takes each finished record (bytes of a whole pcapng block). The
    transfer type of an endpoint is learned from the configuration
    descriptors the client reads (it reads them before it uses an endpoint);
    until then, an endpoint with an interval is taken for an interrupt one.
    """

    def __init__(self, emit: Callable[[bytes], None], busnum: int, devnum: int,
                 connection: int) -> None:
        self._emit = emit
        self._busnum = busnum & 0xFFFF
        self._devnum = devnum & 0xFF
        self._id_base = (connection & 0xFFFFFFFF) << 32
        #: endpoint address -> usbmon transfer type
        self._types: dict[int, int] = {}

    def _type(self, urb: CmdSubmit, address: int) -> int:
        if urb.ep == 0:
            return 2
        if urb.iso_packets is not None:
            return 0
        kind = self._types.get(address)
        if kind is not None:
            return kind
        return 1 if urb.interval else 3

    def submitted(self, urb: CmdSubmit) -> None:
        address = urb.ep | 0x80 if urb.direction is Direction.IN else urb.ep
        kind = self._type(urb, address)
        data = urb.data if urb.direction is Direction.OUT else b""
        if kind == 2:
            setup_flag, setup = 0, urb.setup
        else:
            setup_flag, setup = _NO_SETUP, bytes(8)
        iso = b""
        ndesc = 0
        if urb.iso_packets is not None:
            ndesc = len(urb.iso_packets)
            setup = _ISO_REC.pack(0, ndesc)
            iso = b"".join(_ISO_DESC.pack(p.status, p.offset, p.length, 0) for p in urb.iso_packets)
        self._record(urb.seqnum, EVENT_SUBMIT, kind, address, setup_flag,
                     0 if data else _DATA_IN_PENDING if urb.direction is Direction.IN
                     else _DATA_OUT_DONE, EINPROGRESS, urb.transfer_buffer_length, data,
                     setup, urb.interval, urb.start_frame, urb.transfer_flags, ndesc, iso)

    def completed(self, urb: CmdSubmit, status: int, data: bytes, actual_length: int,
                  iso_packets: list[IsoPacket] | None = None, error_count: int = 0,
                  start_frame: int = 0) -> None:
        address = urb.ep | 0x80 if urb.direction is Direction.IN else urb.ep
        kind = self._type(urb, address)
        if not data or urb.direction is Direction.OUT:
            data = b""
        setup = bytes(8)
        iso = b""
        ndesc = 0
        if iso_packets is not None:
            ndesc = len(iso_packets)
            setup = _ISO_REC.pack(error_count, ndesc)
            iso = b"".join(_ISO_DESC.pack(p.status, p.offset, p.actual_length, 0)
                           for p in iso_packets)
            if data:
                data = _spread(data, iso_packets)
        elif kind == 2 and status == 0 and data:
            self._learn(urb.setup, data)
        self._record(urb.seqnum, EVENT_COMPLETE, kind, address, _NO_SETUP,
                     0 if data else _DATA_OUT_DONE if urb.direction is Direction.OUT
                     else _DATA_IN_PENDING, status, actual_length, data, setup, urb.interval,
                     start_frame, urb.transfer_flags, ndesc, iso)

    def _learn(self, setup: bytes, data: bytes) -> None:
        # GET_DESCRIPTOR(CONFIGURATION) answered in full: the endpoints' types
        if setup[1] != GET_DESCRIPTOR or setup[3] != DescriptorType.CONFIGURATION or (
                setup[0] != 0x80):
            return
        try:
            config = parse_configuration(data)
        except DescriptorError:
            return  # (the first 9 bytes only, or nonsense)
        for endpoint in config.all_endpoints:
            self._types[endpoint.bEndpointAddress] = _USBMON_TYPE[
                TransferType(endpoint.bmAttributes & 3)]

    def _record(self, seqnum: int, event: int, kind: int, address: int, setup_flag: int,
                data_flag: int, status: int, urb_len: int, data: bytes, setup: bytes,
                interval: int, start_frame: int, xfer_flags: int, ndesc: int,
                iso: bytes) -> None:
        ts = _now_us()
        length = USBMON_HEADER_SIZE + len(iso) + len(data)
        pad = -length % 4
        total = _EPB_OVERHEAD + length + pad
        self._emit(b"".join((
            HEAD.pack(EPB_TYPE, total, 0, ts >> 32, ts & 0xFFFFFFFF, length, length,
                      self._id_base | seqnum, event, kind, address, self._devnum,
                      self._busnum, setup_flag, data_flag, ts // 1_000_000, ts % 1_000_000,
                      status, urb_len, len(iso) + len(data), setup, interval,
                      start_frame, xfer_flags, ndesc),
            iso, data, _PADS[pad], _TRAILER.pack(total))))


def _spread(data: bytes, packets: list[IsoPacket]) -> bytes:
    """Iso IN data as the device left it in the buffer: each packet at its offset
    (RET_SUBMIT sends the packets' actual bytes back to back; usbmon shows the
    buffer)."""
    end = max((p.offset + p.actual_length for p in packets), default=0)
    buf = bytearray(end)
    at = 0
    for p in packets:
        buf[p.offset:p.offset + p.actual_length] = data[at:at + p.actual_length]
        at += p.actual_length
    return bytes(buf)
