"""usbipyd's heap: kept while it serves, given back once a connection that held
much of it is gone.

While serving, several replies' buffers are often alive at once and freed
together: a resumable attachment keeps each reply until the client acknowledges
it, and a client that reads slower than the device answers leaves replies in
the transport's buffer. Freed together, they put the heap's free top above
glibc's trim threshold (128 KiB by default), and glibc hands it back to the
system, only to fault it in again, zeroed, for the next replies: a page fault
per 64 KiB reply (measured: 15,000 in 8 s of a resumable disk read, half of
what resumption cost the server). :func:`keep_heap` raises the threshold.

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


#: mallopt(3)'s parameters (glibc's malloc.h), and the values usbipyd serves with:
#: free memory at the top of each heap (glibc's arenas: the loop's, and one per busy
#: worker thread) kept for the next allocations, and the size from which an
#: allocation is a mapping of its own, returned whole when freed. (Setting the first
#: turns glibc's dynamic mmap threshold off: the second is set with it, above a
#: resumable stream's largest frame, 1 MiB, and a 64 KiB reply with its header.)
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
TRIM_THRESHOLD = 16 << 20
MMAP_THRESHOLD = 2 << 20


def _libc(name: str) -> Callable[..., int] | None:
    try:
        function: Callable[..., int] = getattr(ctypes.CDLL(None), name)
    except (OSError, AttributeError):
        return None
    return function


_TRIM = _libc("malloc_trim")
_MALLOPT = _libc("mallopt")


def keep_heap() -> bool:
    """Keep up to TRIM_THRESHOLD bytes of freed heap (per arena) for the next
    replies, rather than returning them to the system at once (glibc; elsewhere
    nothing). What a client held while usbipyd stopped reading it still goes back
    with :func:`give_back` when it ends. True if it was set."""
    if _MALLOPT is None:
        return False
    return bool(_MALLOPT(M_MMAP_THRESHOLD, MMAP_THRESHOLD)
                and _MALLOPT(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
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
