"""URBs as Linux usbmon records, each in a pcapng enhanced packet block.

The record is the 64-byte ``pcap_usb_header_mmapped`` of libpcap (the binary
usbmon API of drivers/usb/mon/mon_bin.c), then the iso descriptors, then the
data: a submission ('S') carries OUT data and the SETUP packet, a completion
('C') the IN data and the status. Wireshark's USB dissectors then decode the
class traffic on top: HID reports, SCSI over the bulk-only transport, CDC.

A record is packed with the enhanced packet block's header (:mod:`.pcapng`
gives its fields and framing) in one ``struct.pack`` call: capture runs on
the server's hot path.
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
from .pcapng import BLOCK_TRAILER, EPB_HEAD_FIELDS, EPB_OVERHEAD, EPB_TYPE, PADS

#: pcap_usb_header_mmapped (64 bytes): id, event, transfer type, endpoint, device,
#: bus, setup flag, data flag, ts_sec, ts_usec, status, urb_len, data_len, setup
#: (or error_count and numdesc for iso), interval, start_frame, xfer_flags, ndesc.
USBMON_FIELDS: Final = "QBBBBHbbqiiII8siiII"
USBMON_SIZE: Final = 64
#: The enhanced packet block's head, then the usbmon header.
HEAD: Final = struct.Struct("<" + EPB_HEAD_FIELDS + USBMON_FIELDS)
#: One record's block trailer, then the next one's head: two records in two pack calls.
TRAILER_HEAD: Final = struct.Struct("<I" + EPB_HEAD_FIELDS + USBMON_FIELDS)
assert struct.calcsize("<" + USBMON_FIELDS) == USBMON_SIZE
_ISO_DESC: Final = struct.Struct("<iIII")
_ISO_REC: Final = struct.Struct("<ii")

EVENT_SUBMIT: Final = ord("S")
EVENT_COMPLETE: Final = ord("C")
#: usbmon's transfer types (mon_bin.c: xfer_to_pipe): iso 0, interrupt 1, control 2, bulk 3.
_USBMON_TYPE: Final = {TransferType.ISOCHRONOUS: 0, TransferType.INTERRUPT: 1,
                       TransferType.CONTROL: 2, TransferType.BULK: 3}
_NO_SETUP: Final = ord("-")
_DATA_IN_PENDING: Final = ord("<")  # an IN submission: its data comes with the completion
_DATA_OUT_DONE: Final = ord(">")  # an OUT completion: its data went with the submission
EINPROGRESS: Final = -115


_IN: Final = Direction.IN
_ZERO_SETUP: Final = bytes(8)
#: Iso descriptors a record keeps at most, as mon_bin.c (ISODESC_MAX).
ISODESC_MAX: Final = 128
#: Bytes of each URB's data a record keeps, unless told otherwise: whole commands,
#: reports, descriptors and short serial lines; a 64 KiB block's first 1 KiB.
SNAPLEN: Final = 1024


class UrbRecorder:
    """The records of one imported device's URBs, for one connection.

    ``emit`` takes each finished record (bytes of a whole pcapng block). The
    transfer type of an endpoint is learned from the configuration
    descriptors the client reads (it reads them before it uses an endpoint);
    until then, an endpoint with an interval is taken for an interrupt one.
    A record keeps ``snaplen`` bytes of the data at most (0: all of it); its
    usbmon header still gives the URB's whole length, as usbmon's does when
    its buffer is short (data_len below urb_len).

    Written for speed (it runs for every URB): the common records are packed
    inline, with one struct call each.
    """

    def __init__(self, emit: Callable[[bytes], None], busnum: int, devnum: int,
                 connection: int, snaplen: int = SNAPLEN) -> None:
        self._emit = emit
        self._busnum = busnum & 0xFFFF
        self._devnum = devnum & 0xFF
        self._id_base = (connection & 0xFFFFFFFF) << 32
        self._snaplen = snaplen or (1 << 62)
        #: endpoint address -> usbmon transfer type
        self._types: dict[int, int] = {}

    def submitted(self, urb: CmdSubmit) -> None:
        if urb.iso_packets is not None:
            self._iso(urb, EVENT_SUBMIT, EINPROGRESS, urb.transfer_buffer_length, b"",
                      urb.iso_packets, 0, urb.start_frame)
            return
        ep = urb.ep
        direction_in = urb.direction is _IN
        address = ep | 0x80 if direction_in else ep
        if ep == 0:
            kind, setup_flag, setup = 2, 0, urb.setup
        else:
            kind = self._types.get(address, 1 if urb.interval else 3)
            setup_flag, setup = _NO_SETUP, _ZERO_SETUP
        if direction_in:
            data, data_flag = b"", _DATA_IN_PENDING
        else:
            data = urb.data
            if len(data) > self._snaplen:
                data = data[:self._snaplen]
            data_flag = 0
        self._record(urb, EVENT_SUBMIT, kind, address, setup_flag, data_flag, EINPROGRESS,
                     urb.transfer_buffer_length, data, setup, urb.start_frame)

    def completed(self, urb: CmdSubmit, status: int, data: bytes, actual_length: int,
                  iso_packets: list[IsoPacket] | None = None, error_count: int = 0,
                  start_frame: int = 0) -> None:
        if iso_packets is not None or urb.iso_packets is not None:
            self._iso(urb, EVENT_COMPLETE, status, actual_length,
                      data if urb.direction is _IN else b"",
                      iso_packets if iso_packets is not None else urb.iso_packets or [],
                      error_count, start_frame)
            return
        ep = urb.ep
        direction_in = urb.direction is _IN
        address = ep | 0x80 if direction_in else ep
        if ep == 0:
            kind = 2
            if status == 0 and data and direction_in:
                self._learn(urb.setup, data)
        else:
            kind = self._types.get(address, 1 if urb.interval else 3)
        if direction_in:
            if len(data) > self._snaplen:
                data = data[:self._snaplen]
            data_flag = 0
        else:
            data = b""
            data_flag = _DATA_OUT_DONE
        self._record(urb, EVENT_COMPLETE, kind, address, _NO_SETUP, data_flag, status,
                     actual_length, data, _ZERO_SETUP, start_frame)

    def _record(self, urb: CmdSubmit, event: int, kind: int, address: int, setup_flag: int,
                data_flag: int, status: int, urb_len: int, data: bytes, setup: bytes,
                start_frame: int) -> None:
        """One non-isochronous record, in its enhanced packet block."""
        ts = time.time_ns() // 1000
        length = USBMON_SIZE + len(data)
        pad = -length & 3
        total = EPB_OVERHEAD + length + pad
        self._emit(b"".join((
            HEAD.pack(EPB_TYPE, total, 0, ts >> 32, ts & 0xFFFFFFFF, length, length,
                      self._id_base | urb.seqnum, event, kind, address, self._devnum,
                      self._busnum, setup_flag, data_flag, ts // 1_000_000, ts % 1_000_000,
                      status, urb_len, len(data), setup, urb.interval, start_frame,
                      urb.transfer_flags, 0),
            data, PADS[pad], BLOCK_TRAILER.pack(total))))

    def exchanged(self, urb: CmdSubmit, status: int, data: bytes, actual_length: int) -> None:
        """A URB the device finished at once: its submission and completion, as one
        write (half the packing of the two apart; most emulated URBs end so)."""
        if urb.iso_packets is not None:
            self.submitted(urb)
            self.completed(urb, status, data, actual_length)
            return
        ep = urb.ep
        direction_in = urb.direction is _IN
        address = ep | 0x80 if direction_in else ep
        snaplen = self._snaplen
        if ep == 0:
            kind, setup_flag, setup = 2, 0, urb.setup
            if status == 0 and data and direction_in:
                self._learn(urb.setup, data)
        else:
            kind = self._types.get(address, 1 if urb.interval else 3)
            setup_flag, setup = _NO_SETUP, _ZERO_SETUP
        if direction_in:
            out, out_flag = b"", _DATA_IN_PENDING
            back = data[:snaplen] if len(data) > snaplen else data
            back_flag = 0
        else:
            out = urb.data[:snaplen] if len(urb.data) > snaplen else urb.data
            out_flag = 0
            back, back_flag = b"", _DATA_OUT_DONE
        ts = time.time_ns() // 1000
        ts_high, ts_low, ts_sec, ts_usec = ts >> 32, ts & 0xFFFFFFFF, ts // 1_000_000, (
            ts % 1_000_000)
        urb_id = self._id_base | urb.seqnum
        s_length = USBMON_SIZE + len(out)
        s_pad = -s_length & 3
        s_total = EPB_OVERHEAD + s_length + s_pad
        c_length = USBMON_SIZE + len(back)
        c_pad = -c_length & 3
        c_total = EPB_OVERHEAD + c_length + c_pad
        self._emit(b"".join((
            HEAD.pack(EPB_TYPE, s_total, 0, ts_high, ts_low, s_length, s_length, urb_id,
                      EVENT_SUBMIT, kind, address, self._devnum, self._busnum, setup_flag,
                      out_flag, ts_sec, ts_usec, EINPROGRESS, urb.transfer_buffer_length,
                      len(out), setup, urb.interval, urb.start_frame, urb.transfer_flags, 0),
            out, PADS[s_pad],
            TRAILER_HEAD.pack(s_total, EPB_TYPE, c_total, 0, ts_high, ts_low, c_length, c_length,
                              urb_id, EVENT_COMPLETE, kind, address, self._devnum,
                              self._busnum, _NO_SETUP, back_flag, ts_sec, ts_usec, status,
                              actual_length, len(back), _ZERO_SETUP, urb.interval, 0,
                              urb.transfer_flags, 0),
            back, PADS[c_pad], BLOCK_TRAILER.pack(c_total))))

    def _iso(self, urb: CmdSubmit, event: int, status: int, urb_len: int, data: bytes,
             packets: list[IsoPacket], error_count: int, start_frame: int) -> None:
        direction_in = urb.direction is _IN
        address = urb.ep | 0x80 if direction_in else urb.ep
        packets = packets[:ISODESC_MAX]
        if event == EVENT_SUBMIT:
            descs = b"".join(_ISO_DESC.pack(p.status, p.offset, p.length, 0) for p in packets)
            if not direction_in:
                data = urb.data
        else:
            descs = b"".join(_ISO_DESC.pack(p.status, p.offset, p.actual_length, 0)
                             for p in packets)
            if data:
                data = _spread(data, packets)
        if len(data) > self._snaplen:
            data = data[:self._snaplen]
        data_flag = (_DATA_IN_PENDING if direction_in and event == EVENT_SUBMIT else
                     _DATA_OUT_DONE if not direction_in and event == EVENT_COMPLETE else 0)
        ts = time.time_ns() // 1000
        length = USBMON_SIZE + len(descs) + len(data)
        pad = -length & 3
        total = EPB_OVERHEAD + length + pad
        self._emit(b"".join((
            HEAD.pack(EPB_TYPE, total, 0, ts >> 32, ts & 0xFFFFFFFF, length, length,
                      self._id_base | urb.seqnum, event, 0, address, self._devnum,
                      self._busnum, _NO_SETUP, data_flag, ts // 1_000_000, ts % 1_000_000,
                      status, urb_len, len(descs) + len(data),
                      _ISO_REC.pack(error_count, len(packets)), urb.interval, start_frame,
                      urb.transfer_flags, len(packets)),
            descs, data, PADS[pad], BLOCK_TRAILER.pack(total))))

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
