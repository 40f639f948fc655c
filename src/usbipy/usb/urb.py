"""URB transfer_flags as Linux defines them (include/linux/usb.h).

USB/IP carries them unchanged in CMD_SUBMIT; usbip-host masks them and
passes them to usb_submit_urb (stub_rx.c, masking_bogus_flags).
"""

from __future__ import annotations

from enum import IntFlag


class UrbFlag(IntFlag):
    SHORT_NOT_OK = 0x0001  # a short IN is an error: -EREMOTEIO
    ISO_ASAP = 0x0002  # isochronous: start at the next possible frame
    NO_TRANSFER_DMA_MAP = 0x0004
    ZERO_PACKET = 0x0040  # OUT: end with a zero-length packet when the last one is full
    NO_INTERRUPT = 0x0080
    FREE_BUFFER = 0x0100
    DIR_IN = 0x0200
