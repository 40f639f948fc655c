"""The capture file: records queued on the event loop, written by a thread, rotated.

The server never waits for the disk: :meth:`Capture.emit` appends to a deque
(atomic, no lock) and returns; a thread writes what is queued every 50 ms,
many records per writev(), so the file can be read while it grows (``tshark
-r``, ``tail -f | wireshark -k -i -``). What waits in memory is bounded: past
``max_queued`` bytes, records are dropped and counted, never the server
slowed.

A file that reaches ``max_bytes`` is closed and a new one begun, keeping
``files`` in all, as dumpcap's ring buffer does: FILE.pcapng is the newest,
FILE.1.pcapng the one before, and so on; a capture that finds FILE.pcapng
from an earlier run moves it to FILE.1 first (the capture of a crash survives
the restart). Each file begins with its own section header, so each opens on
its own. The files are the owner's alone (mode 0600: they hold keystrokes and
disk blocks), and a symbolic link in their place is refused.
"""

from __future__ import annotations

import collections
import logging
import os
import threading
import time
from pathlib import Path

from .. import __version__
from ..escape import printable
from .pcapng import LINKTYPE_USB_LINUX_MMAPPED, interface_description, section_header
from .usbmon import SNAPLEN, UrbRecorder

log = logging.getLogger("usbipy.capture")

#: Defaults: 100 MB per file, 5 files (FILE.pcapng and FILE.1 to FILE.4).
MAX_BYTES = 100_000_000
FILES = 5
#: Bytes of records waiting for the writer thread before new ones are dropped.
MAX_QUEUED = 32 << 20
#: How often the writer writes what is queued (seconds).
POLL = 0.05
#: Records per writev() (below IOV_MAX, 1024 on Linux).
BATCH = 512
#: After a write or a rotation failed, the writer tries again this much later.
RETRY = 5.0
#: How a capture file is opened: created for the owner alone, never through a link.
OPEN_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC | os.O_NOFOLLOW


def rotated_name(path: Path, index: int) -> Path:
    """FILE.pcapng for 0, FILE.1.pcapng, FILE.2.pcapng... (the suffix kept last)."""
    if index == 0:
        return path
    return path.with_name(f"{path.stem}.{index}{path.suffix}")


def check_writable(path: str | os.PathLike[str]) -> None:
    """What usbipyd asks before it forks: OSError when ``path`` cannot be a capture
    file (its folder missing or not ours to write, a link in its place)."""
    target = Path(path)
    if target.is_symlink():
        raise OSError(40, "a symbolic link is in its place", str(target))  # ELOOP
    folder = target.parent
    if not os.access(folder, os.W_OK | os.X_OK):
        raise PermissionError(13, "cannot write (and rotate) files in its folder",
                              str(folder))


class Capture:
    """One capture file for the whole server (every connection's records)."""

    def __init__(self, path: str | os.PathLike[str], *, max_bytes: int = MAX_BYTES,
                 files: int = FILES, max_queued: int = MAX_QUEUED,
                 snaplen: int = SNAPLEN) -> None:
        if max_bytes < 4096:
            raise ValueError("a capture file needs room for at least 4096 bytes")
        if not 1 <= files <= 1000:
            raise ValueError("files must be 1 to 1000")
        self.path = Path(path)
        self.max_bytes = max_bytes
        self.files = files
        self.max_queued = max_queued
        self.snaplen = snaplen
        self._header = section_header(f"usbipy {__version__}") + interface_description(
            LINKTYPE_USB_LINUX_MMAPPED, "usbipy", "URBs of the devices usbipyd serves")
        self._queue: collections.deque[bytes] = collections.deque()
        #: Bytes queued, counted by the loop's thread; bytes taken, by the writer's:
        #: each is written by one thread only, their difference is what waits.
        self._queued = 0
        self._taken = 0
        #: Records dropped: the writer fell behind, or the disk refused them.
        self.dropped = 0
        self._connections = 0
        self._wake = threading.Event()
        self._stopping = False
        if self.path.exists() and self.path.stat().st_size > 0 and files > 1:
            self._shift()  # (an earlier run's capture is kept, as FILE.1)
        self._fd = self._open_new()  # (here: a bad path fails at start-up)
        self._size = len(self._header)
        self._failed_at = 0.0
        self._thread = threading.Thread(target=self._run, name="usbipy-capture", daemon=True)
        self._thread.start()

    def recorder(self, busnum: int, devnum: int) -> UrbRecorder:
        """A recorder for one connection's imported device."""
        self._connections += 1
        return UrbRecorder(self.emit, busnum, devnum, self._connections, self.snaplen)

    def emit(self, record: bytes) -> None:
        """Queue one record (or two, joined); from the event loop's thread."""
        if self._queued - self._taken < self.max_queued:
            self._queue.append(record)
            self._queued += len(record)
            return
        self.dropped += 1
        if self.dropped == 1 or self.dropped % 10000 == 0:
            log.warning("capture %s: the disk is behind, %d records dropped so far",
                        printable(str(self.path)), self.dropped)

    # --- the writer thread ---------------------------------------------------------

    def _open_new(self) -> int:
        fd = os.open(self.path, OPEN_FLAGS, 0o600)
        try:
            _write_all(fd, [self._header])
        except BaseException:
            os.close(fd)
            raise
        return fd

    def _shift(self) -> None:
        """FILE.N-2 to FILE.N-1 ..., FILE to FILE.1 (the oldest beyond ``files`` goes)."""
        rotated_name(self.path, self.files - 1).unlink(missing_ok=True)
        for index in range(self.files - 2, -1, -1):
            source = rotated_name(self.path, index)
            if source.exists():
                source.rename(rotated_name(self.path, index + 1))

    def _rotate(self) -> None:
        """Close this file and begin the next; on failure, the old file stays open
        (and the records that did not fit are dropped and counted)."""
        if self.files > 1:
            self._shift()
        fd = self._open_new()
        old, self._fd = self._fd, fd
        os.close(old)
        self._size = len(self._header)

    def _drain(self) -> None:
        """Write what is queued: many records per writev(), no copy in Python."""
        queue = self._queue
        popleft = queue.popleft
        while queue:
            batch = [popleft() for _ in range(min(len(queue), BATCH))]
            size = sum(map(len, batch))
            self._taken += size
            if time.monotonic() < self._failed_at + RETRY:
                self.dropped += len(batch)  # (the disk refused the last ones)
                continue
            try:
                if self._size + size <= self.max_bytes:
                    self._write(batch, size)
                    continue
                for record in batch:  # (the file is full: one by one, across the rotation)
                    if self._size + len(record) > self.max_bytes and (
                            self._size > len(self._header)):
                        self._rotate()
                    self._write([record], len(record))
            except OSError as exc:
                self._failed_at = time.monotonic()
                self.dropped += len(batch)
                log.error("capture %s: %s; records are dropped for %g s",
                          printable(str(self.path)), exc.strerror or exc, RETRY)

    def _write(self, records: list[bytes], size: int) -> None:
        try:
            _write_all(self._fd, records)
        except OSError:
            # (a short write, then a full disk: the file ends at its last whole block)
            try:
                os.ftruncate(self._fd, self._size)
            except OSError:
                pass
            raise
        self._size += size

    def _run(self) -> None:
        while True:
            self._wake.wait(POLL)
            self._drain()
            if self._stopping and not self._queue:
                return

    def close(self) -> None:
        """Write what is queued and close the file (from any thread)."""
        if self._stopping:
            return
        self._stopping = True
        self._wake.set()
        self._thread.join(timeout=30)
        if not self._thread.is_alive():  # (else it still writes to it: left open)
            os.close(self._fd)


def _write_all(fd: int, parts: list[bytes]) -> None:
    written = os.writev(fd, parts)
    total = sum(len(p) for p in parts)
    if written < total:  # (a short write: rare on a file, but not impossible)
        rest = b"".join(parts)[written:]
        while rest:
            rest = rest[os.write(fd, rest):]
