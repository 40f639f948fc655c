"""Export rules, where `usbipy bind` records its own, and the engine that applies
them as devices come and go (a fake host: the real sysfs and udev are the
kernel tests')."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import pytest

from usbipy.config import ConfigError
from usbipy.config import file as config_file
from usbipy.errors import UsbipError
from usbipy.exports.engine import ExportEngine, HotplugEvent
from usbipy.exports.rules import ExportRule, ExportRules, PluggedDevice, Via, parse_device_spec
from usbipy.exports.store import RuleStore, StoreError
from usbipy.linux import rootdev, sysfs
from usbipy.policy import DeviceSelector

from .fake_sysfs import FakeSysfs

STICK = PluggedDevice("1-1", 0x46F4, 0x0001, "SER1", 0, (8,), devnum=2, driver="usb")
DFU = PluggedDevice("1-2", 0x0483, 0xDF11, "PROBE", 0, (0xFE,), devnum=3, driver=None)
APP = PluggedDevice("1-2", 0x0483, 0x374B, "PROBE", 0xEF, (2, 0x0A, 8), devnum=4, driver="usb")
HUB = PluggedDevice("1-3", 0x0409, 0x55AA, None, 9, (9,), devnum=5, driver="hub")


def rule(via: Via = Via.USBIP_HOST, where: str = "", interface_class: tuple[int, ...] = (),
         **fields: Any) -> ExportRule:
    return ExportRule(DeviceSelector(**fields), via, interface_class, where)


# --- rules -----------------------------------------------------------------------------


def test_a_rule_matches_by_ids_with_wildcards_and_lists() -> None:
    probes = rule(vid_pid=("0483:df11", "0483:374?"))
    assert probes.matches(DFU) and probes.matches(APP) and not probes.matches(STICK)
    assert rule(vid_pid=("0483:*",)).matches(APP)
    assert rule(vid_pid=("0483:DF11",)).matches(DFU)  # (hex in either case)


def test_a_rule_matches_by_serial_port_path_and_interface_class() -> None:
    assert rule(serial=("PROBE",)).matches(APP) and not rule(serial=("X",)).matches(APP)
    assert rule(busid=("1-*",)).matches(STICK) and not rule(busid=("2-*",)).matches(STICK)
    assert rule(interface_class=(8,)).matches(STICK)
    assert rule(interface_class=(8,)).matches(APP)  # (one of its interfaces)
    assert rule(interface_class=(0xEF,)).matches(APP)  # (its device class)
    assert not rule(interface_class=(3,)).matches(STICK)
    both = rule(vid_pid=("46f4:0001",), serial=("SER2",))  # every field must match
    assert not both.matches(STICK)


def test_the_first_rule_that_matches_decides_and_a_hub_is_never_exported() -> None:
    rules = ExportRules([rule(Via.LIBUSB, "a", vid_pid=("0483:*",)),
                         rule(Via.USBIP_HOST, "b", busid=("1-*",))])
    chosen = rules.rule_for(APP)
    assert chosen is not None and chosen.where == "a" and chosen.via is Via.LIBUSB
    assert rules.rule_for(HUB) is None  # (1-* names it, but a hub's children are the devices)


@pytest.mark.parametrize("spec, expected", [
    ("0483:DF11", ("0483:df11", None)),
    ("0483:df11:ABC:1", ("0483:df11", "ABC:1")),  # (a serial may hold a colon)
    ("0483:*", ("0483:*", None)),
])
def test_a_device_spec_parses(spec: str, expected: tuple[str, str | None]) -> None:
    assert parse_device_spec(spec) == expected


@pytest.mark.parametrize("spec", ["0483", "483:df11", "0483:df1x", "1-1", ""])
def test_a_bad_device_spec_says_what_is_expected(spec: str) -> None:
    with pytest.raises(ValueError, match="expected VID:PID"):
        parse_device_spec(spec)


def test_a_rule_for_a_device_spec_says_its_spec_back() -> None:
    written = ExportRule.for_device("0483:DF11:PROBE", Via.LIBUSB)
    assert written.spec == "0483:df11:PROBE" and written.matches(DFU)
    assert str(written) == "export vid_pid=0483:df11 serial=PROBE via libusb"


# --- the store -------------------------------------------------------------------------


def test_the_store_keeps_rules_and_devices_unbound_by_hand(tmp_path: Path) -> None:
    store = RuleStore(tmp_path)
    probe = ExportRule.for_device("0483:df11:PROBE", Via.LIBUSB)
    stick = ExportRule.for_device("46f4:0001")
    store.add(probe)
    store.add(stick)
    store.hold("1-1", 7)
    again = RuleStore(tmp_path).load()  # (another process reads the same)
    assert list(again.rules) == [probe, stick]
    assert again.unbound == {"1-1": 7}
    assert all(r.where == "usbipy bind" for r in again.rules)
    with pytest.raises(StoreError, match="already a rule"):
        store.add(stick)
    store.remove(stick)
    store.release("1-1")
    assert list(store.load().rules) == [probe] and store.load().unbound == {}
    with pytest.raises(StoreError, match="not a rule"):
        store.remove(stick)


def test_the_old_libusb_bindings_are_read_as_libusb_rules(tmp_path: Path) -> None:
    (tmp_path / "libusb-bindings.json").write_text(json.dumps(
        {"libusb": [{"busid": "2-1"}, {"vid": 0x1D6B, "pid": 0x104, "serial": "S"}]}))
    store = RuleStore(tmp_path)
    rules = list(store.load().rules)
    assert [r.via for r in rules] == [Via.LIBUSB, Via.LIBUSB]
    assert rules[0].device.busid == ("2-1",) and rules[1].spec == "1d6b:0104:S"
    store.add(ExportRule.for_device("46f4:0001"))  # (written to the new file: old one gone)
    assert not (tmp_path / "libusb-bindings.json").exists()
    assert len(RuleStore(tmp_path).load().rules) == 3


def test_a_hold_from_another_boot_is_void(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                           ) -> None:
    from usbipy.exports import store as store_mod

    boot = tmp_path / "boot_id"
    boot.write_text("one\n")
    monkeypatch.setattr(store_mod, "BOOT_ID", boot)
    RuleStore(tmp_path).hold("1-1", 5)
    assert RuleStore(tmp_path).load().unbound == {"1-1": 5}
    boot.write_text("two\n")  # (restarted: the same port may give the same address)
    assert RuleStore(tmp_path).load().unbound == {}


def test_a_damaged_store_is_an_error_that_names_it(tmp_path: Path) -> None:
    (tmp_path / "exports.json").write_text("{not json")
    with pytest.raises(StoreError, match="exports.json"):
        RuleStore(tmp_path).load()


# --- the engine ------------------------------------------------------------------------


class FakeHost:
    """What is plugged in, and what the engine bound and unbound."""

    def __init__(self, *devices: PluggedDevice, stub: bool = True) -> None:
        self.plugged = {d.busid: d for d in devices}
        self.calls: list[tuple[str, str]] = []
        self.stub = stub
        self.root: dict[str, str] = {}

    def devices(self) -> list[PluggedDevice]:
        return list(self.plugged.values())

    def read(self, busid: str) -> PluggedDevice | None:
        return self.plugged.get(busid)

    def _driver(self, busid: str, driver: str | None) -> None:
        d = self.plugged[busid]
        self.plugged[busid] = PluggedDevice(d.busid, d.vendor, d.product, d.serial,
                                            d.device_class, d.interface_classes, d.devnum,
                                            driver)

    def bind(self, busid: str) -> None:
        self.calls.append(("bind", busid))
        self._driver(busid, "usbip-host")

    def unbind(self, busid: str) -> None:
        self.calls.append(("unbind", busid))
        self._driver(busid, "usb")

    def stub_loaded(self) -> bool:
        return self.stub

    def protected(self) -> dict[str, str]:
        return self.root

    def plug(self, device: PluggedDevice) -> HotplugEvent:
        self.plugged[device.busid] = device
        return HotplugEvent("add", device.busid)

    def unplug(self, busid: str) -> HotplugEvent:
        del self.plugged[busid]
        return HotplugEvent("remove", busid)


def engine_for(host: FakeHost, *rules: ExportRule, tmp_path: Path | None = None,
               gone: list[str] | None = None) -> tuple[ExportEngine, list[ExportRule]]:
    current = list(rules)
    store = RuleStore(tmp_path) if tmp_path is not None else None
    engine = ExportEngine(lambda: ExportRules(current), store=store, host=host,
                          gone=gone.append if gone is not None else None)
    return engine, current


def run(coro: object) -> None:
    asyncio.run(coro)  # type: ignore[arg-type]


def test_devices_plugged_in_at_start_are_bound_by_rule_and_others_left_alone() -> None:
    host = FakeHost(STICK, APP, HUB)
    engine, _ = engine_for(host, rule(vid_pid=("46f4:0001",), where="usbipyd.toml line 3"),
                           rule(busid=("1-3",)))

    async def go() -> None:
        await engine.start()

    run(go())
    assert host.calls == [("bind", "1-1")]  # (APP: no rule; the hub: never)
    assert engine.bound["1-1"][1].where == "usbipyd.toml line 3"
    engine.close()


def test_a_libusb_rule_binds_nothing_and_a_missing_stub_is_said(
        caplog: pytest.LogCaptureFixture) -> None:
    host = FakeHost(STICK, APP, stub=False)
    engine, _ = engine_for(host, rule(Via.LIBUSB, vid_pid=("0483:*",)),
                           rule(vid_pid=("46f4:*",)))
    run(engine.start())
    assert host.calls == []
    assert "exported through libusb" in caplog.text
    assert "usbip-host driver is not loaded" in caplog.text
    engine.close()


def test_a_device_plugged_in_at_another_port_is_bound_as_it_appears() -> None:
    host = FakeHost()
    gone: list[str] = []
    engine, _ = engine_for(host, rule(vid_pid=("46f4:0001",)), gone=gone)

    async def go() -> None:
        await engine.start()
        await engine.event(host.plug(STICK))
        await engine.event(host.unplug("1-1"))
        moved = PluggedDevice("2-4.1", STICK.vendor, STICK.product, STICK.serial, 0, (8,),
                              devnum=9, driver=None)
        await engine.event(host.plug(moved))

    run(go())
    assert host.calls == [("bind", "1-1"), ("bind", "2-4.1")]
    assert gone == ["1-1"] and engine.departures == 1
    engine.close()


def test_a_dfu_update_that_re_enumerates_is_followed_when_the_rule_lists_both_ids() -> None:
    host = FakeHost(APP)
    engine, _ = engine_for(host, rule(vid_pid=("0483:374b", "0483:df11"), serial=("PROBE",)))

    async def go() -> None:
        await engine.start()
        await engine.event(host.unplug("1-2"))  # reset into the bootloader...
        await engine.event(host.plug(DFU))
        await engine.event(host.unplug("1-2"))  # ...and back
        await engine.event(host.plug(PluggedDevice(**{**APP.__dict__, "devnum": 6})))

    run(go())
    assert host.calls == [("bind", "1-2")] * 3
    engine.close()


def test_an_unbind_by_hand_is_respected_until_the_device_is_plugged_in_again() -> None:
    host = FakeHost(STICK)
    engine, _ = engine_for(host, rule(vid_pid=("46f4:0001",)))

    async def go() -> None:
        await engine.start()
        host._driver("1-1", "usb")  # `usbip unbind -b 1-1`: the kernel's events follow
        await engine.event(HotplugEvent("unbind", "1-1"))  # (it names no driver)
        await engine.event(HotplugEvent("bind", "1-1", "usb"))
        await asyncio.sleep(0.7)  # (past UNBIND_SETTLE: no "remove" came)
        await engine.event(HotplugEvent("bind", "1-1", "usb"))
        await engine.reload()  # (SIGHUP: still left alone)
        await engine.event(host.unplug("1-1"))
        await engine.event(host.plug(PluggedDevice(**{**STICK.__dict__, "devnum": 8})))

    run(go())
    assert host.calls == [("bind", "1-1"), ("bind", "1-1")]  # (again only once replugged)
    engine.close()


def test_the_unbind_of_the_driver_usbip_host_took_it_from_is_not_one_by_hand() -> None:
    host = FakeHost(STICK)
    engine, _ = engine_for(host, rule(vid_pid=("46f4:0001",)))

    async def go() -> None:
        await engine.start()
        await engine.event(HotplugEvent("unbind", "1-1"))  # ("usb", let go by the bind)
        await asyncio.sleep(0.7)

    run(go())
    assert list(engine.bound) == ["1-1"] and engine.held == {}
    engine.close()


def test_the_unbind_an_unplug_sends_is_not_taken_for_one_by_hand(
        caplog: pytest.LogCaptureFixture) -> None:
    host = FakeHost(STICK)
    engine, _ = engine_for(host, rule(vid_pid=("46f4:0001",)))

    async def go() -> None:
        await engine.start()
        await engine.event(HotplugEvent("unbind", "1-1", "usbip-host"))
        await engine.event(host.unplug("1-1"))
        await asyncio.sleep(0.7)
        await engine.event(host.plug(STICK))  # (same address: a fake host's freedom)

    run(go())
    assert host.calls == [("bind", "1-1"), ("bind", "1-1")]
    assert engine.held == {} and engine.departures == 1
    assert "by hand" not in caplog.text
    engine.close()


def test_an_unbind_the_store_records_survives_a_restart(tmp_path: Path) -> None:
    RuleStore(tmp_path).hold("1-1", STICK.devnum)  # (`usbipy unbind -b 1-1` wrote it)
    host = FakeHost(STICK)
    engine, _ = engine_for(host, rule(vid_pid=("46f4:0001",)), tmp_path=tmp_path)
    run(engine.start())
    assert host.calls == []
    engine.close()


def test_a_reload_that_removes_a_rule_gives_its_devices_back() -> None:
    host = FakeHost(STICK, APP)
    engine, rules = engine_for(host, rule(vid_pid=("46f4:0001",)),
                               rule(vid_pid=("0483:374b",)))

    async def go() -> None:
        await engine.start()
        del rules[0]
        await engine.reload()

    run(go())
    assert host.calls == [("bind", "1-1"), ("bind", "1-2"), ("unbind", "1-1")]
    assert list(engine.bound) == ["1-2"]
    engine.close()


def test_the_device_that_holds_the_root_file_system_is_never_bound(
        caplog: pytest.LogCaptureFixture) -> None:
    host = FakeHost(STICK)
    host.root = {"1-1": "/"}
    engine, _ = engine_for(host, rule(busid=("1-*",)))
    run(engine.start())
    assert host.calls == [] and "it holds the root file system (/)" in caplog.text
    engine.close()


def test_a_failed_bind_waits_for_the_devices_next_event() -> None:
    host = FakeHost(STICK)
    fail = [True]

    def bind(busid: str) -> None:
        if fail.pop(0) if fail else False:
            raise UsbipError("Device or resource busy")
        FakeHost.bind(host, busid)

    host.bind = bind  # type: ignore[method-assign]
    engine, _ = engine_for(host, rule(vid_pid=("46f4:0001",)))

    async def go() -> None:
        await engine.start()  # (still being probed: busy)
        assert engine.bound == {}
        await engine.event(HotplugEvent("bind", "1-1", "usb"))  # (probed: now)

    run(go())
    assert list(engine.bound) == ["1-1"]
    engine.close()


# --- the root file system's device -----------------------------------------------------


def test_the_usb_device_under_a_mount_is_found(tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    root = tmp_path / "sys"
    monkeypatch.setattr(sysfs, "SYSFS_ROOT", root)
    dev = os.stat(tmp_path).st_dev
    disk = root / "devices/pci0000:00/0000:00:14.0/usb2/2-1/2-1.4/2-1.4:1.0/host0" \
        "/target0:0:0/0:0:0:0/block/sda"
    (disk / "sda1").mkdir(parents=True)
    (root / "dev/block").mkdir(parents=True)
    os.symlink(disk / "sda1", root / f"dev/block/{os.major(dev)}:{os.minor(dev)}")
    assert rootdev.root_busids((str(tmp_path),)) == {"2-1": str(tmp_path),
                                                     "2-1.4": str(tmp_path)}
    assert rootdev.root_busids(("/nonexistent",)) == {}


# --- [[export]] in the configuration ------------------------------------------------------

CONFIG = """\
[names]
probe = { vid_pid = "0483:374b" }

[[export]]
vid_pid = ["0483:df11", "0483:374b"]
serial = "PROBE*"

[[export]]
name = "probe"
via = "libusb"

[[export]]
busid = "3-*"
interface_class = [0x08, 0xff]
"""


def test_export_rules_are_read_in_order_with_their_lines(fake: FakeSysfs, tmp_path: Path
                                                         ) -> None:
    path = tmp_path / "usbipyd.toml"
    path.write_text(CONFIG)
    rules = list(config_file.load(path).exports)
    assert [r.via for r in rules] == [Via.USBIP_HOST, Via.LIBUSB, Via.USBIP_HOST]
    assert [r.where for r in rules] == ["usbipyd.toml line 4", "usbipyd.toml line 8",
                                       "usbipyd.toml line 12"]
    assert rules[0].matches(APP) and rules[0].matches(DFU)
    assert rules[1].matches(APP) and not rules[1].matches(DFU)
    assert rules[2].interface_class == (8, 0xFF)
    assert str(rules[2]) == ("export busid=3-* interface_class=08|ff via usbip-host "
                             "(usbipyd.toml line 12)")


def test_a_rule_that_would_export_a_plugged_in_hub_is_refused(fake: FakeSysfs,
                                                               tmp_path: Path) -> None:
    fake.add_device("1-1", 0x46F4, 0x0001)
    fake.add_device("1-3", 0x0409, 0x55AA, device_class=9, interfaces=((9, 0, 0),),
                    driver="hub")
    path = tmp_path / "usbipyd.toml"
    path.write_text('[[export]]\nvid_pid = "46f4:0001"\n\n[[export]]\nbusid = "1-*"\n')
    with pytest.raises(ConfigError) as caught:
        config_file.load(path)
    assert str(caught.value) == (
        f"{path}:4: export[2]: would export the hub at 1-3 (0409:55aa): a hub cannot be "
        "exported (name its devices, not the hub)")


def test_a_rule_that_would_export_the_root_file_systems_device_is_refused(
        fake: FakeSysfs, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake.add_device("2-1", 0x0781, 0x5583)
    (fake.root / "bus/usb/devices/2-1").resolve().joinpath("serial").write_text("ROOTDISK\n")
    monkeypatch.setattr(rootdev, "root_busids", lambda mounts=rootdev.MOUNTS: {"2-1": "/"})
    path = tmp_path / "usbipyd.toml"
    path.write_text('[[export]]\ninterface_class = 0x08\n')
    with pytest.raises(ConfigError, match=r"usbipyd.toml:1: export\[1\]: would export 2-1 "
                                          r"\(0781:5583 serial ROOTDISK\), which holds the "
                                          r"root file system \(/\), that this machine runs "
                                          "from"):
        config_file.load(path)


# --- libusb's hotplug callbacks, where pyudev is missing ------------------------------------


def test_libusb_hotplug_callbacks_reach_the_loop_as_events() -> None:
    import threading

    pytest.importorskip("usb1")
    from usbipy.backends.libusb.events import usb1
    from usbipy.exports.hotplug import LibusbWatcher

    from .fake_usb1 import FakeDevice

    class Context:
        def __init__(self) -> None:
            self.callbacks: list[Any] = []

        def hotplugRegisterCallback(self, callback: Any, events: int, flags: int) -> int:
            self.callbacks.append(callback)
            return 7

        def hotplugDeregisterCallback(self, handle: int) -> None:
            assert handle == 7
            self.callbacks.clear()

    class Events:
        def __init__(self) -> None:
            self.context = context
            self.closed = False

        def close(self) -> None:
            self.closed = True

    context = Context()
    events = Events()

    async def go() -> list[HotplugEvent]:
        seen: list[HotplugEvent] = []
        watcher = LibusbWatcher(events, seen.append)
        watcher.start()
        [callback] = context.callbacks
        # (libusb calls from its event thread)
        for event in (usb1.HOTPLUG_EVENT_DEVICE_ARRIVED, usb1.HOTPLUG_EVENT_DEVICE_LEFT):
            thread = threading.Thread(target=callback, args=(context, FakeDevice(), event))
            thread.start()
            thread.join()
        for _ in range(100):
            if len(seen) == 2:
                break
            await asyncio.sleep(0.01)
        watcher.close()
        assert context.callbacks == [] and events.closed
        return seen

    busid = "2-3.1"  # (FakeDevice's place)
    assert asyncio.run(go()) == [HotplugEvent("add", busid), HotplugEvent("remove", busid)]


def test_an_unplug_while_an_unbind_settles_and_is_read_leaves_no_error() -> None:
    import time as time_mod

    host = FakeHost(STICK)
    slow = [False]
    read = host.read

    def slow_read(busid: str) -> PluggedDevice | None:
        if slow[0]:
            time_mod.sleep(0.3)
        return read(busid)

    host.read = slow_read  # type: ignore[method-assign]
    engine, _ = engine_for(host, rule(vid_pid=("46f4:0001",)))

    async def go() -> None:
        await engine.start()
        slow[0] = True
        await engine.event(HotplugEvent("unbind", "1-1"))
        await asyncio.sleep(0.6)  # (settled: its read of sysfs is under way)
        pending = list(engine._tasks)
        assert pending
        await engine.event(host.unplug("1-1"))
        await asyncio.gather(*pending)  # (raises what the task raised)

    run(go())
    assert engine.bound == {} and engine.held == {} and engine.departures == 1
    engine.close()


def test_libusb_exports_only_what_a_libusb_rule_matches_first_and_reads_serials_lazily(
        ) -> None:
    from usbipy.backends.libusb.source import rule_for as libusb_rule

    probe = rule(Via.USBIP_HOST, "a", vid_pid=("0483:*",))
    sticks = rule(Via.LIBUSB, "b", interface_class=(8,))
    by_serial = rule(Via.LIBUSB, "c", vid_pid=("46f4:0001",), serial=("SER1",))
    reads: list[str] = []

    def serial(value: str | None) -> Any:
        def read() -> str | None:
            reads.append("read")
            return value
        return read

    rules = ExportRules([probe, sticks])
    # APP has a mass-storage interface, but its first rule says usbip-host
    assert libusb_rule(rules, APP, serial(None)) is None
    assert libusb_rule(rules, STICK, serial(None)) == sticks
    unread = dataclasses.replace(STICK, serial=None)
    assert libusb_rule(ExportRules([by_serial]), unread, serial("SER1")) == by_serial
    assert reads == ["read"]
    assert libusb_rule(ExportRules([by_serial]), dataclasses.replace(DFU, serial=None),
                       serial("SER1")) is None
    assert reads == ["read"]  # (other ids: its serial was never read)


def test_the_status_page_names_the_rule_that_exports_each_device(fake: FakeSysfs,
                                                                  tmp_path: Path) -> None:
    from usbipy.exports.admin import rules_of

    fake.add_device("1-1", 0x0483, 0x374B)
    fake.add_device("1-2", 0x046D, 0xC31C, interfaces=((3, 1, 1),))
    fake.add_device("2-1", 0x0781, 0x5583, interfaces=((8, 6, 0x50),))
    path = tmp_path / "usbipyd.toml"
    path.write_text('[[export]]\nvid_pid = "0483:374b"\n\n[[export]]\ninterface_class = 8\n'
                    'via = "libusb"\n')
    rules = config_file.load(path).exports
    assert rules_of(rules, ["1-1", "1-2", "2-1"]) == {
        "1-1": "usbipyd.toml line 1", "2-1": "usbipyd.toml line 4"}
    assert rules_of(rules, ["1-2"]) == {}
