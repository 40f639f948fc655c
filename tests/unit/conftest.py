"""Fixtures for the unit tests."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from usbipy.cli import usbipy as cli
from usbipy.config import file as config_file
from usbipy.linux import modules, sysfs, vhci
from usbipy.linux.usbids import UsbIds

from .fake_sysfs import FakeSysfs

USB_IDS = """\
# a few lines of usb.ids
1209  Generic
\t0002  pid.codes Test PID 2
46f4  QEMU
C 08  Mass Storage
\t06  SCSI
\t\t50  Bulk-Only
C 09  Hub
"""


@pytest.fixture
def fake(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeSysfs]:
    """A fake /sys in place of the real one; sockets written to vhci's attach or to
    usbip_sockfd are held open, as the kernel holds them."""
    fs = FakeSysfs(tmp_path / "sys")
    monkeypatch.setattr(sysfs, "SYSFS_ROOT", fs.root)
    # (nor this machine's usbipyd configuration and rules: the test's own, if any)
    monkeypatch.setattr(config_file, "DEFAULT_PATH", tmp_path / "etc/usbipyd.toml")
    monkeypatch.setenv("USBIPY_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.setattr(modules, "MODULES_ROOT", fs.modules)
    kernel_held: list[int] = []
    fs.held = kernel_held
    write_attr = sysfs.write_attr

    def write_and_hold(path: Path, value: str) -> None:
        write_attr(path, value)
        if path.name in ("attach", "usbip_sockfd"):
            # as vhci-hcd and usbip-host do: take a reference to the socket
            kernel_held.append(os.dup(int(value.split()[1 if path.name == "attach" else 0])))

    monkeypatch.setattr(sysfs, "write_attr", write_and_hold)
    monkeypatch.setattr(vhci, "VHCI_STATE_DIR", tmp_path / "run/vhci_hcd")
    monkeypatch.setattr(cli, "system_ids", lambda: UsbIds.parse(USB_IDS))
    yield fs
    for fd in kernel_held:
        os.close(fd)
