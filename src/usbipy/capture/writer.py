"""The capture file: records queued on the event loop, written by a thread, rotated.

The server never waits for the disk: :meth:`Capture.emit` appends to a deque
(atomic, no lock) and returns; a thread writes what is queued and flushes it,
so the file can be read while it grows (``tshark -r``, ``tail -f | wireshark
-k -i -``). What waits in memory is bounded: past ``max_queued`` bytes,
records are dropped and counted, never the server slowed.

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
from typing import BinaryIO

from .. import __version__
from ..escape import printable
from .pcapng import LINKTYPE_USB_LINUX_MMAPPED, interface_description, section_header
from .usbmon import UrbRecorder

log = logging.getLogger("usbipy.capture")

#: Defaults: 100 MB per file, 5 files (FILE.pcapng and FILE.1 to FILE.4).
MAX_BYTES = 100_000_000
FILES = 5
#: Bytes of records waiting for the writer thread before new ones are dropped.
MAX_QUEUED = 32 << 20
#: How often the writer looks for records when it was not woken (seconds).
POLL = 0.05


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
        #: Written by the loop thread only, and by the writer thread only: their
        #: difference is what waits, with no lock between them.
        self._queued = 0
        self._written = 0
        #: Records dropped because the writer fell behind.
        self.dropped = 0
        self._connections = 0
        self._wake = threading.Event()
        self._stopping = False
        self._file: BinaryIO = self._open_new()  # (here: a bad path fails at start-up)
        self._size = len(self._header)
        self._thread = threading.Thread(target=self._run, name="usbipy-capture", daemon=True)
        self._thread.start()

    def recorder(self, busnum: int, devnum: int) -> UrbRecorder:
        """A recorder for one connection's imported device."""
        self._connections += 1
        return UrbRecorder(self.emit, busnum, devnum, self._connections)

    def emit(self, record: bytes) -> None:
        """Queue one record (a whole pcapng block); from the event loop's thread."""
        n = len(record)
        if self._queued - self._written + n > self.max_queued:
            self.dropped += 1
            if self.dropped == 1 or self.dropped % 10000 == 0:
                log.warning("capture %s: the disk is behind, %d records dropped so far",
                            printable(str(self.path)), self.dropped)
            return
        self._queue.append(record)
        self._queued += n
        if self._queued - self._written > (1 << 20):
            self._wake.set()

    # --- the writer thread ---------------------------------------------------------

    def _open_new(self) -> BinaryIO:
        f = open(self.path, "wb")  # noqa: SIM115 (kept open until rotated or closed)
        try:
            f.write(self._header)
            f.flush()
        except BaseException:
            f.close()
            raise
        return f

    def _rotate(self) -> None:
        self._file.close()
        oldest = rotated_name(self.path, self.files - 1)
        if self.files > 1:
            oldest.unlink(missing_ok=True)
            for index in range(self.files - 2, -1, -1):
                source = rotated_name(self.path, index)
                if source.exists():
                    source.rename(rotated_name(self.path, index + 1))
        self._file = self._open_new()
        self._size = len(self._header)

    def _drain(self) -> None:
        queue = self._queue
        written = 0
        while queue:
            record = queue.popleft()
            if self._size + len(record) > self.max_bytes and self._size > len(self._header):
                self._file.flush()
                self._rotate()
            self._file.write(record)
            self._size += len(record)
            written += len(record)
        self._written += written
        if written:
            self._file.flush()

    def _run(self) -> None:
        while True:
            self._wake.wait(POLL)
            self._wake.clear()
            try:
                self._drain()
            except OSError as exc:
                # (a full disk: say so once, then keep dropping what cannot be written)
                log.error("capture %s: %s; records are dropped",
                          printable(str(self.path)), exc.strerror or exc)
                self._queue.clear()
                self._written = self._queued
            if self._stopping and not self._queue:
                return

    def close(self) -> None:
        """Write what is queued and close the file (from any thread)."""
        if self._stopping:
            return
        self._stopping = True
        self._wake.set()
        self._thread.join(timeout=30)
        self._file.close()
