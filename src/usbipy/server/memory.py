"""Giving memory back to the system once a connection that held much of it is gone.

A client can make usbipyd hold up to its flow-control caps (tens of MiB of
OUT data, a TLS record buffer) before it is paused. Python frees those
objects when the connection ends, but glibc keeps freed heap pages mapped
(the dynamic mmap threshold moves large blocks onto the heap after the first
one is freed), so the process would stay that large. malloc_trim(3) hands
them back; it is glibc's, so elsewhere this does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
from collections.abc import Callable


def _malloc_trim() -> Callable[[int], int] | None:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        trim: Callable[[int], int] = libc.malloc_trim
    except (OSError, AttributeError):
        return None
    return trim


_TRIM = _malloc_trim()


def give_back() -> None:
    """Return the heap's free pages to the system (glibc's malloc_trim(0))."""
    if _TRIM is not None:
        _TRIM(0)
