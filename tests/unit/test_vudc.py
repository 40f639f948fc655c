"""Device mode (usbipd -e): gadgets on the kernel's usbip-vudc, read from a fake sysfs,
listed by `usbipy list -d`, exported by usbipyd -e, whose IMPORT hands the socket
to the UDC. The real kernel is tests/kernel/test_device_mode.py's."""

from __future__ import annotations

import json
import os
import socket
import struct
from pathlib import Path

import pytest

from usbipy.backends.vudc import VudcSource
from usbipy.cli import usbipy as cli
from usbipy.cli import usbipyd
from usbipy.client import ImportRefused
from usbipy.client.handshake import connect, request_devlist, request_import
from usbipy.linux import vudc
from usbipy.protocol import OpStatus, Speed
from usbipy.server import ServerThread

from .fake_sysfs import FakeSysfs

#: A gadget's device descriptor: USB 2.0, class 0, ep0 64, 1d6b:0104, bcdDevice 6.01.
DESCRIPTOR = struct.pack("<BBHBBBBHHHBBBB", 18, 1, 0x0200, 0, 0, 0, 64, 0x1D6B, 0x0104,
                         0x0601, 1, 2, 3, 1)


def test_gadgets_are_read_as_usbip_device_driver_reads_them(fake: FakeSysfs) -> None:
    fake.add_vudc(0, DESCRIPTOR)
    fake.add_vudc(1)  # no gadget bound
    bound, empty = vudc.gadgets()
    assert (bound.busid, bound.function, bound.status) == ("usbip-vudc.0", "msc", 1)
    info = bound.info
    assert info is not None
    # bus 0, device 0, no configuration and no interfaces, as usbipd -e says
    assert (info.busid, info.busnum, info.devnum, info.speed) == ("usbip-vudc.0", 0, 0,
                                                                   Speed.HIGH)
    assert (info.idVendor, info.idProduct, info.bcdDevice) == (0x1D6B, 0x0104, 0x0601)
    assert (info.bConfigurationValue, info.bNumConfigurations, info.bNumInterfaces) == (0, 1, 0)
    assert info.path.endswith("/devices/platform/usbip-vudc.0")
    assert (empty.busid, empty.info) == ("usbip-vudc.1", None)


def test_a_broken_descriptor_is_no_gadget(fake: FakeSysfs) -> None:
    fake.add_vudc(0, DESCRIPTOR[:10])
    [gadget] = vudc.gadgets()
    assert gadget.info is None


def test_import_hands_the_socket_to_the_udc(fake: FakeSysfs) -> None:
    path = fake.add_vudc(0, DESCRIPTOR)
    fake.add_vudc(1)
    srv = ServerThread([], port=0)
    srv.start()
    try:
        assert srv.server is not None
        srv.server.registry.add_source(VudcSource())
        with connect("127.0.0.1", srv.port) as sock:
            [listed] = request_devlist(sock)  # (the UDC with no gadget is not listed)
        assert (listed.busid, listed.interfaces, listed.devid) == ("usbip-vudc.0", (), 0)
        with connect("127.0.0.1", srv.port) as client:
            device = request_import(client, "usbip-vudc.0")
            assert (device.idVendor, device.speed) == (0x1D6B, Speed.HIGH)
            assert int((path / "usbip_sockfd").read_text()) > 2
            held = fake.held[-1]
            assert os.get_blocking(held)  # (the kernel's threads expect it blocking)
            kernel = socket.socket(fileno=os.dup(held))
            kernel.settimeout(10)
            client.sendall(b"a URB for the gadget")
            assert kernel.recv(100) == b"a URB for the gadget"
            kernel.close()
        (path / "usbip_status").write_text("2\n")  # the UDC serves a client
        with connect("127.0.0.1", srv.port) as sock, pytest.raises(ImportRefused) as refused:
            request_import(sock, "usbip-vudc.0")
        assert refused.value.status is OpStatus.DEV_BUSY
        with connect("127.0.0.1", srv.port) as sock, pytest.raises(ImportRefused) as refused:
            request_import(sock, "usbip-vudc.1")
        assert refused.value.status is OpStatus.NODEV
    finally:
        srv.stop()


def test_list_d_text_parsable_and_json(fake: FakeSysfs, capsys: pytest.CaptureFixture[str]
                                       ) -> None:
    fake.add_vudc(0, DESCRIPTOR, function="msc\x1b[2J")  # (a name is escaped when shown)
    fake.add_vudc(1)
    assert cli.main(["list", "-d"]) == 0
    out = capsys.readouterr().out
    assert " - busid usbip-vudc.0 (1d6b:0104)\n" in out
    assert "   gadget msc\\x1b[2J\n" in out
    assert " - busid usbip-vudc.1: no gadget bound\n" in out
    assert cli.main(["list", "-d", "-p"]) == 0
    assert capsys.readouterr().out == "busid=usbip-vudc.0#usbid=1d6b:0104#\n\n"
    assert cli.main(["list", "-d", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == [
        {"busid": "usbip-vudc.0", "function": "msc\x1b[2J", "usbid": "1d6b:0104",
         "speed": "high"},
        {"busid": "usbip-vudc.1", "function": None}]


def test_list_d_without_the_driver_is_one_line(fake: FakeSysfs,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["list", "-d"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "usbip-vudc driver is not loaded" in err


@pytest.mark.parametrize("other", [["--demo"], ["--rules-only"]])
def test_device_mode_serves_gadgets_and_nothing_else(fake: FakeSysfs, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str],
                                                     other: list[str]) -> None:
    assert usbipyd.main(["-c", "/dev/null", "-e", *other, "--check-config"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "device mode (-e)" in err
