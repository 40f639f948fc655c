"""usbipyd's -P FILE: the process id, written so that no link can redirect it.

usbipyd usually runs as root, and the folder of a pid file may be writable by
others (/tmp, a shared run directory). So the file is never opened through a
symbolic link: it is written whole under a temporary name in its folder and
renamed over FILE (rename(2) replaces a link itself, never its target), 0644,
and at exit it is removed only while it still holds this process's id.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


class PidFile:
    """``path``, checked at once (before usbipyd forks, so that a refusal is seen)
    and written by :meth:`write` (after the fork: the daemon's own id)."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._written: str | None = None
        if self.path.is_symlink():
            raise OSError(40, "a symbolic link is in its place", str(self.path))  # ELOOP
        folder = self.path.parent
        if not folder.is_dir():
            raise FileNotFoundError(2, "its folder does not exist", str(folder))
        if not os.access(folder, os.W_OK | os.X_OK):
            raise PermissionError(13, "cannot write files in its folder", str(folder))

    def write(self) -> None:
        """Write this process's id, atomically."""
        content = f"{os.getpid()}\n"
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=f".{self.path.name}.")
        try:
            os.fchmod(fd, 0o644)
            os.write(fd, content.encode())
            os.close(fd)
            fd = -1
            os.replace(tmp, self.path)
        except BaseException:
            if fd >= 0:
                os.close(fd)
            os.unlink(tmp)
            raise
        self._written = content

    def remove(self) -> None:
        """Remove the file if it is still the one written (not a link, not another
        process's)."""
        if self._written is None:
            return
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError:
            return
        with os.fdopen(fd) as f:
            mine = f.read(64) == self._written
        if mine:
            try:
                os.unlink(self.path)
            except OSError:
                pass
        self._written = None
