"""libusb results as the errno values the kernel's usbip-host would send.

One table for transfer statuses (a URB's completion) and one for the error
codes of libusb's synchronous calls, so a client sees the same status from
a libusb export as from the kernel stub: -EPIPE for a stall, -ENODEV for a
device that is gone, and so on.
"""

from __future__ import annotations

import errno

# libusb_transfer_status
TRANSFER_COMPLETED = 0
TRANSFER_ERROR = 1
TRANSFER_TIMED_OUT = 2
TRANSFER_CANCELLED = 3
TRANSFER_STALL = 4
TRANSFER_NO_DEVICE = 5
TRANSFER_OVERFLOW = 6

TRANSFER_STATUS_ERRNO: dict[int, int] = {
    TRANSFER_COMPLETED: 0,
    TRANSFER_ERROR: -errno.EPROTO,       # what the HCD reports for a CRC/bitstuff error
    TRANSFER_TIMED_OUT: -errno.ETIMEDOUT,
    TRANSFER_CANCELLED: -errno.ECONNRESET,  # as usb_unlink_urb
    TRANSFER_STALL: -errno.EPIPE,
    TRANSFER_NO_DEVICE: -errno.ENODEV,
    TRANSFER_OVERFLOW: -errno.EOVERFLOW,  # babble
}

# enum libusb_error
LIBUSB_ERROR_NO_DEVICE = -4

LIBUSB_ERROR_ERRNO: dict[int, int] = {
    0: 0,
    -1: -errno.EIO,         # LIBUSB_ERROR_IO
    -2: -errno.EINVAL,      # INVALID_PARAM
    -3: -errno.EACCES,      # ACCESS
    -4: -errno.ENODEV,      # NO_DEVICE
    -5: -errno.ENOENT,      # NOT_FOUND
    -6: -errno.EBUSY,       # BUSY
    -7: -errno.ETIMEDOUT,   # TIMEOUT
    -8: -errno.EOVERFLOW,   # OVERFLOW
    -9: -errno.EPIPE,       # PIPE (a stall)
    -10: -errno.EINTR,      # INTERRUPTED
    -11: -errno.ENOMEM,     # NO_MEM
    -12: -errno.EOPNOTSUPP,  # NOT_SUPPORTED
    -99: -errno.EPROTO,     # OTHER
}


def transfer_errno(status: int) -> int:
    """The URB status for a libusb transfer status."""
    return TRANSFER_STATUS_ERRNO.get(status, -errno.EPROTO)


def error_errno(code: int) -> int:
    """The URB status for a libusb error code (a failed synchronous call)."""
    return LIBUSB_ERROR_ERRNO.get(code, -errno.EPROTO)
