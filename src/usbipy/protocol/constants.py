"""Wire constants of USB/IP 1.1.1 (Documentation/usb/usbip_protocol.rst)."""

from __future__ import annotations

from enum import IntEnum
from typing import Final

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
    #: usbipy's own: carry on a resumable attachment over a new connection
    #: (:mod:`usbipy.protocol.resume`). Only sent to a server that granted it.
    REQ_RESUME = 0x80F1
    REP_RESUME = 0x00F1


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


#: Linux's errno numbers (include/uapi/asm-generic/errno*.h), by name: the
#: statuses RET_SUBMIT and RET_UNLINK carry are these, negated, whatever OS
#: either end runs (Python's errno module gives the host's, which differ on
#: macOS and Windows).
LINUX_ERRNO: Final = {
    "EPERM": 1, "ENOENT": 2, "EINTR": 4, "EIO": 5, "ENXIO": 6, "E2BIG": 7, "EAGAIN": 11,
    "ENOMEM": 12, "EFAULT": 14, "EBUSY": 16, "EXDEV": 18, "ENODEV": 19, "EINVAL": 22,
    "EFBIG": 27, "ENOSPC": 28, "EPIPE": 32, "EDOM": 33, "ERANGE": 34, "ENOSR": 63,
    "ETIME": 62, "ENOLINK": 67, "ECOMM": 70, "EPROTO": 71, "EOVERFLOW": 75, "EILSEQ": 84,
    "EMSGSIZE": 90, "EOPNOTSUPP": 95, "ECONNRESET": 104, "ESHUTDOWN": 108,
    "ETIMEDOUT": 110, "EHOSTUNREACH": 113, "EALREADY": 114, "EINPROGRESS": 115,
    "EREMOTEIO": 121,
}
#: Linux errno number -> its name ("EPIPE" for 32).
LINUX_ERRNO_NAME: Final = {number: name for name, number in LINUX_ERRNO.items()}

# RET_SUBMIT / RET_UNLINK statuses are negative Linux errno values.
ECONNRESET = -LINUX_ERRNO["ECONNRESET"]  # URB unlinked
EPIPE = -LINUX_ERRNO["EPIPE"]  # endpoint stalled
ENODEV = -LINUX_ERRNO["ENODEV"]  # device gone
ENOENT = -LINUX_ERRNO["ENOENT"]
EOVERFLOW = -LINUX_ERRNO["EOVERFLOW"]  # babble: device sent more than asked
EINVAL = -LINUX_ERRNO["EINVAL"]
ENOMEM = -LINUX_ERRNO["ENOMEM"]
ESHUTDOWN = -LINUX_ERRNO["ESHUTDOWN"]
EPROTO = -LINUX_ERRNO["EPROTO"]
ETIME = -LINUX_ERRNO["ETIME"]
EREMOTEIO = -LINUX_ERRNO["EREMOTEIO"]  # short read with URB_SHORT_NOT_OK (usb/urb.py)
EXDEV = -LINUX_ERRNO["EXDEV"]  # iso: partially completed
EFBIG = -LINUX_ERRNO["EFBIG"]  # iso: a URB too far ahead of the schedule
EMSGSIZE = -LINUX_ERRNO["EMSGSIZE"]  # a packet above the endpoint's size
