"""`usbipy` subcommands against a fake sysfs and a live server: text, --json, errors.

The kernel tests check the same commands against the real usbip-host and vhci-hcd;
here every error path is reachable, and the files usbipy writes are read back.
"""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from usbipy.cli import usbipy as cli
from usbipy.devices.demo import demo_devices
from usbipy.linux import vhci
from usbipy.linux.usbids import UsbIds
from usbipy.server import ServerThread
from usbipy.tls import TlsSession

from .conftest import USB_IDS
from .fake_sysfs import FakeSysfs


def usbipy(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    rc = cli.main(list(args))
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.fixture
def server() -> Iterator[ServerThread]:
    with ServerThread(demo_devices(disk_size=1 << 20), port=0) as srv:
        yield srv


# --- names ------------------------------------------------------------------------------


def test_usb_ids_names_like_the_c_tool() -> None:
    ids = UsbIds.parse(USB_IDS)
    assert ids.product_name(0x1209, 0x0002) == "Generic : pid.codes Test PID 2 (1209:0002)"
    assert ids.product_name(0x46F4, 0x0001) == "QEMU : unknown product (46f4:0001)"
    assert ids.product_name(0xFFFF, 1) == "unknown vendor : unknown product (ffff:0001)"
    assert ids.class_name(8, 6, 0x50) == "Mass Storage / SCSI / Bulk-Only (08/06/50)"
    assert ids.class_name(9, 0, 0) == "Hub / unknown subclass / unknown protocol (09/00/00)"
    assert ids.class_name(0, 0, 0) == "(Defined at Interface level) (00/00/00)"


# --- list -l ----------------------------------------------------------------------------


def local_devices(fake: FakeSysfs) -> None:
    fake.add_device("1-1", 0x46F4, 0x0001)
    fake.add_device("1-2", 0x1209, 0x0002, speed="5000", driver="usbip-host"
                    if (fake.drivers / "usbip-host").exists() else "usb")
    fake.add_device("1-3", 0x05E3, 0x0608, device_class=9, driver="hub",
                    interfaces=((9, 0, 0),))
    fake.add_device("3-1", 0x1209, 0x0001, parent="platform/vhci_hcd.0")


def test_list_local_text_parsable_and_json(fake: FakeSysfs, capsys) -> None:
    local_devices(fake)
    rc, out, _ = usbipy(capsys, "list", "-l")
    # hubs and devices attached through vhci_hcd are left out, as `usbip list -l` does
    assert rc == 0 and out == (
        " - busid 1-1 (46f4:0001)\n   QEMU : unknown product (46f4:0001)\n"
        "   not exported (no rule)\n\n"
        " - busid 1-2 (1209:0002)\n   Generic : pid.codes Test PID 2 (1209:0002)\n"
        "   not exported (no rule)\n\n")
    rc, out, _ = usbipy(capsys, "list", "-l", "-p")
    assert out == "busid=1-1#usbid=46f4:0001#\n\nbusid=1-2#usbid=1209:0002#\n\n"
    rc, out, _ = usbipy(capsys, "list", "-l", "--json")
    devices = json.loads(out)
    assert [(d["busid"], d["speed"], d["driver"], d["interfaces"]) for d in devices] == [
        ("1-1", "high", "usb", ["08/06/50"]), ("1-2", "super", "usb", ["08/06/50"])]


# --- bind / unbind ----------------------------------------------------------------------


def test_bind_writes_what_usbip_bind_writes(fake: FakeSysfs, capsys) -> None:
    local_devices(fake)
    host = fake.load_usbip_host()
    rc, out, err = usbipy(capsys, "bind", "-b", "1-1")
    assert (rc, err) == (0, "")
    assert out == "usbipy: info: bind device on busid 1-1: complete\n"
    assert (fake.drivers / "usb/unbind").read_text() == "1-1"
    assert (host / "match_busid").read_text() == "add 1-1"
    assert (host / "bind").read_text() == "1-1"
    fake.set_driver("1-1", "usbip-host")
    rc, out, _ = usbipy(capsys, "--json", "unbind", "-b", "1-1")
    assert rc == 0 and json.loads(out) == {"busid": "1-1", "driver": None,
                                           "held_until_replugged": False}
    assert (host / "unbind").read_text() == "1-1"
    assert (host / "match_busid").read_text() == "del 1-1"
    assert (host / "rebind").read_text() == "1-1"


@pytest.mark.parametrize("busid, setup, message", [
    ("9-9", "load", "no USB device with busid 9-9"),
    ("1-3", "load", "1-3 is a hub: hubs cannot be exported"),
    ("3-1", "load", "attached through vhci_hcd"),
    ("1-1", "bound", "1-1 is already bound to usbip-host"),
    ("1-1", "none", "the usbip-host driver is not loaded: it is not installed for this "
                    "kernel: install the kernel's extra modules (Debian: they ship with "
                    "linux-image-*; Ubuntu: linux-modules-extra-$(uname -r))"),
    ("1-1", "installed", "the usbip-host driver is not loaded: run 'modprobe usbip-host' "
                         "as root"),
])
def test_bind_errors(fake: FakeSysfs, capsys, busid: str, setup: str, message: str) -> None:
    local_devices(fake)
    if setup == "installed":
        fake.install_modules("usbip-host")
    elif setup != "none":
        fake.load_usbip_host()
    if setup == "bound":
        fake.set_driver("1-1", "usbip-host")
    rc, out, err = usbipy(capsys, "bind", "-b", busid)
    assert rc == 1 and out == "" and message in err
    rc, out, err = usbipy(capsys, "bind", "-b", busid, "--json")
    assert rc == 1 and message in json.loads(out)["error"]


def test_unbind_of_a_device_usbip_host_does_not_hold(fake: FakeSysfs, capsys) -> None:
    local_devices(fake)
    fake.load_usbip_host()
    rc, _, err = usbipy(capsys, "unbind", "-b", "1-1")
    assert rc == 1 and "1-1 is not bound to usbip-host" in err
    assert (fake.drivers / "usbip-host/unbind").read_text() == ""


# --- list -r ----------------------------------------------------------------------------


def test_list_remote_text_and_json(fake: FakeSysfs, capsys, server: ServerThread) -> None:
    rc, out, _ = usbipy(capsys, "-t", str(server.port), "list", "-r", "127.0.0.1")
    assert rc == 0
    assert out.startswith("Exportable USB devices\n======================\n - 127.0.0.1\n")
    assert ("        1-2: Generic : pid.codes Test PID 2 (1209:0002)\n"
            "           : /sys/devices/platform/usbipy/usb1/1-2\n"
            "           : (Defined at Interface level) (00/00/00)\n"
            "           :  0 - Mass Storage / SCSI / Bulk-Only (08/06/50)\n\n") in out
    # -t after the subcommand works too
    rc, out2, _ = usbipy(capsys, "list", "-r", "127.0.0.1", "-t", str(server.port))
    assert out2 == out
    rc, out, _ = usbipy(capsys, "--tcp-port", str(server.port), "list", "-r", "127.0.0.1",
                        "--json")
    assert [d["busid"] for d in json.loads(out)] == ["1-1", "1-2", "1-3"]


# --- attach / port / detach -------------------------------------------------------------


def test_attach_hands_the_socket_to_vhci_and_records_it(fake: FakeSysfs, capsys,
                                                        server: ServerThread) -> None:
    hc = fake.load_vhci()
    rc, out, _ = usbipy(capsys, "--json", "-t", str(server.port), "attach", "-r", "127.0.0.1",
                        "-b", "1-2")
    assert rc == 0
    result = json.loads(out)
    # the mass-storage demo is high speed: the first port of the USB 2 hub
    assert result["port"] == 0 and result["device"]["busid"] == "1-2"
    port, fd, devid, speed = (hc / "attach").read_text().split()
    assert (port, devid, speed) == ("0", str(0x10003), "3")
    assert int(fd) > 2
    assert (vhci.VHCI_STATE_DIR / "port0").read_text() == f"127.0.0.1 {server.port} 1-2\n"
    # the device is imported: the server offers it no more
    rc, out, _ = usbipy(capsys, "-t", str(server.port), "list", "-r", "127.0.0.1", "--json")
    assert [d["busid"] for d in json.loads(out)] == ["1-1", "1-3"]


def test_attach_takes_the_next_port_when_the_first_is_used(fake: FakeSysfs, capsys,
                                                           server: ServerThread) -> None:
    hc = fake.load_vhci()
    fake.set_vhci_status({0: (3, 0x10009, "3-1")})
    rc, out, _ = usbipy(capsys, "-t", str(server.port), "attach", "-r", "127.0.0.1",
                        "-b", "1-3")
    assert rc == 0 and "on port 1" in out
    assert (hc / "attach").read_text().split()[0] == "1"


def test_port_shows_what_usbip_port_shows(fake: FakeSysfs, capsys) -> None:
    fake.load_vhci()
    fake.add_device("3-1", 0x1209, 0x0002, parent="platform/vhci_hcd.0")
    fake.add_device("4-1", 0x46F4, 0x0001, speed="5000", parent="platform/vhci_hcd.0")
    fake.set_vhci_status({0: (3, 0x10003, "3-1"), 2: (5, 0x20002, "4-1")})
    vhci.write_record(0, vhci.Record("10.0.0.7", "3240", "1-2"))
    rc, out, _ = usbipy(capsys, "port")
    assert rc == 0 and out == (
        "Imported USB devices\n====================\n"
        "Port 00: <Port in Use> at High Speed(480Mbps)\n"
        "       Generic : pid.codes Test PID 2 (1209:0002)\n"
        "       3-1 -> usbip://10.0.0.7:3240/1-2\n"
        "           -> remote bus/dev 001/003\n"
        "Port 02: <Port in Use> at Super Speed(5000Mbps)\n"
        "       QEMU : unknown product (46f4:0001)\n"
        "       4-1 -> unknown host, remote port and remote busid\n"
        "           -> remote bus/dev 002/002\n")
    rc, out, _ = usbipy(capsys, "port", "--json")
    first, second = json.loads(out)
    assert first == {
        "port": 0, "hub": "hs", "status": "used", "speed": "high", "local_busid": "3-1",
        "idVendor": "1209", "idProduct": "0002", "host": "10.0.0.7", "tcp_port": 3240,
        "remote_busid": "1-2", "url": "usbip://10.0.0.7:3240/1-2", "remote_busnum": 1,
        "remote_devnum": 3, "encrypted": False, "tls": None, "persistent": None}
    assert (second["port"], second["hub"], second["url"]) == (2, "ss", None)


def test_port_shows_the_tls_session_and_the_server_identity(fake: FakeSysfs, capsys) -> None:
    fake.load_vhci()
    fake.add_device("3-1", 0x1209, 0x0002, parent="platform/vhci_hcd.0")
    fake.set_vhci_status({0: (3, 0x10003, "3-1")})
    # the identity comes from the server's certificate: a newline in it stays escaped
    session = TlsSession("TLSv1.2", "ECDHE-ECDSA-AES128-GCM-SHA256", "CN=lab\nforged",
                         kernel=True)
    vhci.write_record(0, vhci.Record("10.0.0.7", "3240", "1-2"), session, devid=0x10003)
    rc, out, _ = usbipy(capsys, "port")
    assert rc == 0 and out.endswith(
        "       3-1 -> usbip://10.0.0.7:3240/1-2\n"
        "           -> remote bus/dev 001/003\n"
        "           -> encrypted (kernel TLS, TLSv1.2) with CN=lab\\nforged\n")
    rc, out, _ = usbipy(capsys, "port", "--json")
    (port,) = json.loads(out)
    assert port["encrypted"] is True and port["tls"] == {
        "version": "TLSv1.2", "cipher": "ECDHE-ECDSA-AES128-GCM-SHA256",
        "peer": "CN=lab\nforged", "kernel": True}
    # C usbip reads the first line only: it is unchanged
    assert vhci.record_path(0).read_text().splitlines()[0] == "10.0.0.7 3240 1-2"
    # the port now holds another device (the session died, another attach took the
    # port): the old session's protection is not claimed for it
    fake.set_vhci_status({0: (3, 0x10004, "3-1")})
    rc, out, _ = usbipy(capsys, "port")
    assert rc == 0 and "encrypted" not in out
    rc, out, _ = usbipy(capsys, "port", "--json")
    assert json.loads(out)[0]["encrypted"] is False


def test_detach(fake: FakeSysfs, capsys) -> None:
    hc = fake.load_vhci()
    fake.set_vhci_status({1: (3, 0x10003, "3-1")})
    vhci.write_record(1, vhci.Record("127.0.0.1", "3240", "1-2"))
    rc, out, _ = usbipy(capsys, "detach", "-p", "1")
    assert rc == 0 and out == "usbipy: info: port 1 is now detached\n"
    assert (hc / "detach").read_text() == "1"
    assert not vhci.record_path(1).exists()


@pytest.mark.parametrize("port, message", [
    (0, "port 0 is already detached"),
    (9, "invalid port 9: vhci-hcd has ports 0 to 3"),
])
def test_detach_errors(fake: FakeSysfs, capsys, port: int, message: str) -> None:
    fake.load_vhci()
    rc, _, err = usbipy(capsys, "detach", "-p", str(port))
    assert rc == 1 and message in err


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.parametrize("case, message", [
    ("no vhci", "vhci-hcd is not loaded: it is not installed for this kernel: install the "
                "kernel's extra modules (Debian: they ship with linux-image-*; Ubuntu: "
                "linux-modules-extra-$(uname -r)); or use the userspace client "
                "(usbipy.connect, usbipy.pyusb), which needs no module"),
    ("vhci installed", "vhci-hcd is not loaded: run 'modprobe vhci-hcd' as root"),
    ("unreachable", "connection refused: nothing listens on 127.0.0.1:"),
    ("busy", "import of 1-2 refused: the device is already imported by another client "
             "(DEV_BUSY)"),
    ("no device", "import of 7-7 refused: no such device (NODEV)"),
    ("no free port", "no free high-speed port on vhci-hcd"),
])
def test_attach_errors(fake: FakeSysfs, capsys, server: ServerThread, case: str,
                       message: str) -> None:
    if case == "vhci installed":
        fake.install_modules("vhci-hcd")
    elif case != "no vhci":
        fake.load_vhci()
    busid, port = "1-2", server.port
    if case == "unreachable":
        port = _closed_port()
    elif case == "busy":
        assert usbipy(capsys, "-t", str(port), "attach", "-r", "127.0.0.1", "-b", "1-2")[0] == 0
        fake.set_vhci_status({})
    elif case == "no device":
        busid = "7-7"
    elif case == "no free port":
        fake.set_vhci_status({0: (3, 0x10009, "3-1"), 1: (3, 0x1000A, "3-2")})
    rc, out, err = usbipy(capsys, "-t", str(port), "attach", "-r", "127.0.0.1", "-b", busid)
    assert rc == 1 and out == "" and message in err, err
    if case == "no free port":
        # the import was given back: another client may have the device
        rc, out, _ = usbipy(capsys, "-t", str(port), "list", "-r", "127.0.0.1", "--json")
        assert "1-2" in [d["busid"] for d in json.loads(out)]


# --- bind --libusb ------------------------------------------------------------------------


@pytest.fixture
def state(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("USBIPY_STATE_DIR", str(tmp_path / "state"))
    return tmp_path / "state" / "exports.json"


def test_bind_and_unbind_for_libusb(fake: FakeSysfs, capsys, state: Path) -> None:
    local_devices(fake)
    rc, out, _ = usbipy(capsys, "bind", "--libusb", "-b", "1-1")
    assert rc == 0 and out == "usbipy: info: bind busid 1-1 for export through libusb: complete\n"
    rc, out, _ = usbipy(capsys, "bind", "--libusb", "--device", "1209:0002:SN", "--json")
    assert rc == 0 and json.loads(out) == {"rule": "1209:0002:SN", "export": "libusb",
                                           "plugged_in": False, "busids": [], "bound": []}
    assert json.loads(state.read_text()) == {"export": [
        {"busid": "1-1", "via": "libusb"},
        {"vid_pid": "1209:0002", "serial": "SN", "via": "libusb"}], "unbound": []}
    # the kernel's drivers were not touched: usbipyd detaches them only while imported
    assert (fake.drivers / "usb/unbind").read_text() == ""
    rc, out, _ = usbipy(capsys, "list", "-l")
    assert "   exported through libusb by rule: usbipy bind\n" in out
    rc, out, _ = usbipy(capsys, "unbind", "-b", "1-1")
    assert rc == 0 and "unbind busid 1-1 from export through libusb: complete" in out
    rc, out, _ = usbipy(capsys, "unbind", "--device", "1209:0002:SN")
    assert rc == 0
    assert json.loads(state.read_text()) == {"export": [], "unbound": []}


@pytest.mark.parametrize("args, message", [
    (["bind", "--libusb", "-b", "1-3"], "1-3 is a hub"),
    (["bind", "--device", "12:zz"], "bad device '12:zz': expected VID:PID[:SERIAL]"),
    (["unbind", "--device", "1209:0002"], "1209:0002 is not a rule 'usbipy bind' recorded"),
])
def test_libusb_binding_errors(fake: FakeSysfs, capsys, state: Path, args: list[str],
                               message: str) -> None:
    local_devices(fake)
    rc, out, err = usbipy(capsys, *args)
    assert rc == 1 and message in err, err


def test_libusb_bind_of_a_device_usbip_host_holds(fake: FakeSysfs, capsys, state: Path) -> None:
    local_devices(fake)
    fake.load_usbip_host()
    fake.set_driver("1-1", "usbip-host")
    rc, _, err = usbipy(capsys, "bind", "--libusb", "-b", "1-1")
    assert rc == 1 and "'usbipy unbind -b 1-1' first" in err


def test_libusb_bind_refuses_a_busid_that_does_not_exist(fake: FakeSysfs, capsys,
                                                        state: Path) -> None:
    local_devices(fake)
    rc, out, err = usbipy(capsys, "bind", "--libusb", "-b", "7-7", "--json")
    assert rc == 1 and "no USB device with busid 7-7" in err and "--device VID:PID" in err
    assert json.loads(out)["kind"] == "UsbipHostError"
    assert not state.exists()


def test_libusb_bind_by_ids_of_a_device_not_plugged_in_says_so(fake: FakeSysfs, capsys,
                                                              state: Path) -> None:
    local_devices(fake)
    rc, out, _ = usbipy(capsys, "bind", "--libusb", "--device", "abcd:1234")
    assert rc == 0 and "(not plugged in now: usbipyd exports it once it is)" in out
    rc, out, _ = usbipy(capsys, "bind", "--libusb", "--device", "46f4:0001")
    assert rc == 0 and out.endswith("complete\n")


def test_libusb_bind_where_there_is_no_sysfs_asks_libusb(fake: FakeSysfs, capsys,
                                                        state: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """A container or macOS: no /sys/bus/usb. libusb lists what is plugged in, and an
    unknown busid is refused as on Linux."""
    import shutil
    import types

    from usbipy.backends.libusb import events

    from .fake_usb1 import FakeDevice

    class Hub(FakeDevice):
        def getPortNumberList(self) -> list[int]:
            return [4]

        def getDeviceClass(self) -> int:
            return 9

    class Context:
        def __enter__(self) -> Context:
            return self

        def __exit__(self, *exc: object) -> None:
            pass

        def getDeviceIterator(self, skip_on_error: bool) -> Iterator[FakeDevice]:
            yield from (FakeDevice(), Hub())

    monkeypatch.setattr(FakeDevice, "close", lambda self: None, raising=False)
    monkeypatch.setattr(events, "usb1", types.SimpleNamespace(USBContext=Context))
    shutil.rmtree(fake.root / "bus/usb")
    rc, out, err = usbipy(capsys, "bind", "--libusb", "-b", "9-9")
    assert rc == 1 and "no USB device with busid 9-9" in err
    rc, out, err = usbipy(capsys, "bind", "--libusb", "-b", "2-4")
    assert rc == 1 and "2-4 is a hub: hubs cannot be exported" in err
    assert not state.exists()
    rc, out, err = usbipy(capsys, "bind", "--libusb", "-b", "2-3.1")  # (FakeDevice's place)
    assert rc == 0 and out == "usbipy: info: bind busid 2-3.1 for export through libusb: " \
        "complete\n", err
    rc, out, _ = usbipy(capsys, "bind", "--libusb", "--device", "1209:beef", "--json")
    assert rc == 0 and json.loads(out)["plugged_in"] is True
    rc, out, _ = usbipy(capsys, "bind", "--libusb", "--device", "1209:0000", "--json")
    assert rc == 0 and json.loads(out)["plugged_in"] is False


def test_libusb_bind_without_python_libusb1(fake: FakeSysfs, capsys, state: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    from usbipy.backends.libusb import events

    local_devices(fake)
    monkeypatch.setattr(events, "usb1", None)
    rc, _, err = usbipy(capsys, "bind", "--libusb", "-b", "1-1")
    assert rc == 1 and "pip install 'usbipy[libusb]'" in err
    assert not state.exists()


@pytest.mark.parametrize("error", [
    PermissionError(13, "Permission denied", "/sys/bus/usb/drivers/usbip-host/bind"),
    OSError(28, "No space left on device", "/var/lib/usbipy/libusb-bindings.json"),
    OSError(5, "Input/output error"),
])
def test_every_os_error_is_one_line_and_a_json_object(fake: FakeSysfs, capsys, state: Path,
                                                       monkeypatch: pytest.MonkeyPatch,
                                                       error: OSError) -> None:
    def fail(*args: object) -> None:
        raise error

    monkeypatch.setattr(cli, "_run", fail)
    rc, out, err = usbipy(capsys, "port", "--json")
    assert rc == 1 and err.count("\n") == 1 and err.startswith("usbipy: error: ")
    assert (error.strerror or "") in err and (error.filename or "") in err
    assert json.loads(out) == {"error": err.removeprefix("usbipy: error: ").rstrip("\n"),
                               "kind": type(error).__name__}
    if isinstance(error, PermissionError):
        assert "(run as root)" in err


def test_a_remote_busid_is_escaped_before_the_terminal(fake: FakeSysfs, capsys) -> None:
    from usbipy.backends import FunctionDevice

    device = FunctionDevice(lambda urb: None)  # type: ignore[arg-type,return-value]
    device.busid = "1-1\x1b]0;owned\x07"
    with ServerThread([device], port=0) as srv:
        rc, out, _ = usbipy(capsys, "-t", str(srv.port), "list", "-r", "127.0.0.1")
    assert rc == 0 and "\x1b" not in out and "\x07" not in out
    assert "1-1\\x1b]0;owned\\x07" in out


@pytest.mark.parametrize("run, args", [
    ("lambda args: ['x' * 1000] * 1000", "['--json', 'port']"),  # printed by main
    ("lambda args: [print('x' * 1000) for _ in range(1000)] and None", "['port']"),  # by _run
])
def test_a_reader_that_leaves_early_gets_no_traceback(run: str, args: str) -> None:
    import subprocess
    import sys

    code = ("import sys; from usbipy.cli import usbipy as c; "
            f"c._run = {run}; sys.exit(c.main({args}))")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.close()  # as `usbipy ... | head` when head has read enough
    err = proc.stderr.read().decode()
    proc.stderr.close()
    assert proc.wait(timeout=60) == 1
    assert "Traceback" not in err and "error" not in err, err


def test_usbipyd_reports_a_pid_file_it_cannot_write(tmp_path: Path, capsys) -> None:
    from usbipy.cli import usbipyd

    rc = usbipyd.main(["-t", "0", "--no-usbip-host", "--no-libusb",
                       "-P", str(tmp_path / "missing-dir" / "usbipyd.pid")])
    err = capsys.readouterr().err
    assert rc == 1 and "cannot write" in err and "its folder does not exist" in err
    assert "Traceback" not in err


def test_usbipyd_never_writes_its_pid_file_through_a_link(tmp_path: Path, capsys) -> None:
    from usbipy.cli import usbipyd

    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    link = tmp_path / "usbipyd.pid"
    link.symlink_to(victim)
    rc = usbipyd.main(["-t", "0", "--no-usbip-host", "--no-libusb", "-P", str(link)])
    err = capsys.readouterr().err
    assert rc == 1 and err == (f"usbipyd: cannot write {link}: a symbolic link is in its "
                               "place\n")
    assert victim.read_text() == "precious\n" and link.is_symlink()


def test_a_pid_file_is_written_whole_over_a_link_made_after_the_check(tmp_path: Path) -> None:
    from usbipy.pidfile import PidFile

    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    path = tmp_path / "usbipyd.pid"
    pid_file = PidFile(path)
    path.symlink_to(victim)  # (a race: the link comes between the check and the write)
    pid_file.write()
    assert not path.is_symlink() and path.read_text() == f"{os.getpid()}\n"
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    assert victim.read_text() == "precious\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["usbipyd.pid", "victim"]
    pid_file.remove()
    assert not path.exists()
    # another process's file (or a link put there meanwhile) is left alone
    pid_file.write()
    path.write_text("4242\n")
    pid_file.remove()
    assert path.read_text() == "4242\n"


def test_remote_host_port_and_port_errors(capsys, server: ServerThread) -> None:
    port = server.port
    rc, out, err = usbipy(capsys, "list", "-r", f"127.0.0.1:{port}", "--json")
    assert rc == 0 and "1-2" in [d["busid"] for d in json.loads(out)], err
    # (an IPv4-mapped IPv6 address reaches the IPv4 listener)
    rc, out, err = usbipy(capsys, "-t", "1", "list", "-r", f"[::ffff:127.0.0.1]:{port}",
                          "--json")
    assert rc == 0 and "1-2" in [d["busid"] for d in json.loads(out)], err
    closed = _closed_port()
    rc, _, err = usbipy(capsys, "list", "-r", f"127.0.0.1:{closed}")
    assert rc == 1 and err == (f"usbipy: error: connection refused: nothing listens on "
                               f"127.0.0.1:{closed} (is usbipyd running? see usbipy doctor -r "
                               f"127.0.0.1:{closed})\n")
    # a name that does not resolve says so in the resolver's words
    rc, _, err = usbipy(capsys, "list", "-r", "no-such-host.invalid")
    assert rc == 1 and err.startswith("usbipy: error: cannot connect to "
                                      "no-such-host.invalid:3240: ") and "Unknown error" not in err
    rc, _, err = usbipy(capsys, "list", "-r", "127.0.0.1:x")
    assert rc == 1 and err == "usbipy: error: -r: bad port in 127.0.0.1:x\n"
    # a port out of range is refused, not wrapped round to another
    with pytest.raises(SystemExit) as exit_:
        usbipy(capsys, "-t", "99999", "list", "-r", "127.0.0.1")
    assert exit_.value.code == 2
    assert "argument -t/--tcp-port: 99999 is out of range (1 to 65535)" in \
        capsys.readouterr().err


def test_version_debug_and_syslog(capsys, monkeypatch, tmp_path: Path) -> None:
    from usbipy import __version__
    from usbipy.cli import usbipy as cli
    from usbipy.cli import usbipyd

    for main, prog in ((cli.main, "usbipy"), (usbipyd.main, "usbipyd")):
        with pytest.raises(SystemExit) as exit_:
            main(["--version"])
        assert exit_.value.code == 0 and capsys.readouterr().out == f"{prog} {__version__}\n"
    assert usbipy(capsys, "version") == (0, f"usbipy {__version__} (USB/IP protocol 1.1.1)\n",
                                         "")
    rc, out, _ = usbipy(capsys, "version", "--json")
    assert rc == 0 and json.loads(out) == {"version": __version__, "protocol": "1.1.1"}
    # -d: what the client does, on stderr
    rc, _, err = usbipy(capsys, "-d", "-t", str(_closed_port()), "list", "-r", "127.0.0.1")
    assert rc == 1 and "usbipy: DEBUG: connecting to 127.0.0.1:" in err
    # -l without a system log says so
    monkeypatch.setattr(cli, "SYSLOG", str(tmp_path / "no-log"))
    rc, _, err = usbipy(capsys, "-l", "version")
    assert rc == 1 and err == f"usbipy: error: -l: no syslog here ({tmp_path}/no-log is missing)\n"


def test_usbipyd_daemon_returns_with_its_pid_file_written(tmp_path: Path) -> None:
    """As systemd's Type=forking with PIDFile= expects: when `usbipyd -D -P FILE`
    returns, FILE holds the daemon's id."""
    import signal
    import subprocess
    import sys
    import time

    pid_file = tmp_path / "usbipyd.pid"
    subprocess.run([sys.executable, "-m", "usbipy.cli.usbipyd", "-c", os.devnull, "--demo",
                    "--disk-size", "1048576", "-t", "0", "--no-usbip-host", "--no-libusb",
                    "-D", "-P", str(pid_file)], check=True, timeout=60, capture_output=True)
    pid = int(pid_file.read_text())
    try:
        assert Path(f"/proc/{pid}/cmdline").read_bytes().find(b"usbipyd") >= 0
    finally:
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 30
    while pid_file.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not pid_file.exists()  # removed at exit


@pytest.mark.parametrize("option", ["--no-resume", "--background", "--retries=3"])
def test_keeper_options_without_persistent_are_one_line_errors(fake: FakeSysfs, capsys,
                                                               option: str) -> None:
    fake.load_vhci()
    rc, out, err = usbipy(capsys, "attach", "-r", "127.0.0.1", "-b", "1-1", option)
    name = option.split("=")[0]
    assert (rc, out) == (1, "")
    assert err.count("\n") == 1 and f"{name} is for --persistent attachments" in err, err


# --- bind --device: export rules ----------------------------------------------------------


def test_bind_by_ids_records_a_rule_and_binds_what_it_matches_now(
        fake: FakeSysfs, capsys, state: Path) -> None:
    local_devices(fake)
    host = fake.load_usbip_host()
    rc, out, err = usbipy(capsys, "bind", "--device", "46f4:0001")
    assert (rc, err) == (0, "")
    assert out == ("usbipy: info: bind device on busid 1-1: complete\n"
                   "usbipy: info: bind 46f4:0001 for export through usbip-host: complete\n")
    assert (host / "bind").read_text() == "1-1"
    assert json.loads(state.read_text())["export"] == [
        {"vid_pid": "46f4:0001", "via": "usbip-host"}]
    fake.set_driver("1-1", "usbip-host")
    rc, out, _ = usbipy(capsys, "list", "-l", "--json")
    rule = {d["busid"]: d["rule"] for d in json.loads(out)}["1-1"]
    assert rule["where"] == "usbipy bind" and rule["export"] == "usbip-host"
    # by hand: stays unbound (usbipyd does not take it back) until it is replugged
    rc, out, _ = usbipy(capsys, "unbind", "-b", "1-1")
    assert rc == 0 and "1-1 stays unbound until it is plugged in again (usbipy bind)" in out
    devnum = int((fake.devices / "1-1" / "devnum").read_text())
    [held] = json.loads(state.read_text())["unbound"]
    assert (held["busid"], held["devnum"]) == ("1-1", devnum)
    fake.set_driver("1-1", "usb")
    rc, out, _ = usbipy(capsys, "list", "-l")
    assert "not exported: unbound by hand until replugged (usbipy bind)" in out
    rc, out, _ = usbipy(capsys, "bind", "-b", "1-1")  # (bound by hand again: released)
    assert json.loads(state.read_text())["unbound"] == []
    fake.set_driver("1-1", "usbip-host")
    (host / "unbind").write_text("")
    rc, out, _ = usbipy(capsys, "--json", "unbind", "--device", "46f4:0001")
    assert rc == 0 and json.loads(out) == {"rule": "46f4:0001", "export": None,
                                           "given_back": ["1-1"]}
    assert (host / "unbind").read_text() == "1-1"
    assert json.loads(state.read_text())["export"] == []


def test_a_configured_rule_shows_in_list_and_is_not_removed_by_unbind(
        fake: FakeSysfs, capsys, state: Path, tmp_path: Path) -> None:
    local_devices(fake)
    config = tmp_path / "usbipyd.toml"
    config.write_text('port = 3240\n\n[[export]]\nvid_pid = "1209:*"\nvia = "libusb"\n')
    rc, out, _ = usbipy(capsys, "list", "-l", "-c", str(config))
    assert rc == 0 and ("Test PID 2 (1209:0002)\n   exported through libusb by rule: "
                        "usbipyd.toml line 3\n") in out
    rc, _, err = usbipy(capsys, "unbind", "--device", "1209:*", "-c", str(config))
    assert rc == 1 and err == ("usbipy: error: 1209:* is exported by usbipyd.toml line 3: "
                               "remove that rule there (then 'kill -HUP' usbipyd)\n")
    config.write_text('[[export]]\nvid_pid = "1209"\n')
    rc, _, err = usbipy(capsys, "list", "-l", "-c", str(config))
    assert rc == 1 and err.count("\n") == 1 and f"{config}:2: export[1].vid_pid" in err


def test_a_rule_for_the_device_this_machine_runs_from_is_refused(
        fake: FakeSysfs, capsys, state: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from usbipy.linux import rootdev

    local_devices(fake)
    fake.load_usbip_host()
    monkeypatch.setattr(rootdev, "root_busids", lambda mounts=rootdev.MOUNTS: {"1-1": "/"})
    for args in (["bind", "--device", "46f4:0001"], ["bind", "--libusb", "-b", "1-1"],
                 ["bind", "--libusb", "--device", "46f4:*"]):
        rc, _, err = usbipy(capsys, *args)
        assert rc == 1 and err == ("usbipy: error: 1-1 (46f4:0001) holds the root file "
                                   "system (/), that this machine runs from: it is never "
                                   "exported\n"), (args, err)
    assert not state.exists()  # (no rule recorded)
    assert (fake.drivers / "usbip-host/bind").read_text() == ""


def test_a_bind_that_fails_records_no_rule_and_a_failed_unbind_keeps_its_hold(
        fake: FakeSysfs, capsys, state: Path) -> None:
    local_devices(fake)
    rc, _, err = usbipy(capsys, "bind", "--device", "46f4:0001")  # (usbip-host not loaded)
    assert rc == 1 and "usbip-host driver is not loaded" in err
    assert json.loads(state.read_text())["export"] == []
    fake.load_usbip_host()
    rc, _, err = usbipy(capsys, "bind", "--device", "46f4:0001")  # (run again: it works)
    assert rc == 0, err
    fake.set_driver("1-1", "usbip-host")
    rc, _, _ = usbipy(capsys, "unbind", "-b", "1-1")
    assert rc == 0 and len(json.loads(state.read_text())["unbound"]) == 1
    fake.set_driver("1-1", "usb")
    rc, _, err = usbipy(capsys, "unbind", "-b", "1-1")  # (not bound: an error...)
    assert rc == 1 and "not bound to usbip-host" in err
    assert len(json.loads(state.read_text())["unbound"]) == 1  # (...that keeps the hold)


def test_attach_by_ids_without_r_finds_the_server_by_dns_sd(fake: FakeSysfs, capsys,
                                                            server: ServerThread,
                                                            monkeypatch) -> None:
    from usbipy.discovery import browse as browse_module
    from usbipy.discovery.records import SERVICE_TYPE, Found

    hc = fake.load_vhci()
    found = [Found(f"lab1.{SERVICE_TYPE}", "lab1", ("127.0.0.1",), server.port, False,
                   "1.1.1"),
             Found(f"lab9.{SERVICE_TYPE}", "lab9", ("127.0.0.1",), 9, True, "1.1.1")]

    async def browsed(seconds: float) -> list[Found]:
        return list(found)

    monkeypatch.setattr(browse_module, "browse", browsed)
    # (lab9 requires TLS, and no TLS files are given: it is not asked)
    rc, out, err = usbipy(capsys, "--json", "attach", "--device", "1209:0002:MSC00000001")
    assert rc == 0, err
    result = json.loads(out)
    assert (result["host"], result["tcp_port"], result["busid"]) == (
        "127.0.0.1", server.port, "1-2")
    assert (hc / "attach").read_text().split()[0] == "0"
    # a device two servers offer is taken from neither
    found[1] = dataclasses.replace(found[0], instance=f"copy.{SERVICE_TYPE}", name="copy")
    rc, _out, err = usbipy(capsys, "attach", "--device", "1209:0001")
    assert rc == 1
    assert "2 servers offer 1209:0001: lab1 (127.0.0.1:" in err and "(give -r HOST" in err
    found.clear()
    rc, _out, err = usbipy(capsys, "attach", "--device", "1209:0001")
    assert rc == 1 and "no usbipy server without TLS found on the network by DNS-SD" in err
