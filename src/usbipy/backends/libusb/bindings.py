"""Which devices usbipyd exports through libusb: a small JSON file of bindings.

`usbipy bind --libusb` writes it and usbipyd reads it on every request, so a
running server picks a change up at once and one started later exports the
same devices. A binding names a busid, or VID:PID[:SERIAL] for a device
that moves when it is replugged.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from ...errors import UsbipError
from ...statedir import state_dir


class BindingError(UsbipError):
    pass


@dataclass(frozen=True)
class Binding:
    busid: str | None = None
    vid: int | None = None
    pid: int | None = None
    serial: str | None = None

    @classmethod
    def parse_device(cls, spec: str) -> Binding:
        """'VID:PID' or 'VID:PID:SERIAL', hexadecimal ids as lsusb prints them."""
        parts = spec.split(":", 2)
        try:
            if len(parts) < 2:
                raise ValueError
            vid, pid = int(parts[0], 16), int(parts[1], 16)
            if not (0 <= vid <= 0xFFFF and 0 <= pid <= 0xFFFF):
                raise ValueError
        except ValueError:
            raise BindingError(f"bad device {spec!r}: expected VID:PID[:SERIAL] in hex, "
                               "such as 1d6b:0104") from None
        return cls(vid=vid, pid=pid, serial=parts[2] if len(parts) == 3 and parts[2] else None)

    def matches(self, busid: str, vid: int, pid: int, serial: Callable[[], str | None]) -> bool:
        if self.busid is not None:
            return busid == self.busid
        if (vid, pid) != (self.vid, self.pid):
            return False
        return self.serial is None or serial() == self.serial

    def __str__(self) -> str:
        if self.busid is not None:
            return f"busid {self.busid}"
        text = f"device {self.vid:04x}:{self.pid:04x}"
        return text + (f":{self.serial}" if self.serial else "")


class BindingStore:
    """The libusb bindings file; reads are cached until the file changes."""

    def __init__(self, path: Path | None = None) -> None:
        self.path = path if path is not None else state_dir() / "libusb-bindings.json"
        self._cache: tuple[tuple[int, int] | None, list[Binding]] = (None, [])

    def _stamp(self) -> tuple[int, int] | None:
        try:
            st = self.path.stat()
        except FileNotFoundError:
            return None
        return (st.st_mtime_ns, st.st_size)

    def load(self) -> list[Binding]:
        stamp = self._stamp()
        if stamp is not None and stamp == self._cache[0]:
            return list(self._cache[1])
        bindings: list[Binding] = []
        if stamp is not None:
            try:
                raw = json.loads(self.path.read_text())
                bindings = [Binding(**entry) for entry in raw.get("libusb", [])]
            except (OSError, ValueError, TypeError) as exc:
                raise BindingError(f"cannot read {self.path}: {exc}") from exc
        self._cache = (stamp, bindings)
        return list(bindings)

    def _save(self, bindings: list[Binding]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        data = json.dumps({"libusb": [{k: v for k, v in asdict(b).items() if v is not None}
                                      for b in bindings]}, indent=2)
        # Atomic: a server reading meanwhile sees the old file or the new one.
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".bindings-")
        with os.fdopen(fd, "w") as f:
            f.write(data + "\n")
        os.replace(tmp, self.path)

    def add(self, binding: Binding) -> None:
        bindings = self.load()
        if binding in bindings:
            raise BindingError(f"{binding} is already bound for export through libusb")
        self._save([*bindings, binding])

    def remove(self, binding: Binding) -> None:
        bindings = self.load()
        if binding not in bindings:
            raise BindingError(f"{binding} is not bound for export through libusb")
        self._save([b for b in bindings if b != binding])
