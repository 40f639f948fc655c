"""Wire constants of USB/IP 1.1.1 (Documentation/usb/usbip_protocol.rst)."""

from __future__ import annotations

import errno
from enum import IntEnum

USBIP_VERSION = 0x0111

#: The TCP port IANA assigned to USB/IP, where usbipd listens.
USBIP_PORT = 3240

#: The kernel's USBIP_MAX_ISO_PACKETS: more than this in one URB is refused.
MAX_ISO_PACKETS = 1024

#: number_of_packets of a non-isochronous URB, as the protocol document asks.
#: Linux's vhci sends 0; both are accepted.
NON_ISO_PACKETS = 0xFFFFFFFF

BUSID_SIZE = 32
PATH_SIZE = 256


class OpCode(IntEnum):
    """Command codes of the OP (handshake) phase."""

    REQ_DEVLIST = 0x8005
    REP_DEVLIST = 0x0005
    REQ_IMPORT = 0x8003
    REP_IMPORT = 0x0003


class OpStatus(IntEnum):
    """OP_REP_* status, as usbipd's ST_* values (tools/usb/usbip/src/usbip_network.h)."""

    OK = 0x00
    NA = 0x01  # device requested for import is not available
    DEV_BUSY = 0x02  # already imported by another client
    DEV_ERR = 0x03  # device in error state
    NODEV = 0x04  # no such busid
    ERROR = 0x05  # unexpected response / other error


class UrbCommand(IntEnum):
    """``command`` of usbip_header_basic."""

    CMD_SUBMIT = 0x00000001
    CMD_UNLINK = 0x00000002
    RET_SUBMIT = 0x00000003
    RET_UNLINK = 0x00000004


class Direction(IntEnum):
    OUT = 0
    IN = 1


class Speed(IntEnum):
    """enum usb_device_speed (include/uapi/linux/usb/ch9.h)."""

    UNKNOWN = 0
    LOW = 1
    FULL = 2
    HIGH = 3
    WIRELESS = 4
    SUPER = 5
    SUPER_PLUS = 6


# RET_SUBMIT / RET_UNLINK statuses are negative Linux errno values.
ECONNRESET = -errno.ECONNRESET  # URB unlinked
EPIPE = -errno.EPIPE  # endpoint stalled
ENODEV = -errno.ENODEV  # device gone
ENOENT = -errno.ENOENT
EOVERFLOW = -errno.EOVERFLOW  # babble: device sent more than asked
EINVAL = -errno.EINVAL
ENOMEM = -errno.ENOMEM
ESHUTDOWN = -errno.ESHUTDOWN
EPROTO = -errno.EPROTO
ETIME = -errno.ETIME
EREMOTEIO = -errno.EREMOTEIO  # short read with URB_SHORT_NOT_OK (usb/urb.py)
EXDEV = -errno.EXDEV  # iso: partially completed
