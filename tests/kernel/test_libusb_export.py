"""Real USB devices exported through libusb: configfs gadgets on dummy_hcd and
QEMU's USB audio device, served by usbipyd in the guest and attached by the
real vhci-hcd (C `usbip attach` and `usbipy attach`) or the userspace client.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from . import gadgets
from .conftest import require_vm, skip_or_fail
from .guest import ext2_image, vhci_node, vhci_nodes, wait_for
from .vm import Vm

REPO = Path(__file__).resolve().parents[2]
PYTHON = sys.executable
ENV = "USBIPY_STATE_DIR=/run/usbipy"
USBIPY = f"{ENV} {PYTHON} -m usbipy.cli.usbipy"
USBIPYD = f"{ENV} {PYTHON} -m usbipy.cli.usbipyd"
LOOPBACK = "127.0.0.1"
MSC, ACM, AUDIO = "1d6b:0104", "1d6b:0105", "46f4:0002"
KNOWN_FILE, KNOWN_TEXT = "hello.txt", "a file on the backing image of the gadget\n"
MODULES = "xhci_pci usbip-host vhci-hcd usb-storage sd_mod ext4 cdc_acm"


@dataclass
class Rig:
    vm: Vm

    def busid(self, vid_pid: str) -> str:
        return gadgets.busid(self.vm, vid_pid)


def start_usbipyd(vm: Vm) -> None:
    vm.check(f"({USBIPYD} -d -P /run/usbipyd.pid > /run/usbipyd.log 2>&1 &)")
    wait_for(vm, f"{USBIPY} list -r {LOOPBACK} >/dev/null 2>&1")


def stop_usbipyd(vm: Vm) -> None:
    vm.check("kill $(cat /run/usbipyd.pid)")
    wait_for(vm, "[ ! -e /run/usbipyd.pid ]")


@pytest.fixture(scope="module")
def rig(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rig]:
    require_vm("mke2fs", "debugfs")
    try:
        import usb1  # noqa: F401
    except ImportError:
        skip_or_fail("python-libusb1 is missing (pip install -e '.[test]')")
    image = ext2_image(tmp_path_factory.mktemp("gadget") / "msc.img", "32M",
                       {KNOWN_FILE: KNOWN_TEXT})
    audio = ["-device", "qemu-xhci,id=xhci", "-audiodev", "none,id=snd",
             "-device", "usb-audio,audiodev=snd,bus=xhci.0"]
    with Vm(extra_args=audio) as vm:
        # (no udev daemon here: usbipyd must notice replugged devices without its events)
        vm.check(f"modprobe -a {MODULES}")
        gadgets.load(vm)
        vm.check(f"cp {image} /run/msc.img")
        gadgets.create(vm, "msc", MSC, "mass_storage.0", {"lun.0/file": "/run/msc.img"}, udc=0)
        gadgets.create(vm, "acm", ACM, "acm.usb0", udc=1)
        wait_for(vm, f"lsusb | grep -q {AUDIO}")
        start_usbipyd(vm)
        yield Rig(vm)


@pytest.fixture
def clean(rig: Rig) -> Iterator[Rig]:
    yield rig
    vm = rig.vm
    vm.run("for p in $(usbip port | sed -n 's/^Port \\([0-9]*\\):.*/\\1/p'); do "
           "usbip detach -p $p; done")
    vm.run("rm -f /run/usbipy/exports.json")
    wait_for(vm, f"[ -z \"$({vhci_nodes('block')})$({vhci_nodes('tty')})\" ]")
    if not vm.check(f"cat {gadgets.GADGETS}/msc/UDC").strip():
        gadgets.plug(vm, "msc")
    wait_for(vm, f"[ -n \"$({gadgets.busid_script(MSC)})\" ]")
    if not vm.run("[ -e /run/usbipyd.pid ] && kill -0 $(cat /run/usbipyd.pid)").rc == 0:
        start_usbipyd(vm)


def port_of(vm: Vm) -> int:
    [entry] = json.loads(vm.check(f"{USBIPY} port --json"))
    port: int = entry["port"]
    return port


def test_mass_storage_gadget_with_c_and_usbipy_attach(clean: Rig) -> None:
    vm = clean.vm
    busid = clean.busid(MSC)
    assert "usb-storage" in vm.check(f"readlink /sys/bus/usb/devices/{busid}:1.0/driver")
    out = vm.check(f"{USBIPY} bind --libusb -b {busid}")
    assert f"bind busid {busid} for export through libusb: complete" in out
    # the running usbipyd offers it at once
    wait_for(vm, f"usbip list -r {LOOPBACK} | grep -q ' {busid}: '")
    checksums = {}
    for n, attach in enumerate((f"usbip attach -r {LOOPBACK} -b {busid}",
                                f"{USBIPY} attach -r {LOOPBACK} -b {busid}")):
        vm.check(attach)
        disk = vhci_node(vm, "block")
        # usbipyd took the interface from usb-storage and holds it through usbfs
        assert vm.check(f"readlink /sys/bus/usb/devices/{busid}:1.0/driver").strip(
            ).endswith("/usbfs")
        written = f"written-{n}"
        vm.check(f"mkdir -p /mnt/g && mount {disk} /mnt/g && "
                 f"[ \"$(cat /mnt/g/{KNOWN_FILE})\" = '{KNOWN_TEXT.strip()}' ] && "
                 f"head -c 6000000 /dev/urandom > /mnt/g/{written} && "
                 f"md5sum /mnt/g/{written} > /run/{written}.md5 && umount /mnt/g")
        vm.check(f"echo 3 > /proc/sys/vm/drop_caches && mount {disk} /mnt/g && "
                 f"md5sum -c /run/{written}.md5 && umount /mnt/g")
        checksums[written] = vm.check(f"cut -d' ' -f1 /run/{written}.md5").strip()
        vm.check(f"usbip detach -p {port_of(vm)}")
        wait_for(vm, f"[ -z \"$({vhci_nodes('block')})\" ]")
        # released: the kernel driver has the gadget back
        wait_for(vm, f"readlink /sys/bus/usb/devices/{busid}:1.0/driver | grep -q usb-storage")
    # the bytes are in the gadget's backing file
    for name, checksum in checksums.items():
        assert vm.check(f"debugfs -R 'cat /{name}' /run/msc.img 2>/dev/null | md5sum"
                        ).split()[0] == checksum
    # a usbipyd started later exports the same binding
    stop_usbipyd(vm)
    start_usbipyd(vm)
    assert f" {busid}: " in vm.check(f"usbip list -r {LOOPBACK}")


def test_serial_gadget_lines_both_ways(clean: Rig) -> None:
    vm = clean.vm
    busid = clean.busid(ACM)
    # by ids: the binding follows the device wherever it is plugged in
    vm.check(f"{USBIPY} bind --libusb --device {ACM}")
    wait_for(vm, f"{USBIPY} list -r {LOOPBACK} | grep -q ' {busid}: '")
    vm.check(f"{USBIPY} attach -r {LOOPBACK} -b {busid}")
    acm = vhci_node(vm, "tty")
    vm.check(f"stty -F {acm} raw -echo && stty -F /dev/ttyGS0 raw -echo")
    for src, dst, line in ((acm, "/dev/ttyGS0", "from the client to the gadget"),
                           ("/dev/ttyGS0", acm, "from the gadget back to the client")):
        # the line is written once the reader has the tty open
        out = vm.check(f"timeout 100 head -n 1 {dst} > /run/line & reader=$!; "
                       f"end=$((SECONDS + 60)); until find /proc/[0-9]*/fd -lname {dst} "
                       f"2>/dev/null | grep -q .; do [ $SECONDS -lt $end ] || {{ echo 'no reader "
                       f"on {dst}'; exit 1; }}; sleep 0.1; done; echo '{line}' > {src}; "
                       "wait $reader; cat /run/line")
        assert out == f"{line}\n"
    vm.check(f"{USBIPY} detach -p {port_of(vm)}")
    out = vm.check(f"{USBIPY} unbind --device {ACM}")
    assert f"unbind {ACM} from export through libusb: complete" in out


def test_iso_out_through_libusb(clean: Rig) -> None:
    vm = clean.vm
    busid = clean.busid(AUDIO)
    vm.check(f"{USBIPY} bind --libusb -b {busid}")
    result = json.loads(vm.check(f"cd {REPO} && {PYTHON} -m tests.kernel.libusb_client "
                                 f"iso_out {busid}"))
    assert len(result["replies"]) == 4
    for reply in result["replies"]:
        assert (reply["status"], reply["actual_length"], reply["error_count"]) == (0, 1536, 0)
        assert reply["packets"] == [[i * 192, 192, 192, 0] for i in range(8)]
    # unlinked in flight (-ECONNRESET, no completion) or after it completed (0)
    assert (result["unlink"], result["unlinked_completed"]) in ((-104, False), (0, True))


def test_unbind_while_imported_gives_the_device_back(clean: Rig) -> None:
    vm = clean.vm
    busid = clean.busid(MSC)
    vm.check(f"{USBIPY} bind --libusb -b {busid}")
    vm.check(f"{USBIPY} attach -r {LOOPBACK} -b {busid}")
    vhci_node(vm, "block")
    vm.check(f"{USBIPY} unbind -b {busid}")
    # usbipyd drops the client and the kernel driver takes the gadget back
    wait_for(vm, "! usbip port | grep -q 'Port in Use'")
    wait_for(vm, f"readlink /sys/bus/usb/devices/{busid}:1.0/driver | grep -q usb-storage")
    assert f" {busid}: " not in vm.check(f"{USBIPY} list -r {LOOPBACK} 2>&1")


def test_unplug_while_imported(clean: Rig) -> None:
    vm = clean.vm
    busid = clean.busid(MSC)
    vm.check(f"{USBIPY} bind --libusb -b {busid}")
    # (the redirection inside the parentheses: a subshell that keeps the agent's output
    # open would hold this command until the client exits)
    vm.check(f"rm -f /run/urb-pending; cd {REPO} && ({PYTHON} -m tests.kernel.libusb_client "
             f"pending_when_unplugged {busid} > /run/unplug.json 2>&1 &)")
    wait_for(vm, "[ -e /run/urb-pending ]")
    gadgets.unplug(vm, "msc")
    wait_for(vm, "[ -s /run/unplug.json ]", timeout=200)  # past the client's own ceilings
    result = json.loads(vm.check("cat /run/unplug.json"))
    # the URB in flight fails as the kernel's would, and usbipyd closes the connection
    assert result == {"status": -19, "closed": True}
    assert busid not in vm.check(f"{USBIPY} list -r {LOOPBACK} --json")
    gadgets.plug(vm, "msc")
    wait_for(vm, f"{USBIPY} list -r {LOOPBACK} | grep -q ' {busid}: '")

    # the same through vhci-hcd, with the disk busy
    vm.check(f"{USBIPY} attach -r {LOOPBACK} -b {busid}")
    disk = vhci_node(vm, "block")
    # (its output elsewhere: the loop must not hold this command until it ends)
    vm.check(f"rm -f /run/reads; (for i in $(seq 200); do dd if={disk} of=/dev/null bs=64k "
             "count=64 iflag=direct 2>/dev/null || break; echo $i >> /run/reads; done) "
             ">/dev/null 2>&1 </dev/null &")
    wait_for(vm, "[ -s /run/reads ]")  # reading: the disk is busy
    gadgets.unplug(vm, "msc")
    wait_for(vm, "! usbip port | grep -q 'Port in Use'")
    wait_for(vm, f"[ -z \"$({vhci_nodes('block')})\" ]")
    assert "is gone" in vm.check("cat /run/usbipyd.log")
    gadgets.plug(vm, "msc")
    wait_for(vm, f"{USBIPY} list -r {LOOPBACK} | grep -q ' {busid}: '")
