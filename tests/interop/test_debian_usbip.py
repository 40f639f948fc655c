"""Debian's own usbip client against usbipyd."""

from __future__ import annotations

import subprocess
import sys

from .conftest import Usbipyd, require


def test_usbip_list_remote_shows_the_demo_devices(usbipyd: Usbipyd) -> None:
    usbip = require("usbip")
    out = subprocess.run([usbip, "--tcp-port", str(usbipyd.port), "list", "-r", "127.0.0.1"],
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    text = out.stdout
    for busid, ids in (("1-1", "1209:0001"), ("1-2", "1209:0002"), ("1-3", "1209:0003")):
        assert f"{busid}: " in text and f"({ids})" in text
    # class triples of the interfaces, as usbip prints them
    assert "(03/01/01)" in text  # HID boot keyboard
    assert "(08/06/50)" in text  # mass storage, SCSI, Bulk-Only
    assert "(02/02/01)" in text and "(0a/00/00)" in text  # CDC-ACM + CDC data
    assert "(02/00/00)" in text  # the CDC device class


def test_usbip_attach_of_a_missing_device_fails_cleanly(usbipyd: Usbipyd) -> None:
    usbip = require("usbip")
    # Without vhci-hcd usbip stops before importing; with it, the import is refused.
    # Either way the server keeps serving.
    subprocess.run([usbip, "--tcp-port", str(usbipyd.port), "attach", "-r", "127.0.0.1",
                    "-b", "9-9"], capture_output=True, text=True, timeout=30)
    out = subprocess.run([usbip, "--tcp-port", str(usbipyd.port), "list", "-r", "127.0.0.1"],
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 0 and "1-3" in out.stdout


def test_usbipy_list_remote_prints_what_usbip_prints(usbipyd: Usbipyd) -> None:
    usbip = require("usbip")
    port = str(usbipyd.port)
    theirs = subprocess.run([usbip, "--tcp-port", port, "list", "-r", "127.0.0.1"],
                            capture_output=True, text=True, timeout=30)
    ours = subprocess.run([sys.executable, "-m", "usbipy.cli.usbipy", "--tcp-port", port,
                           "list", "-r", "127.0.0.1"], capture_output=True, text=True, timeout=30)
    assert theirs.returncode == ours.returncode == 0, (theirs.stderr, ours.stderr)
    # names come from the same usb.ids; the layout is the C tool's, byte for byte
    assert "Mass Storage / SCSI / Bulk-Only (08/06/50)" in ours.stdout
    assert ours.stdout == theirs.stdout
