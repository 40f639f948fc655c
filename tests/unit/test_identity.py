"""Attach by identity: a device named by VID:PID[:SERIAL], looked up on one server or
several, at whatever busid it has; through the CLI (vhci-hcd faked), the asyncio
client and the PyUSB backend."""

from __future__ import annotations

import asyncio
import dataclasses
import json
from collections.abc import Iterator, Sequence

import pytest

from usbipy.cli import usbipy as cli
from usbipy.client import import_device
from usbipy.client.errors import ClientError, ImportRefused
from usbipy.client.identity import DeviceSpec, NoMatch, SeveralMatches, find
from usbipy.devices import CdcAcm, HidKeyboard
from usbipy.protocol import DeviceInfo, OpStatus, Speed
from usbipy.server import ServerThread
from usbipy.usb.descriptors import Device

from .fake_sysfs import FakeSysfs

HOST = "127.0.0.1"


def info(busid: str, vid: int, pid: int) -> DeviceInfo:
    return DeviceInfo(path=f"/sys/x/{busid}", busid=busid, busnum=1, devnum=2,
                      speed=Speed.FULL, idVendor=vid, idProduct=pid, bcdDevice=0x100,
                      bDeviceClass=0, bDeviceSubClass=0, bDeviceProtocol=0,
                      bConfigurationValue=1, bNumConfigurations=1, bNumInterfaces=0,
                      interfaces=())


class Servers:
    """Device lists and serials of fake servers; what was asked of them."""

    def __init__(self, lists: dict[str, Sequence[DeviceInfo] | Exception],
                 serials: dict[tuple[str, str], str | None | Exception]) -> None:
        self.lists = lists
        self.serials = serials
        self.probed: list[tuple[str, str]] = []

    def list_devices(self, host: str, port: int) -> Sequence[DeviceInfo]:
        found = self.lists[host]
        if isinstance(found, Exception):
            raise found
        return found

    def read_serial(self, host: str, port: int, busid: str) -> str | None:
        self.probed.append((host, busid))
        found = self.serials[(host, busid)]
        if isinstance(found, Exception):
            raise found
        return found

    def find(self, hosts: list[str], spec: str, first: bool = False) -> tuple[str, str]:
        found = find([(h, 3240) for h in hosts], DeviceSpec.parse(spec), first=first,
                     list_devices=self.list_devices, read_serial=self.read_serial)
        return found.host, found.busid


def test_the_first_server_that_offers_a_match_serves_it() -> None:
    servers = Servers({"a": [info("1-1", 0x1234, 1)], "b": [info("2-3.1", 0x0483, 0xDF11)],
                       "c": [info("1-1", 0x0483, 0xDF11)]}, {})
    assert servers.find(["a", "b", "c"], "0483:df11") == ("b", "2-3.1")
    assert servers.find(["a", "c", "b"], "0483:DF11") == ("c", "1-1")
    assert servers.find(["a"], "12??:0001") == ("a", "1-1")  # (wildcards, as in rules)


def test_several_matches_are_an_error_that_names_them_unless_the_first_is_asked_for() -> None:
    servers = Servers({"a": [info("1-1", 0x0483, 0xDF11), info("1-4", 0x0483, 0xDF11)]}, {})
    with pytest.raises(SeveralMatches) as caught:
        servers.find(["a"], "0483:df11")
    assert str(caught.value) == ("2 devices on a:3240 match 0483:df11: 1-1 (0483:df11), "
                                 "1-4 (0483:df11) (give a serial, a bus id with -b, or --first)")
    assert servers.find(["a"], "0483:df11", first=True) == ("a", "1-1")


def test_a_serial_is_read_from_each_candidate_and_picks_one() -> None:
    servers = Servers(
        {"a": [info("1-1", 0x0483, 0xDF11), info("1-4", 0x0483, 0xDF11),
               info("1-5", 0x1234, 1)]},
        {("a", "1-1"): "AAA", ("a", "1-4"): "BBB"})
    assert servers.find(["a"], "0483:df11:BBB") == ("a", "1-4")
    assert servers.probed == [("a", "1-1"), ("a", "1-4")]  # (not 1-5: other ids)


def test_no_match_names_the_servers_and_why_some_did_not_answer() -> None:
    servers = Servers(
        {"a": ClientError("a:3240: connection refused"), "b": [info("1-1", 0x0483, 0xDF11)]},
        {("b", "1-1"): ImportRefused("1-1", OpStatus.DEV_BUSY)})
    with pytest.raises(NoMatch) as caught:
        servers.find(["a", "b"], "0483:df11:SER")
    # (a device another client holds is not a failure: it is not ours to take)
    assert str(caught.value) == ("no device 0483:df11:SER on a:3240, b:3240 (a:3240: a:3240: "
                                 "connection refused)")


def test_a_bad_spec_is_one_line() -> None:
    with pytest.raises(ClientError, match="expected VID:PID"):
        DeviceSpec.parse("1-1")


# --- against a server -------------------------------------------------------------------


def keyboard(serial: str) -> HidKeyboard:
    class Keyboard(HidKeyboard):
        descriptor: Device = dataclasses.replace(HidKeyboard.descriptor, serial_number=serial)

    return Keyboard()


@pytest.fixture
def two() -> Iterator[tuple[ServerThread, ServerThread]]:
    """Server one: keyboards KBD-A and KBD-B and a serial port; server two: KBD-C."""
    with ServerThread([keyboard("KBD-A"), keyboard("KBD-B"), CdcAcm()], port=0) as one, \
            ServerThread([keyboard("KBD-C")], port=0) as other:
        yield one, other


def usbipy(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    rc = cli.main(list(args))
    out, err = capsys.readouterr()
    return rc, out, err


def test_the_cli_attaches_by_ids_and_serial_from_the_server_that_has_it(
        fake: FakeSysfs, capsys: pytest.CaptureFixture[str],
        two: tuple[ServerThread, ServerThread]) -> None:
    one, other = two
    hc = fake.load_vhci()
    first, second = f"{HOST}:{one.port}", f"{HOST}:{other.port}"
    rc, out, err = usbipy(capsys, "--json", "attach", "-r", first, "-r", second,
                          "--device", "1209:0001:KBD-C")
    assert rc == 0, err
    result = json.loads(out)
    assert (result["tcp_port"], result["busid"]) == (other.port, "1-1")
    assert (hc / "attach").read_text().split()[2] == str(0x10002)  # (server two's 1-1)
    rc, out, err = usbipy(capsys, "attach", "-r", first, "--device", "1209:0001:KBD-B")
    assert rc == 0 and f"attached 1-2 from {HOST}:{one.port}" in out, err
    rc, _, err = usbipy(capsys, "attach", "-r", first, "--device", "1209:0001:KBD-Z")
    assert rc == 1 and err == f"usbipy: error: no device 1209:0001:KBD-Z on {first}\n"


def test_the_cli_refuses_several_matches_unless_first(
        fake: FakeSysfs, capsys: pytest.CaptureFixture[str],
        two: tuple[ServerThread, ServerThread]) -> None:
    one, _ = two
    fake.load_vhci()
    where = f"{HOST}:{one.port}"
    rc, _, err = usbipy(capsys, "attach", "-r", where, "--device", "1209:0001")
    assert rc == 1 and err.count("\n") == 1
    assert f"2 devices on {where} match 1209:0001: 1-1 (1209:0001), 1-2 (1209:0001)" in err
    rc, out, err = usbipy(capsys, "attach", "-r", where, "--device", "1209:0001", "--first")
    assert rc == 0 and "attached 1-1" in out, err


@pytest.mark.parametrize("args, message", [
    (["-r", "a", "-r", "b", "-b", "1-1"], "-r may repeat only with --device"),
    (["-r", "a", "-b", "1-1", "--first"], "--first is for --device"),
    (["-r", "a", "--device", "1-1"], "bad device '1-1': expected VID:PID[:SERIAL]"),
])
def test_the_cli_says_what_is_wrong_with_the_options(fake: FakeSysfs,
                                                      capsys: pytest.CaptureFixture[str],
                                                      args: list[str], message: str) -> None:
    fake.load_vhci()
    rc, _, err = usbipy(capsys, "attach", *args)
    assert rc == 1 and message in err and err.count("\n") == 1, err


def test_the_asyncio_client_imports_by_identity(two: tuple[ServerThread, ServerThread]) -> None:
    one, _ = two

    async def main() -> str:
        device = await import_device(HOST, port=one.port, device="1209:0001:KBD-B")
        try:
            return device.info.busid
        finally:
            await device.close()

    assert asyncio.run(main()) == "1-2"
    with pytest.raises(ValueError, match="a busid or device="):
        asyncio.run(import_device(HOST, "1-1", one.port, device="1209:0001"))


def test_the_pyusb_backend_takes_ids_in_its_url(two: tuple[ServerThread, ServerThread]
                                                ) -> None:
    usb_core = pytest.importorskip("usb.core")
    import usb.util

    from usbipy import pyusb

    one, _ = two
    backend = pyusb.get_backend(f"usbip://{HOST}:{one.port}/1209:0001:KBD-B")
    devices = list(usb_core.find(find_all=True, backend=backend))
    assert [usb.util.get_string(d, d.iSerialNumber) for d in devices] == ["KBD-B"]
    for d in devices:
        usb.util.dispose_resources(d)
    every = pyusb.get_backend(f"usbip://{HOST}:{one.port}/1209:0001")
    assert len(list(usb_core.find(find_all=True, backend=every))) == 2
    with pytest.raises(ValueError, match="expected VID:PID"):
        pyusb.get_backend(f"usbip://{HOST}/12:zz")
