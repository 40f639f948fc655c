"""Block storage behind the emulated mass-storage device: an image file."""

from __future__ import annotations

import os
import tempfile

from ..errors import UsbipError


class StorageError(UsbipError):
    """The image file cannot be used."""


class ImageFile:
    """A disk image accessed with pread/pwrite; :meth:`flush` makes writes durable."""

    def __init__(self, path: str | os.PathLike[str], *, read_only: bool = False,
                 block_size: int = 512) -> None:
        self.path = os.fspath(path)
        self.read_only = read_only
        self.block_size = block_size
        flags = os.O_RDONLY if read_only else os.O_RDWR
        try:
            self._fd = os.open(self.path, flags | os.O_CLOEXEC)
        except OSError as exc:
            raise StorageError(f"cannot open disk image {self.path}: {exc.strerror}") from exc
        size = os.fstat(self._fd).st_size
        if size < block_size or size % block_size:
            os.close(self._fd)
            raise StorageError(
                f"disk image {self.path} is {size} bytes, not a whole number of "
                f"{block_size}-byte blocks"
            )
        self.size = size

    @classmethod
    def scratch(cls, size: int, *, block_size: int = 512) -> ImageFile:
        """A sparse image in a temporary file, removed when closed (the demo disk)."""
        fd, path = tempfile.mkstemp(prefix="usbipy-disk-", suffix=".img")
        try:
            os.ftruncate(fd, size)
        finally:
            os.close(fd)
        image = cls(path, block_size=block_size)
        os.unlink(path)  # the open descriptor keeps the data alive
        return image

    @property
    def blocks(self) -> int:
        return self.size // self.block_size

    def read(self, offset: int, length: int) -> bytes:
        return os.pread(self._fd, length, offset)

    def write(self, offset: int, data: bytes) -> None:
        if self.read_only:
            raise StorageError("the disk image is read-only")
        os.pwrite(self._fd, data, offset)

    def flush(self) -> None:
        if not self.read_only:
            os.fsync(self._fd)

    def close(self) -> None:
        if self._fd >= 0:
            self.flush()
            os.close(self._fd)
            self._fd = -1
