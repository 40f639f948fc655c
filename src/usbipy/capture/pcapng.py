"""pcapng blocks (draft-ietf-opsawg-pcapng): the section header, one interface, packets.

Little-endian throughout (the section header's byte-order magic says so), and
so is the usbmon header inside each packet: a LINKTYPE_USB_LINUX_MMAPPED
record is in the byte order of the file that holds it.
"""

from __future__ import annotations

import struct
from typing import Final

SHB_TYPE: Final = 0x0A0D0D0A
IDB_TYPE: Final = 0x00000001
EPB_TYPE: Final = 0x00000006
BYTE_ORDER_MAGIC: Final = 0x1A2B3C4D
#: LINKTYPE_USB_LINUX_MMAPPED: the 64-byte usbmon header, then the data (what
#: dumpcap writes for usbmonN, and usbipd-win for its captures).
LINKTYPE_USB_LINUX_MMAPPED: Final = 220

_OPTION = struct.Struct("<HH")
OPT_ENDOFOPT: Final = 0
OPT_SHB_USERAPPL: Final = 4
OPT_IF_NAME: Final = 2
OPT_IF_DESCRIPTION: Final = 3
OPT_IF_TSRESOL: Final = 9

#: block type, block total length, interface id, timestamp (high, low), captured
#: length, original length: what comes before an enhanced packet's data (its
#: fields, for a caller that packs its packet's own header in the same call).
EPB_HEAD_FIELDS: Final = "IIIIIII"
EPB_HEAD: Final = struct.Struct("<" + EPB_HEAD_FIELDS)
#: What starts every block: its type and total length.
BLOCK_HEAD: Final = struct.Struct("<II")
#: What ends every block: its total length again.
BLOCK_TRAILER: Final = struct.Struct("<I")
#: An enhanced packet block's bytes besides its packet and padding.
EPB_OVERHEAD: Final = EPB_HEAD.size + BLOCK_TRAILER.size
#: Padding to 4 bytes, by how many are missing (-length & 3).
PADS: Final = (b"", b"\0", b"\0\0", b"\0\0\0")


def _options(*options: tuple[int, bytes]) -> bytes:
    out = bytearray()
    for code, value in options:
        out += _OPTION.pack(code, len(value)) + value + bytes(-len(value) % 4)
    out += _OPTION.pack(OPT_ENDOFOPT, 0)
    return bytes(out)


def _block(block_type: int, body: bytes) -> bytes:
    total = BLOCK_HEAD.size + len(body) + BLOCK_TRAILER.size
    return BLOCK_HEAD.pack(block_type, total) + body + BLOCK_TRAILER.pack(total)


def section_header(application: str) -> bytes:
    """The SHB: version 1.0, section length unknown (-1)."""
    body = struct.pack("<IHHq", BYTE_ORDER_MAGIC, 1, 0, -1) + _options(
        (OPT_SHB_USERAPPL, application.encode()))
    return _block(SHB_TYPE, body)


def interface_description(link_type: int, name: str, description: str) -> bytes:
    """An IDB with microsecond timestamps (if_tsresol 6, also the default)."""
    body = struct.pack("<HHI", link_type, 0, 0) + _options(
        (OPT_IF_NAME, name.encode()), (OPT_IF_DESCRIPTION, description.encode()),
        (OPT_IF_TSRESOL, bytes((6,))))
    return _block(IDB_TYPE, body)


def enhanced_packet(packet: bytes, timestamp_us: int, interface: int = 0) -> bytes:
    """An EPB carrying ``packet`` whole (no snap length)."""
    n = len(packet)
    pad = -n & 3
    total = EPB_OVERHEAD + n + pad
    return b"".join((EPB_HEAD.pack(EPB_TYPE, total, interface, timestamp_us >> 32,
                                   timestamp_us & 0xFFFFFFFF, n, n),
                     packet, PADS[pad], BLOCK_TRAILER.pack(total)))
