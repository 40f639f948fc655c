"""Control requests (USB 2.0 section 9.3 and 9.4): the SETUP packet and its codes."""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Final

#: The 8-byte SETUP packet, little-endian on the bus and inside USB/IP's CMD_SUBMIT.
SETUP: Final = struct.Struct("<BBHHH")

# bRequest codes of the standard requests (USB 2.0 table 9-4)
GET_STATUS: Final = 0x00
CLEAR_FEATURE: Final = 0x01
SET_FEATURE: Final = 0x03
SET_ADDRESS: Final = 0x05
GET_DESCRIPTOR: Final = 0x06
SET_DESCRIPTOR: Final = 0x07
GET_CONFIGURATION: Final = 0x08
SET_CONFIGURATION: Final = 0x09
GET_INTERFACE: Final = 0x0A
SET_INTERFACE: Final = 0x0B

# Feature selectors (USB 2.0 table 9-6)
ENDPOINT_HALT: Final = 0
DEVICE_REMOTE_WAKEUP: Final = 1
#: A hub class feature (USB 2.0 table 11-17); usbip-host turns the hub's
#: SET_FEATURE(PORT_RESET) into a reset of the exported device (stub_rx.c).
PORT_RESET: Final = 4

# bmRequestType fields (USB 2.0 table 9-2)
DIR_IN: Final = 0x80
TYPE_MASK: Final = 0x60
TYPE_STANDARD: Final = 0x00
TYPE_CLASS: Final = 0x20
TYPE_VENDOR: Final = 0x40
RECIPIENT_MASK: Final = 0x1F
RECIPIENT_DEVICE: Final = 0
RECIPIENT_INTERFACE: Final = 1
RECIPIENT_ENDPOINT: Final = 2
RECIPIENT_OTHER: Final = 3

#: bmRequestType of a hub's port request (class, other), as vhci-hcd's root hub sees it.
PORT_REQUEST_TYPE: Final = TYPE_CLASS | RECIPIENT_OTHER


@dataclass(frozen=True, slots=True)
class Setup:
    """The SETUP packet of a control transfer."""

    bmRequestType: int
    bRequest: int
    wValue: int
    wIndex: int
    wLength: int

    @classmethod
    def parse(cls, raw: bytes) -> Setup:
        return cls(*SETUP.unpack(raw))

    def pack(self) -> bytes:
        return SETUP.pack(
            self.bmRequestType, self.bRequest, self.wValue, self.wIndex, self.wLength
        )

    @property
    def is_in(self) -> bool:
        return bool(self.bmRequestType & DIR_IN)

    @property
    def type(self) -> int:
        return self.bmRequestType & TYPE_MASK

    @property
    def recipient(self) -> int:
        return self.bmRequestType & RECIPIENT_MASK

    @property
    def descriptor_type(self) -> int:
        """GET_DESCRIPTOR: the descriptor type in wValue's high byte."""
        return self.wValue >> 8

    @property
    def descriptor_index(self) -> int:
        """GET_DESCRIPTOR: the descriptor index in wValue's low byte."""
        return self.wValue & 0xFF
