"""The capture file: records queued on the event loop, written by a thread, rotated.

The server never waits for the disk: :meth:`Capture.emit` appends to a deque
(atomic, no lock) and returns; a thread writes what is queued every 50 ms,
many records per writev(), so the file can be read while it grows (``tshark
-r``, ``tail -f | wireshark -k -i -``). What waits in memory is bounded: past
``max_queued`` records (each at most the snap length and a header), records
are dropped and counted, never the server slowed.

A file that reaches ``max_bytes`` is closed and a new one begun, keeping
``files`` in all, as dumpcap's ring buffer does: FILE.pcapng is the newest,
FILE.1.pcapng the one before, and so on. Each begins with its own section
header, so each opens on its own.
"""

from __future__ import annotations

import collections
import logging
import os
import threading
from pathlib import Path

from .. import __version__
from ..escape import printable
from .pcapng import LINKTYPE_USB_LINUX_MMAPPED, interface_description, section_header
from .usbmon import UrbRecorder

log = logging.getLogger("usbipy.capture")

#: Defaults: 100 MB per file, 5 files (FILE.pcapng and FILE.1 to FILE.4).
MAX_BYTES = 100_000_000
FILES = 5
#: Records waiting for the writer thread before new ones are dropped (about 40 MB
#: at most with the default snap length).
MAX_QUEUED = 32768
#: How often the writer looks for records when it was not woken (seconds).
POLL = 0.05
#: Records per writev() (below IOV_MAX, 1024 on Linux).
BATCH = 512


def _write_all(fd: int, parts: list[bytes]) -> None:
    written = os.writev(fd, parts)
    total = sum(len(p) for p in parts)
    if written < total:  # (a short write: rare on a file, but not impossible)
        rest = b"".join(parts)[written:]
        while rest:
            rest = rest[os.write(fd, rest):]


def rotated_name(path: Path, index: int) -> Path:
    """FILE.pcapng for 0, FILE.1.pcapng, FILE.2.pcapng... (the suffix kept last)."""
    if index == 0:
        return path
    return path.with_name(f"{path.stem}.{index}{path.suffix}")


class Capture:
    """One capture file for the whole server (every connection's records)."""

    def __init__(self, path: str | os.PathLike[str], *, max_bytes: int = MAX_BYTES,
                 files: int = FILES, max_queued: int = MAX_QUEUED) -> None:
        if max_bytes < 4096:
            raise ValueError("a capture file needs room for at least 4096 bytes")
        if not 1 <= files <= 1000:
            raise ValueError("files must be 1 to 1000")
        self.path = Path(path)
        self.max_bytes = max_bytes
        self.files = files
        self.max_queued = max_queued
        self._header = section_header(f"usbipy {__version__}") + interface_description(
            LINKTYPE_USB_LINUX_MMAPPED, "usbipy", "URBs of the devices usbipyd serves")
        self._queue: collections.deque[bytes] = collections.deque()
        #: Records dropped because the writer fell behind.
        self.dropped = 0
        self._connections = 0
        self._wake = threading.Event()
        self._stopping = False
        self._fd = self._open_new()  # (here: a bad path fails at start-up)
        self._size = len(self._header)
        self._thread = threading.Thread(target=self._run, name="usbipy-capture", daemon=True)
        self._thread.start()

    def recorder(self, busnum: int, devnum: int) -> UrbRecorder:
        """A recorder for one connection's imported device."""
        self._connections += 1
        return UrbRecorder(self.emit, busnum, devnum, self._connections)

    def emit(self, record: bytes) -> None:
        """Queue one record (a whole pcapng block); from the event loop's thread."""
        if len(self._queue) < self.max_queued:
            self._queue.append(record)
            return
        self.dropped += 1
        if self.dropped == 1 or self.dropped % 10000 == 0:
            log.warning("capture %s: the disk is behind, %d records dropped so far",
                        printable(str(self.path)), self.dropped)

    # --- the writer thread ---------------------------------------------------------

    def _open_new(self) -> int:
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        try:
            _write_all(fd, [self._header])
        except BaseException:
            os.close(fd)
            raise
        return fd

    def _rotate(self) -> None:
        os.close(self._fd)
        oldest = rotated_name(self.path, self.files - 1)
        if self.files > 1:
            oldest.unlink(missing_ok=True)
            for index in range(self.files - 2, -1, -1):
                source = rotated_name(self.path, index)
                if source.exists():
                    source.rename(rotated_name(self.path, index + 1))
        self._fd = self._open_new()
        self._size = len(self._header)

    def _drain(self) -> None:
        """Write what is queued: many records per writev(), no copy in Python."""
        queue = self._queue
        popleft = queue.popleft
        while queue:
            batch = [popleft() for _ in range(min(len(queue), BATCH))]
            size = sum(map(len, batch))
            if self._size + size <= self.max_bytes:
                _write_all(self._fd, batch)
                self._size += size
                continue
            for record in batch:  # (the file is full: one by one, across the rotation)
                if self._size + len(record) > self.max_bytes and (
                        self._size > len(self._header)):
                    self._rotate()
                _write_all(self._fd, [record])
                self._size += len(record)

    def _run(self) -> None:
        while True:
            self._wake.wait(POLL)
            self._wake.clear()
            try:
                self._drain()
            except OSError as exc:
                # (a full disk: say so, then keep dropping what cannot be written)
                log.error("capture %s: %s; records are dropped",
                          printable(str(self.path)), exc.strerror or exc)
                self._queue.clear()
            if self._stopping and not self._queue:
                return

    def close(self) -> None:
        """Write what is queued and close the file (from any thread)."""
        if self._stopping:
            return
        self._stopping = True
        self._wake.set()
        self._thread.join(timeout=30)
        os.close(self._fd)
