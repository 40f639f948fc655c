"""Fixtures for the tests that drive the real Linux kernel (vhci-hcd) in QEMU."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from .vm import Vm, VmUnavailable, check_host

GUEST_MODULES = "vhci-hcd usb-storage sd_mod cdc_acm usbhid hid_generic evdev ext4"


def skip_or_fail(reason: str) -> None:
    if os.environ.get("USBIPY_REQUIRE_ALL"):
        pytest.fail(f"kernel tests cannot run: {reason}")
    pytest.skip(f"kernel tests cannot run: {reason}")


def require_vm(*tools: str) -> None:
    """Skip (or fail, in CI) unless a guest can boot and the host has ``tools``."""
    try:
        check_host()
    except VmUnavailable as exc:
        skip_or_fail(str(exc))
    for tool in tools:
        if shutil.which(tool) is None:
            skip_or_fail(f"{tool} is missing (scripts/setup.sh --test installs it)")


@pytest.fixture(scope="module")
def vm() -> Iterator[Vm]:
    """One booted guest per test module, with the USB/IP client modules loaded."""
    require_vm()
    with Vm() as machine:
        machine.check(f"modprobe -a {GUEST_MODULES}")
        yield machine


#: The emulated disk's size in the tests that export one from the host.
DISK_SIZE = 64 << 20


@pytest.fixture
def image(tmp_path: Path) -> Path:
    """An empty disk image of DISK_SIZE bytes."""
    path = tmp_path / "disk.img"
    with open(path, "wb") as f:
        f.truncate(DISK_SIZE)
    return path


def qemu_stick(image: Path) -> list[str]:
    """QEMU arguments for a USB stick on an xHCI controller, backed by ``image``."""
    return ["-device", "qemu-xhci,id=xhci",
            "-drive", f"if=none,id=stick,format=raw,file={image}",
            "-device", "usb-storage,bus=xhci.0,drive=stick"]
