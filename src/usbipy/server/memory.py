"""Giving memory back to the system once a connection that held much of it is gone.

A client can make usbipyd hold up to its flow-control caps (tens of MiB of
OUT data, a TLS record buffer) before it is paused. Python frees those
objects when the connection ends, but glibc keeps freed heap pages mapped
(the dynamic mmap threshold moves large blocks onto the heap after the first
one is freed), so the process would stay that large. malloc_trim(3) hands
them back; it is glibc's, so elsewhere this does nothing. It walks the heap
(tens of milliseconds on a large one), so it runs on a thread of its own,
half a second after it is asked for and at most once a second: a client that
reaches its caps again and again does not make it a load.
"""

from __future__ import annotations

import ctypes
import threading
import time
from collections.abc import Callable

#: Seconds between two trims at least.
MIN_INTERVAL = 1.0
#: Seconds a trim waits after it is asked for: the connection's last objects (its
#: transport's buffers, its codec) are freed by the loop after it is done.
DELAY = 0.5


def _malloc_trim() -> Callable[[int], int] | None:
    try:
        trim: Callable[[int], int] = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return None
    return trim


_TRIM = _malloc_trim()
_lock = threading.Lock()
_last = -MIN_INTERVAL
_pending = False


def give_back() -> None:
    """Return the heap's free pages to the system (glibc's malloc_trim(0)), soon, on
    a thread; a call while one is due, or within MIN_INTERVAL of the last, is
    folded into it."""
    global _pending
    if _TRIM is None:
        return
    with _lock:
        if _pending:
            return
        _pending = True
    threading.Thread(target=_trim, name="usbipy-trim", daemon=True).start()


def _trim() -> None:
    global _last, _pending
    assert _TRIM is not None
    time.sleep(max(DELAY, _last + MIN_INTERVAL - time.monotonic()))
    with _lock:
        _pending = False
    _TRIM(0)
    _last = time.monotonic()
