"""Which USB devices hold the file systems this machine runs from (the root, /boot,
/usr): never to be exported.

The root's block device (st_dev of "/") is found in /sys/dev/block; its
sysfs path runs through the USB device it sits on ("/usb2/2-1/2-1:1.0/
host0/..."), and a device-mapper or md device names the block devices under
it in ``slaves``.
"""

from __future__ import annotations

import os
from pathlib import Path

from . import sysfs

#: The file systems checked: the root, and where the kernel and its modules live.
MOUNTS = ("/", "/boot", "/usr")


def _usb_devices_under(block: Path, seen: set[Path]) -> set[str]:
    """The USB busids in the sysfs path of ``block`` and of its slaves, recursively."""
    try:
        path = block.resolve()
    except OSError:
        return set()
    if path in seen:
        return set()
    seen.add(path)
    found = {part for part in path.parts if sysfs.is_device_busid(part)}
    disk = path if (path / "slaves").is_dir() else path.parent  # (a partition: its disk)
    try:
        slaves = list((disk / "slaves").iterdir())
    except OSError:
        slaves = []
    for slave in slaves:
        found |= _usb_devices_under(slave, seen)
    return found


def root_busids(mounts: tuple[str, ...] = MOUNTS) -> dict[str, str]:
    """The busids of the USB devices that hold ``mounts``, each with the first mount
    point it holds (empty on a machine that runs from no USB device, or with no
    sysfs)."""
    found: dict[str, str] = {}
    seen: set[Path] = set()
    for mount in mounts:
        try:
            dev = os.stat(mount).st_dev
        except OSError:
            continue
        block = sysfs.SYSFS_ROOT / "dev/block" / f"{os.major(dev)}:{os.minor(dev)}"
        if block.exists():
            for busid in _usb_devices_under(block, seen):
                found.setdefault(busid, mount)
    return found


def holds(mount: str) -> str:
    """How an error says what a device holds: "the root file system (/)", "/boot"."""
    return "the root file system (/)" if mount == "/" else mount
