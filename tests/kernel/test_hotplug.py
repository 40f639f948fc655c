"""Devices that come and go, in the real kernel: QEMU plugs and unplugs USB devices
in the guest (QMP device_add / device_del), usbipyd's export rules bind them as
they appear (udev's netlink events, read through pyudev), and `usbipy attach
--persistent --device` follows them by identity through the real vhci-hcd.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from . import gadgets
from .conftest import require_vm, skip_or_fail
from .guest import KEEPERS, STOP_KEEPERS, WAIT, ext2_image, vhci_nodes, wait_for, wait_output
from .vm import Vm

PYTHON = sys.executable
RUN = "/run/hotplug"
ENV = f"USBIPY_STATE_DIR={RUN}/state"
USBIPY = f"{ENV} {PYTHON} -m usbipy.cli.usbipy"
USBIPYD = f"{ENV} {PYTHON} -m usbipy.cli.usbipyd"
CONFIG = f"{RUN}/usbipyd.toml"
LOG = f"{RUN}/usbipyd.log"
PID = f"{RUN}/usbipyd.pid"
LOOPBACK = "127.0.0.1"
METRICS = "127.0.0.1:9100"
#: QEMU's usb-storage and usb-kbd.
STICK, KEYBOARD = "46f4:0001", "0627:0001"
KNOWN_FILE, KNOWN_TEXT = "hello.txt", "a file on the stick\n"
MODULES = "xhci_pci usbip-host vhci-hcd usb-storage sd_mod ext4 usbhid cdc_acm"
#: The gadget that updates its firmware: the application's ids, then the bootloader's.
APPLICATION, BOOTLOADER = "1209:0005", "1209:df11"


@dataclass
class Rig:
    vm: Vm
    image: Path
    #: QEMU ids of the devices plugged in now (unplugged after each test).
    plugged: list[str] = field(default_factory=list)

    def plug(self, driver: str, port: int, qemu_id: str, **props: str) -> None:
        self.vm.qmp("device_add", driver=driver, bus="xhci.0", port=str(port), id=qemu_id,
                    **props)
        self.plugged.append(qemu_id)

    def plug_stick(self, port: int, serial: str, qemu_id: str) -> None:
        self.plug("usb-storage", port, qemu_id, drive="stick", serial=serial)

    def unplug(self, qemu_id: str) -> None:
        self.vm.qmp("device_del", id=qemu_id)
        self.plugged.remove(qemu_id)
        # (device_del is asynchronous: the next device_add may reuse the port or drive,
        # once the guest let the device go)
        deadline = time.monotonic() + WAIT
        while any(child["name"] == qemu_id for child in self._peripherals()):
            assert time.monotonic() < deadline, f"QEMU did not unplug {qemu_id}"
            time.sleep(0.2)

    def _peripherals(self) -> list[dict[str, str]]:
        children = self.vm.qmp("qom-list", path="/machine/peripheral")
        assert isinstance(children, list)
        return children


def busid_of(vm: Vm, vid_pid: str, serial: str | None = None) -> str:
    """The busid of the local device vid_pid (with that serial), waited for."""
    vid, pid = vid_pid.split(":")
    check = f" && [ \"$(cat $d/serial 2>/dev/null)\" = {serial} ]" if serial else ""
    script = (f"for d in /sys/bus/usb/devices/*; do [ -f $d/idVendor ] && "
              f"[ \"$(cat $d/idVendor):$(cat $d/idProduct)\" = {vid}:{pid} ]{check} && "
              f"case $(readlink -f $d) in *vhci*) ;; *) echo ${{d##*/}};; esac; done; true")
    return wait_output(vm, script).split()[0]


def driver_of(vm: Vm, busid: str) -> str:
    return vm.run(f"basename $(readlink /sys/bus/usb/devices/{busid}/driver) 2>/dev/null"
                  ).out.strip()


def start_usbipyd(vm: Vm, config: str, *options: str) -> None:
    vm.check(f"mkdir -p {RUN}/state && printf '%s' '{config}' > {CONFIG}")
    vm.check(f"({ENV} setsid {PYTHON} -m usbipy.cli.usbipyd -c {CONFIG} -d -P {PID} "
             f"{' '.join(options)} </dev/null >{LOG} 2>&1 &)")
    try:
        wait_for(vm, f"grep -q 'hotplug: udev' {LOG}")
    except AssertionError as exc:
        raise AssertionError(f"usbipyd did not start:\n{vm.run(f'cat {LOG}').out}") from exc


def stop_usbipyd(vm: Vm) -> None:
    vm.run(f"kill $(cat {PID}) 2>/dev/null")
    wait_for(vm, f"[ ! -e {PID} ]")


def diagnostics(vm: Vm) -> str:
    """What the keepers and usbipyd say: for a failure's message."""
    return vm.run(f"{USBIPY} port; tail -n 20 /run/usbipy/attach/*.log; tail -n 30 {LOG}").out


def read_back(vm: Vm) -> None:
    """The stick, attached through vhci-hcd, mounts and holds the known file."""
    wait_for(vm, f"[ -n \"$({vhci_nodes('block')})\" ]")
    disk = vm.check(vhci_nodes("block")).split()[0]
    wait_for(vm, f"[ \"$(cat /sys/block/{disk}/size 2>/dev/null)\" != 0 ]")
    out = vm.check(f"mkdir -p /mnt/stick && mount -o ro /dev/{disk} /mnt/stick && "
                   f"cat /mnt/stick/{KNOWN_FILE}; umount /mnt/stick")
    assert out == KNOWN_TEXT


@pytest.fixture(scope="module")
def rig(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rig]:
    require_vm("mke2fs")
    try:
        import pyudev  # noqa: F401
    except ImportError:
        skip_or_fail("pyudev is missing (pip install -e '.[test]')")
    image = ext2_image(tmp_path_factory.mktemp("stick") / "stick.img", "8M",
                       {KNOWN_FILE: KNOWN_TEXT})
    with Vm(qmp=True, extra_args=["-device", "qemu-xhci,id=xhci"]) as vm:
        vm.check(f"modprobe -a {MODULES}")
        vm.qmp("blockdev-add", driver="raw", **{"node-name": "stick"},
               file={"driver": "file", "filename": str(image)})
        yield Rig(vm, image)


@pytest.fixture
def clean(rig: Rig) -> Iterator[Rig]:
    yield rig
    vm = rig.vm
    vm.run(STOP_KEEPERS)
    vm.run("for p in $(usbip port | sed -n 's/^Port \\([0-9]*\\):.*/\\1/p'); do "
           "usbip detach -p $p; done")
    stop_usbipyd(vm)
    vm.run("pkill -x usbipd")
    for qemu_id in list(rig.plugged):
        rig.unplug(qemu_id)
    vm.run(f"rm -rf {RUN}/state")
    wait_for(vm, f"[ -z \"$({vhci_nodes('block')})\" ]")


@pytest.mark.parametrize("via", ["usbip-host", "libusb"])
def test_a_stick_follows_its_rule_and_its_client_through_unplug_and_replug(
        clean: Rig, via: str) -> None:
    """Plugged in after usbipyd started, the stick is exported by its rule, and
    attached by identity; unplugged, the client's port is freed; plugged in again
    at another port, it is exported and attached again without a hand, and the
    same file reads back."""
    vm = clean.vm
    if via == "libusb":
        try:
            import usb1  # noqa: F401
        except ImportError:
            skip_or_fail("python-libusb1 is missing (pip install -e '.[test]')")
    serial = f"STICK-{via.upper()}"
    start_usbipyd(vm, f'[[export]]\nvid_pid = "{STICK}"\nserial = "{serial}"\n'
                      f'via = "{via}"\n', "--metrics", METRICS)
    clean.plug_stick(1, serial, "stick")
    busid = busid_of(vm, STICK, serial)
    if via == "usbip-host":
        wait_for(vm, f"[ \"$(basename $(readlink /sys/bus/usb/devices/{busid}/driver))\" = "
                     "usbip-host ]")
    listed = vm.check(f"{USBIPY} list -l -c {CONFIG}")
    assert f"exported through {via} by rule: usbipyd.toml line 1" in listed
    vm.check(f"{USBIPY} attach -r {LOOPBACK} --device {STICK}:{serial} --persistent "
             "--max-delay 2 --background")
    read_back(vm)
    port = vm.check(f"{USBIPY} port")
    assert f"by device {STICK}:{serial} on {LOOPBACK}:3240" in port
    assert f"/{busid}\n" in port

    clean.unplug("stick")
    # the client's port is freed (the stub or usbipyd ends the session at once)
    wait_for(vm, f"[ -z \"$({vhci_nodes('block')})\" ]")
    wait_for(vm, f"grep -q '\"state\": \"waiting\"' {KEEPERS}")
    assert f"{busid}: unplugged" in vm.check(f"cat {LOG}")
    metrics = vm.check(f"{PYTHON} -c \"import urllib.request; print(urllib.request.urlopen("
                       f"'http://{METRICS}/metrics').read().decode())\"")
    assert f'usbipy_devices_unplugged_total{{busid="{busid}"}} 1.0' in metrics
    assert f"usbipy_rule_binds_total {1.0 if via == 'usbip-host' else 0.0}" in metrics

    clean.plug_stick(4, serial, "stick-again")  # another port
    moved = busid_of(vm, STICK, serial)
    assert moved != busid
    wait_for(vm, f"grep -q '\"busid\": \"{moved}\"' {KEEPERS}")
    read_back(vm)
    assert "re-attached 1 times" in vm.check(f"{USBIPY} port")


def test_a_firmware_update_that_re_enumerates_is_followed_by_both_ids(clean: Rig) -> None:
    """A gadget that resets into its bootloader with a new product id and back (a
    DFU update): a rule that lists both ids exports it each time, and a client
    attached by VID:*:SERIAL sees the bootloader, then the application again."""
    vm = clean.vm
    gadgets.load(vm, udcs=1)
    gadgets.create(vm, "fw", APPLICATION, "acm.usb0")
    serial = "fw-0001"  # (gadgets.create: the name, -0001)
    start_usbipyd(vm, f'[[export]]\nvid_pid = ["{APPLICATION}", "{BOOTLOADER}"]\n'
                      f'serial = "{serial}"\n')
    vm.check(f"{USBIPY} attach -r {LOOPBACK} --device 1209:*:{serial} --persistent "
             "--max-delay 2 --background")

    def seen_through_vhci(vid_pid: str) -> None:
        vid, pid = vid_pid.split(":")
        try:
            wait_for(vm, "(for d in /sys/bus/usb/devices/*; do case $(readlink -f $d) in "
                         f"*vhci*) [ \"$(cat $d/idVendor 2>/dev/null):$(cat $d/idProduct "
                         f"2>/dev/null)\" = {vid}:{pid} ] && exit 0;; esac; done; exit 1)")
        except AssertionError as exc:
            raise AssertionError(f"{vid_pid} not attached: {diagnostics(vm)}") from exc

    try:
        seen_through_vhci(APPLICATION)
        for ids in (BOOTLOADER, APPLICATION):
            gadgets.unplug(vm, "fw")
            vm.check(f"echo 0x{ids.split(':')[1]} > {gadgets.GADGETS}/fw/idProduct")
            gadgets.plug(vm, "fw")
            seen_through_vhci(ids)
        log = vm.check(f"cat {LOG}")
        assert log.count("bound to usbip-host (usbipyd.toml line 1)") >= 3
    finally:
        g = f"{gadgets.GADGETS}/fw"
        vm.run(f"echo '' > {g}/UDC; rm -f {g}/configs/c.1/acm.usb0; rmdir "
               f"{g}/configs/c.1/strings/0x409 {g}/configs/c.1 {g}/functions/acm.usb0 "
               f"{g}/strings/0x409 {g}")


def test_no_rule_leaves_a_device_alone_and_an_unbind_by_hand_survives_a_reload(
        clean: Rig) -> None:
    vm = clean.vm
    start_usbipyd(vm, f'[[export]]\nvid_pid = "{STICK}"\n')
    clean.plug("usb-kbd", 2, "keyboard")
    keyboard = busid_of(vm, KEYBOARD)
    clean.plug_stick(3, "STICK-HAND", "stick")
    stick = busid_of(vm, STICK)
    wait_for(vm, f"[ \"$(basename $(readlink /sys/bus/usb/devices/{stick}/driver))\" = "
                 "usbip-host ]")
    # the keyboard matches no rule: its own driver keeps it
    assert driver_of(vm, keyboard) == "usb"
    assert "not exported (no rule)" in vm.check(f"{USBIPY} list -l -c {CONFIG}")
    # an admin takes the stick back with the C tool: usbipyd leaves it so
    vm.check(f"usbip unbind -b {stick}")
    wait_for(vm, f"grep -q '{stick} .*unbound from usbip-host by hand' {LOG}")
    vm.check(f"kill -HUP $(cat {PID})")
    wait_for(vm, f"grep -q 'export rules applied again' {LOG}")
    assert driver_of(vm, stick) != "usbip-host"
    # and with usbipy's unbind, recorded: the same after a restart of usbipyd
    vm.check(f"usbip bind -b {stick}")
    vm.check(f"{USBIPY} unbind -b {stick} -c {CONFIG}")
    stop_usbipyd(vm)
    start_usbipyd(vm, f'[[export]]\nvid_pid = "{STICK}"\n')
    assert driver_of(vm, stick) != "usbip-host"
    assert "unbound by hand until replugged" in vm.check(f"{USBIPY} list -l -c {CONFIG}")


def test_the_rules_work_next_to_the_c_usbipd(clean: Rig) -> None:
    """usbipyd --rules-only binds; the C usbipd serves; usbipy attaches by identity."""
    vm = clean.vm
    start_usbipyd(vm, f'[[export]]\nvid_pid = "{STICK}"\n', "--rules-only")
    vm.check("usbipd -D")
    clean.plug_stick(2, "STICK-C", "stick")
    busid = busid_of(vm, STICK)
    wait_for(vm, f"usbip list -r {LOOPBACK} | grep -q ' {busid}: '")
    vm.check(f"{USBIPY} attach -r {LOOPBACK} --device {STICK}:STICK-C")
    read_back(vm)
    assert "listening" not in vm.check(f"cat {LOG}")  # (usbipyd serves nothing)


@pytest.mark.parametrize("rule, message", [
    ('vid_pid = "46f4:1"', "4: export[1].vid_pid: '46f4:1' is not VID:PID"),
    ("busid = \"HUB\"", "3: export[1]: would export the hub at HUB"),
])
def test_bad_rules_are_one_line_naming_the_file_and_line(clean: Rig, rule: str,
                                                         message: str) -> None:
    vm = clean.vm
    if "HUB" in rule:
        clean.plug("usb-hub", 3, "hub")
        hub = busid_of(vm, "0409:55aa")
        rule, message = rule.replace("HUB", hub), message.replace("HUB", hub)
    vm.check(f"mkdir -p {RUN} && printf '%s' 'port = 3240\n\n[[export]]\n{rule}\n' > {CONFIG}")
    result = vm.run(f"{USBIPYD} -c {CONFIG} --check-config")
    assert result.rc == 1
    assert result.out.count("\n") == 1 and f"{CONFIG}:{message}" in result.out, result.out


def test_nothing_runs_while_nothing_is_plugged(clean: Rig) -> None:
    """No polling: idle, usbipyd's threads wake (almost) never."""
    vm = clean.vm
    start_usbipyd(vm, f'[[export]]\nvid_pid = "{STICK}"\n')
    switches = ("cat /proc/$(cat " + PID + ")/task/*/status | awk '/voluntary_ctxt_switches/ "
                "{n += $2} END {print n}'")
    cpu = f"awk '{{print $14 + $15}}' /proc/$(cat {PID})/stat"
    before, ticks = int(vm.check(switches)), int(vm.check(cpu))
    vm.check("sleep 20")
    woken, used = int(vm.check(switches)) - before, int(vm.check(cpu)) - ticks
    print(f"usbipyd idle for 20 s: {woken} wake-ups, {used} clock ticks of CPU")
    assert woken < 20, f"{woken} wake-ups in 20 s: something polls"


def test_a_rule_for_a_device_this_machine_runs_from_is_refused(clean: Rig) -> None:
    """The stick holds /boot here: a rule that would export it is an error."""
    vm = clean.vm
    clean.plug_stick(2, "STICK-BOOT", "stick")
    busid = busid_of(vm, STICK, "STICK-BOOT")
    disk = wait_output(vm, f"ls /sys/bus/usb/devices/{busid}/*/host*/target*/*/block/")
    vm.check(f"mount -o ro /dev/{disk.split()[0]} /boot")
    try:
        vm.check(f"mkdir -p {RUN} && printf '%s' '[[export]]\ninterface_class = 0x08\n' "
                 f"> {CONFIG}")
        result = vm.run(f"{USBIPYD} -c {CONFIG} --check-config")
        assert result.rc == 1 and result.out.count("\n") == 1, result.out
        assert (f"{CONFIG}:1: export[1]: would export {busid} ({STICK} serial STICK-BOOT), "
                "which holds /boot, that this machine runs from") in result.out, result.out
    finally:
        vm.run("umount /boot")
