"""USB Video Class 1.1: codes, class-specific descriptors, probe/commit controls
and payload headers.

Section numbers are those of "USB Device Class Definition for Video Devices",
revision 1.1 (UVC 1.1), and of its payload companions for uncompressed video
and MJPEG. Linux reads these in drivers/media/usb/uvc/ (uvc_driver.c parses
the descriptors, uvc_video.c the controls and payloads).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Final

# Interface class, subclasses (A.1 to A.3)
CC_VIDEO: Final = 0x0E
SC_VIDEOCONTROL: Final = 0x01
SC_VIDEOSTREAMING: Final = 0x02
SC_VIDEO_INTERFACE_COLLECTION: Final = 0x03

CS_INTERFACE: Final = 0x24

# VideoControl descriptor subtypes (A.5)
VC_HEADER: Final = 0x01
VC_INPUT_TERMINAL: Final = 0x02
VC_OUTPUT_TERMINAL: Final = 0x03
VC_PROCESSING_UNIT: Final = 0x05

# VideoStreaming descriptor subtypes (A.6)
VS_INPUT_HEADER: Final = 0x01
VS_FORMAT_UNCOMPRESSED: Final = 0x04
VS_FRAME_UNCOMPRESSED: Final = 0x05
VS_FORMAT_MJPEG: Final = 0x06
VS_FRAME_MJPEG: Final = 0x07
VS_COLORFORMAT: Final = 0x0D

# Terminal types (B.1, B.2)
TT_STREAMING: Final = 0x0101
ITT_CAMERA: Final = 0x0201

# Requests (A.8)
SET_CUR: Final = 0x01
GET_CUR: Final = 0x81
GET_MIN: Final = 0x82
GET_MAX: Final = 0x83
GET_RES: Final = 0x84
GET_LEN: Final = 0x85
GET_INFO: Final = 0x86
GET_DEF: Final = 0x87

# VideoStreaming interface controls (A.9.7)
VS_PROBE_CONTROL: Final = 0x01
VS_COMMIT_CONTROL: Final = 0x02

# Payload header bmHeaderInfo bits (2.4.3.3)
FID: Final = 0x01
EOF: Final = 0x02
PTS: Final = 0x04
SCR: Final = 0x08
EOH: Final = 0x80

#: The uncompressed payload's YUY2 format GUID (Uncompressed Payload 2.2).
GUID_YUY2: Final = bytes.fromhex("5955593200001000800000aa00389b71")

#: The payload header usbipy writes: bHeaderLength, bmHeaderInfo, dwPTS, and the
#: SCR's 32-bit source clock and 11-bit SOF counter (2.4.3.3).
PAYLOAD_HEADER: Final = struct.Struct("<BBIIH")


def vc_header(total_length: int, clock_frequency: int, streaming: tuple[int, ...]) -> bytes:
    """The VideoControl interface header (3.7.2)."""
    n = len(streaming)
    return struct.pack(f"<BBBHHIB{n}B", 12 + n, CS_INTERFACE, VC_HEADER, 0x0110, total_length,
                       clock_frequency, n, *streaming)


def camera_terminal(terminal_id: int) -> bytes:
    """A camera input terminal (3.7.2.3) with no controls."""
    return struct.pack("<BBBBHBBHHHB3s", 18, CS_INTERFACE, VC_INPUT_TERMINAL, terminal_id,
                       ITT_CAMERA, 0, 0, 0, 0, 0, 3, bytes(3))


def processing_unit(unit_id: int, source_id: int) -> bytes:
    """A processing unit (3.7.2.5) with no controls; UVC 1.1 adds bmVideoStandards."""
    return struct.pack("<BBBBBHB2sBB", 12, CS_INTERFACE, VC_PROCESSING_UNIT, unit_id,
                       source_id, 0, 2, bytes(2), 0, 0)


def output_terminal(terminal_id: int, source_id: int) -> bytes:
    """A USB streaming output terminal (3.7.2.2)."""
    return struct.pack("<BBBBHBBB", 9, CS_INTERFACE, VC_OUTPUT_TERMINAL, terminal_id,
                       TT_STREAMING, 0, source_id, 0)


def vs_input_header(formats: int, total_length: int, endpoint: int, terminal: int) -> bytes:
    """The VideoStreaming input header (3.9.2.1): one control byte per format, none set."""
    return struct.pack(f"<BBBBHBBBBBBB{formats}s", 13 + formats, CS_INTERFACE,
                       VS_INPUT_HEADER, formats, total_length, endpoint, 0, terminal, 0, 0, 0,
                       1, bytes(formats))


def format_uncompressed(index: int, frames: int, guid: bytes, bits_per_pixel: int) -> bytes:
    """An uncompressed video format (Uncompressed Payload 3.1.1)."""
    return struct.pack("<BBBBB16sBBBBBB", 27, CS_INTERFACE, VS_FORMAT_UNCOMPRESSED, index,
                       frames, guid, bits_per_pixel, 1, 0, 0, 0, 0)


def format_mjpeg(index: int, frames: int) -> bytes:
    """An MJPEG video format (MJPEG Payload 3.1.1)."""
    return struct.pack("<BBBBBBBBBBB", 11, CS_INTERFACE, VS_FORMAT_MJPEG, index, frames, 0, 1,
                       0, 0, 0, 0)


def frame(subtype: int, index: int, width: int, height: int, max_frame_size: int,
          intervals: tuple[int, ...]) -> bytes:
    """A frame descriptor (Uncompressed and MJPEG Payload 3.1.2) with discrete
    intervals in 100 ns units, the first the default."""
    n = len(intervals)
    fps = [10_000_000 // i for i in intervals]
    top = 0xFFFF_FFFF  # (a 32-bit field: 4K at 60 frames a second is above it)
    return struct.pack(f"<BBBBBHHIIIIB{n}I", 26 + 4 * n, CS_INTERFACE, subtype, index, 0,
                       width, height, min(top, max_frame_size * 8 * min(fps)),
                       min(top, max_frame_size * 8 * max(fps)), max_frame_size, intervals[0],
                       n, *intervals)


def color_matching() -> bytes:
    """The color matching descriptor (3.9.2.6): BT.709 primaries, SMPTE 170M matrix."""
    return struct.pack("<BBBBBB", 6, CS_INTERFACE, VS_COLORFORMAT, 1, 1, 4)


@dataclass(slots=True)
class StreamingControl:
    """The probe and commit controls' fields (4.3.1.1), 34 bytes in UVC 1.1."""

    bmHint: int = 0
    bFormatIndex: int = 0
    bFrameIndex: int = 0
    dwFrameInterval: int = 0
    wKeyFrameRate: int = 0
    wPFrameRate: int = 0
    wCompQuality: int = 0
    wCompWindowSize: int = 0
    wDelay: int = 0
    dwMaxVideoFrameSize: int = 0
    dwMaxPayloadTransferSize: int = 0
    dwClockFrequency: int = 0
    bmFramingInfo: int = 0
    bPreferedVersion: int = 0
    bMinVersion: int = 0
    bMaxVersion: int = 0

    STRUCT = struct.Struct("<HBBIHHHHHIIIBBBB")

    def pack(self) -> bytes:
        return self.STRUCT.pack(
            self.bmHint, self.bFormatIndex, self.bFrameIndex, self.dwFrameInterval,
            self.wKeyFrameRate, self.wPFrameRate, self.wCompQuality, self.wCompWindowSize,
            self.wDelay, self.dwMaxVideoFrameSize, self.dwMaxPayloadTransferSize,
            self.dwClockFrequency, self.bmFramingInfo, self.bPreferedVersion, self.bMinVersion,
            self.bMaxVersion)

    @classmethod
    def unpack(cls, data: bytes) -> StreamingControl:
        """From a SET_CUR's data; a UVC 1.0 host sends the first 26 bytes only."""
        return cls(*cls.STRUCT.unpack(data[:34].ljust(34, b"\0")))
