"""Device mode, as `usbipd -e` has it: a mass-storage gadget bound to the kernel's
usbip-vudc, exported by `usbipyd -e` and by the C usbipd -e, attached by the real
vhci-hcd with `usbipy attach` and with C `usbip attach`, each way.

The gadget's backing image carries a known file; each attachment mounts the
disk, reads that file, writes one of its own and reads it back after the
caches are dropped. After each detach the UDC is available again (usbip_status
1) and the kernel logged no warning.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest

from . import gadgets
from .conftest import require_vm
from .guest import USBIPY, USBIPYD, ext2_image, vhci_node, vhci_nodes, wait_for
from .vm import Vm

UDC = "usbip-vudc.0"
STATUS = f"/sys/devices/platform/{UDC}/usbip_status"
MSC = "1d6b:0104"
PORT = 3241  # usbipyd's; the C usbipd has 3240
KNOWN_FILE, KNOWN_TEXT = "hello.txt", "a file on the backing image of the gadget\n"


@pytest.fixture(scope="module")
def vm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Vm]:
    require_vm("mke2fs")
    image = ext2_image(tmp_path_factory.mktemp("vudc") / "msc.img", "16M",
                       {KNOWN_FILE: KNOWN_TEXT})
    with Vm() as guest:
        guest.check("modprobe -a vhci-hcd usb-storage sd_mod ext2 usbip-vudc libcomposite "
                    "usb_f_mass_storage && { mountpoint -q /sys/kernel/config || "
                    "mount -t configfs configfs /sys/kernel/config; }")
        guest.check(f"cp {image} /run/msc.img")
        g = f"{gadgets.GADGETS}/msc"
        vid, pid = MSC.split(":")
        guest.check(" && ".join([
            f"mkdir -p {g}/strings/0x409 {g}/configs/c.1/strings/0x409 "
            f"{g}/functions/mass_storage.0",
            f"echo 0x{vid} > {g}/idVendor", f"echo 0x{pid} > {g}/idProduct",
            f"echo usbipy > {g}/strings/0x409/manufacturer",
            f"echo vudc-disk > {g}/strings/0x409/product",
            f"echo c > {g}/configs/c.1/strings/0x409/configuration",
            f"echo /run/msc.img > {g}/functions/mass_storage.0/lun.0/file",
            f"ln -s {g}/functions/mass_storage.0 {g}/configs/c.1/",
            f"echo {UDC} > {g}/UDC"]))
        yield guest


@pytest.fixture
def usbipyd(vm: Vm) -> Iterator[Vm]:
    vm.check(f"({USBIPYD} -e -t {PORT} -P /run/usbipyd.pid > /run/usbipyd.log 2>&1 &)")
    wait_for(vm, f"{USBIPY} list -r 127.0.0.1:{PORT} 2>/dev/null | grep -q '^ *{UDC}: '")
    yield vm
    vm.check("kill $(cat /run/usbipyd.pid)")
    wait_for(vm, "[ ! -e /run/usbipyd.pid ]")


@pytest.fixture
def c_usbipd(vm: Vm) -> Iterator[Vm]:
    vm.check("usbipd -e -D")
    wait_for(vm, f"usbip list -r 127.0.0.1 2>/dev/null | grep -q '{UDC}:'")
    yield vm
    vm.check("pkill -x usbipd")
    wait_for(vm, "! pgrep -x usbipd >/dev/null")


def use_disk(vm: Vm, written: str) -> None:
    """Mount the attached gadget's disk, read the known file, write ``written`` and read
    it back from the device after the caches are dropped; then detach and check that
    the UDC is free again."""
    disk = vhci_node(vm, "block")
    vm.check(f"mkdir -p /mnt/g && mount {disk} /mnt/g && "
             f"[ \"$(cat /mnt/g/{KNOWN_FILE})\" = '{KNOWN_TEXT.strip()}' ] && "
             f"head -c 3000000 /dev/urandom > /mnt/g/{written} && "
             f"md5sum /mnt/g/{written} > /run/{written}.md5 && umount /mnt/g")
    vm.check(f"echo 3 > /proc/sys/vm/drop_caches && mount {disk} /mnt/g && "
             f"md5sum -c /run/{written}.md5 && umount /mnt/g")
    [port] = {line.split()[1].rstrip(":") for line in vm.check("usbip port").splitlines()
              if line.startswith("Port ")}
    vm.check(f"usbip detach -p {int(port)}")
    wait_for(vm, f"[ -z \"$({vhci_nodes('block')})\" ]")
    wait_for(vm, f"[ \"$(cat {STATUS})\" = 1 ]")
    warnings = vm.run("dmesg | grep -E 'WARNING|BUG:|Oops'").out
    assert not warnings.strip(), warnings


def test_list_d_names_the_gadget_on_the_udc(vm: Vm) -> None:
    out = vm.check(f"{USBIPY} list -d")
    assert f" - busid {UDC} ({MSC})" in out
    assert "gadget msc" in out
    [entry] = json.loads(vm.check(f"{USBIPY} list -d --json"))
    assert entry == {"busid": UDC, "function": "msc", "usbid": MSC, "speed": "high"}


def test_usbipyd_e_to_usbipy_attach(usbipyd: Vm) -> None:
    vm = usbipyd
    listed = vm.check(f"{USBIPY} list -r 127.0.0.1:{PORT}")
    assert f"{UDC}: " in listed and MSC in listed
    vm.check(f"{USBIPY} attach -r 127.0.0.1:{PORT} -d {UDC}")
    assert vm.check(f"cat {STATUS}").strip() == "2"  # the UDC serves the connection
    # a second client is told the gadget is taken, as the C usbipd tells it
    busy = vm.run(f"{USBIPY} attach -r 127.0.0.1:{PORT} -d {UDC}")
    assert busy.rc == 1 and "already imported by another client (DEV_BUSY)" in busy.out, busy
    use_disk(vm, "by-usbipy")
    assert f"imported {UDC} (served by the kernel's usbip-vudc)" in vm.check(
        "cat /run/usbipyd.log")


def test_usbipyd_e_to_c_usbip_attach(usbipyd: Vm) -> None:
    vm = usbipyd
    vm.check(f"usbip --tcp-port {PORT} attach -r 127.0.0.1 -d {UDC}")
    use_disk(vm, "by-c-usbip")


def test_c_usbipd_e_to_usbipy_attach(c_usbipd: Vm) -> None:
    vm = c_usbipd
    vm.check(f"{USBIPY} attach -r 127.0.0.1 -d {UDC}")
    use_disk(vm, "from-c-usbipd")
