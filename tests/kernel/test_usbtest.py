"""The Linux USB stack's own test suite through USB/IP: usbtest's cases against a
SourceSink gadget (configfs, on dummy_hcd, with gadget zero's ids so that usbtest
binds it), run with the device local, then through usbipyd's libusb export
attached by vhci-hcd with usbipy attach.

Every case that passes with the device local passes through usbipyd; the ones
that fail locally are the isochronous ones, which dummy_hcd does not have.
(The same cases through usbip-host are not run here: the unlink cases crash
the Debian 6.1 kernel's stub_rx thread now and then, a general protection
fault in stub_rx_loop.)
"""

from __future__ import annotations

import errno
import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from . import gadgets
from .conftest import require_vm
from .guest import PYTHON, USBIPY, USBIPYD, wait_for
from .vm import Vm

ZERO = "0525:a4a0"  # gadget zero's ids: usbtest's table names them
CASES = list(range(30))
ENV = "USBIPY_STATE_DIR=/run/usbipy"
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def vm() -> Iterator[Vm]:
    require_vm()
    with Vm() as guest:
        guest.check("modprobe -a vhci-hcd usbip-host usbtest && modprobe dummy_hcd num=1 && "
                    "modprobe -a libcomposite usb_f_ss_lb && { mountpoint -q "
                    "/sys/kernel/config || mount -t configfs configfs /sys/kernel/config; }")
        gadgets.create(guest, "zero", ZERO, "SourceSink.0", udc=0)
        yield guest


def run_cases(vm: Vm, busid: str) -> dict[int, int]:
    """Each case's errno (0: passed) on the device at ``busid``, usbtest bound to it."""
    wait_for(vm, f"readlink /sys/bus/usb/devices/{busid}:1.0/driver | grep -q usbtest")
    out = vm.check(f"cd {REPO} && {PYTHON} -m tests.kernel.usbtest {busid} "
                   f"{','.join(map(str, CASES))}", timeout=900)
    results = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    return {r["case"]: r["errno"] for r in results}


def detach_all(vm: Vm) -> None:
    vm.run("for p in $(usbip port | sed -n 's/^Port \\([0-9]*\\):.*/\\1/p'); do "
           "usbip detach -p $p; done")
    wait_for(vm, "! usbip port | grep -q 'Port in Use'")


def test_usbtest_cases_that_pass_locally_pass_through_usbipyd_libusb(vm: Vm) -> None:
    busid = gadgets.busid(vm, ZERO)
    local = run_cases(vm, busid)

    vm.check(f"{ENV} {USBIPY} bind --libusb -b {busid}")
    vm.check(f"({ENV} {USBIPYD} -P /run/usbipyd.pid > /run/usbipyd.log 2>&1 &)")
    wait_for(vm, f"{USBIPY} list -r 127.0.0.1 2>/dev/null | grep -q ' {busid}: '")
    vm.check(f"{USBIPY} attach -r 127.0.0.1 -b {busid}")
    libusb = run_cases(vm, gadgets.vhci_busid(vm, ZERO))
    detach_all(vm)
    vm.check("kill $(cat /run/usbipyd.pid)")
    wait_for(vm, "[ ! -e /run/usbipyd.pid ]")

    table = "\n".join(f"case {c:2d}: local {local[c]:3d}  usbipyd libusb {libusb[c]:3d}"
                      for c in CASES)
    print(table)
    passed = [c for c in CASES if local[c] == 0]
    # (what fails locally is dummy_hcd's: it has no isochronous endpoints)
    assert len(passed) >= 20 and all(local[c] == errno.EOPNOTSUPP for c in CASES
                                     if c not in passed), table
    failing = {c: libusb[c] for c in passed if libusb[c] != 0}
    assert not failing, table
    warnings = vm.run("dmesg | grep -E 'WARNING|BUG:|Oops'").out
    assert not warnings.strip(), warnings
