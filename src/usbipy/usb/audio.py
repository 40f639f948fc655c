"""USB Audio Class 1.0: codes and class-specific descriptors.

Section numbers are those of "Universal Serial Bus Device Class Definition for
Audio Devices", release 1.0 (audio10.pdf), and of its "Audio Data Formats"
companion (frmts10.pdf). Linux reads these in sound/usb/ (stream.c, mixer.c).
"""

from __future__ import annotations

import struct
from typing import Final

# Interface class, subclasses (A.1, A.2)
AUDIO: Final = 0x01
AUDIOCONTROL: Final = 0x01
AUDIOSTREAMING: Final = 0x02

# Class-specific descriptor types (A.4)
CS_INTERFACE: Final = 0x24
CS_ENDPOINT: Final = 0x25

# AudioControl interface descriptor subtypes (A.5)
HEADER: Final = 0x01
INPUT_TERMINAL: Final = 0x02
OUTPUT_TERMINAL: Final = 0x03
FEATURE_UNIT: Final = 0x06

# AudioStreaming interface descriptor subtypes (A.6), endpoint subtype (A.8)
AS_GENERAL: Final = 0x01
FORMAT_TYPE: Final = 0x02
EP_GENERAL: Final = 0x01

# Terminal types (USB Audio Terminal Types 1.0, 2.1 to 2.3)
TT_USB_STREAMING: Final = 0x0101
TT_MICROPHONE: Final = 0x0201
TT_SPEAKER: Final = 0x0301

# Requests (A.9)
SET_CUR: Final = 0x01
GET_CUR: Final = 0x81
SET_MIN: Final = 0x02
GET_MIN: Final = 0x82
SET_MAX: Final = 0x03
GET_MAX: Final = 0x83
SET_RES: Final = 0x04
GET_RES: Final = 0x84

# Feature unit control selectors (A.10.2) and their bmaControls bits (4.3.2.5)
MUTE_CONTROL: Final = 0x01
VOLUME_CONTROL: Final = 0x02
FU_MUTE: Final = 0x01
FU_VOLUME: Final = 0x02

# Endpoint control selector (A.10.3); CS endpoint bmAttributes bit (4.6.1.2)
SAMPLING_FREQ_CONTROL: Final = 0x01
EP_SAMPLING_FREQ: Final = 0x01

# Format tag (Audio Data Formats A.1.1), format type (A.1.2)
WAVE_FORMAT_PCM: Final = 0x0001
FORMAT_TYPE_I: Final = 0x01

# Isochronous endpoint synchronisation types (USB 2.0 table 9-13, bits 3..2)
ISO_ASYNC: Final = 0x05
ISO_ADAPTIVE: Final = 0x09

#: Volume is a signed 16-bit number of 1/256 dB (5.2.2.4.3.2); 0x8000 is silence.
VOLUME_SILENCE: Final = -0x8000


def ac_header(total_length: int, streaming_interfaces: tuple[int, ...]) -> bytes:
    """The AudioControl header (4.3.2): wTotalLength counts it and every unit and
    terminal after it."""
    n = len(streaming_interfaces)
    return struct.pack(f"<BBBHHB{n}B", 8 + n, CS_INTERFACE, HEADER, 0x0100, total_length,
                       n, *streaming_interfaces)


def input_terminal(terminal_id: int, terminal_type: int, channels: int,
                   channel_config: int) -> bytes:
    """An input terminal (4.3.2.1)."""
    return struct.pack("<BBBBHBBHBB", 12, CS_INTERFACE, INPUT_TERMINAL, terminal_id,
                       terminal_type, 0, channels, channel_config, 0, 0)


def output_terminal(terminal_id: int, terminal_type: int, source_id: int) -> bytes:
    """An output terminal (4.3.2.2)."""
    return struct.pack("<BBBBHBBB", 9, CS_INTERFACE, OUTPUT_TERMINAL, terminal_id,
                       terminal_type, 0, source_id, 0)


def feature_unit(unit_id: int, source_id: int, master: int, channels: int) -> bytes:
    """A feature unit (4.3.2.5) with ``master`` controls and none per channel."""
    controls = bytes((master,)) + bytes(channels)
    return (struct.pack("<BBBBBB", 7 + len(controls), CS_INTERFACE, FEATURE_UNIT, unit_id,
                        source_id, 1) + controls + b"\0")


def as_general(terminal_link: int) -> bytes:
    """The class-specific AudioStreaming interface descriptor (4.5.2): PCM."""
    return struct.pack("<BBBBBH", 7, CS_INTERFACE, AS_GENERAL, terminal_link, 1,
                       WAVE_FORMAT_PCM)


def format_type_i(channels: int, sample_bytes: int, rates: tuple[int, ...]) -> bytes:
    """A Type I format descriptor (Audio Data Formats 2.2.5) with discrete rates."""
    head = struct.pack("<BBBBBBBB", 8 + 3 * len(rates), CS_INTERFACE, FORMAT_TYPE,
                       FORMAT_TYPE_I, channels, sample_bytes, 8 * sample_bytes, len(rates))
    return head + b"".join(rate.to_bytes(3, "little") for rate in rates)


def cs_endpoint(attributes: int) -> bytes:
    """The class-specific isochronous endpoint descriptor (4.6.1.2)."""
    return struct.pack("<BBBBBH", 7, CS_ENDPOINT, EP_GENERAL, attributes, 0, 0)
