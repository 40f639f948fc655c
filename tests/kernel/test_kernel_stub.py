"""Parity with Linux usbip: the kernel's stub (usbip-host) and vhci-hcd, driven by
usbipy and by Debian's C tools in every combination, on a QEMU USB stick.

Everything runs inside one guest: the stick sits on QEMU's xHCI controller,
the servers listen on the guest's loopback, and vhci-hcd attaches from there.
"""

from __future__ import annotations

import errno
import hashlib
import json
import struct
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from .conftest import qemu_stick, require_vm
from .guest import ext2_image, wait_for
from .vm import Vm

STICK_ID = "46f4:0001"  # QEMU's usb-storage
KNOWN_FILE = "hello.txt"
KNOWN_TEXT = "the stick's own bytes, read through USB/IP\n"
MODULES = "xhci_pci usb-storage sd_mod usbip-host vhci-hcd ext4"
PYTHON = sys.executable  # the host's venv is visible in the guest over 9p
USBIPY = f"{PYTHON} -m usbipy.cli.usbipy"
USBIPYD = f"{PYTHON} -m usbipy.cli.usbipyd"
LOOPBACK = "127.0.0.1"


@dataclass
class Stick:
    vm: Vm
    busid: str
    image: Path


@pytest.fixture(scope="module")
def stick(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stick]:
    require_vm("mke2fs")
    image = ext2_image(tmp_path_factory.mktemp("stick") / "stick.img", "16M",
                       {KNOWN_FILE: KNOWN_TEXT})
    with Vm(extra_args=qemu_stick(image)) as vm:
        vm.check(f"modprobe -a {MODULES}")
        wait_for(vm, f"lsusb | grep -q {STICK_ID}")
        local = json.loads(vm.check(f"{USBIPY} list -l --json"))
        [busid] = [d["busid"] for d in local
                   if f"{d['idVendor']}:{d['idProduct']}" == STICK_ID]
        stick = Stick(vm, busid, image)
        wait_for(vm, f"[ -n \"$({_disks('! ')})\" ]")
        yield stick


def _disks(match: str) -> str:
    """Shell: the sd disks that are (match='') or are not (match='! ') behind vhci_hcd."""
    return (f"for b in /sys/block/sd*; do [ -e \"$b\" ] || continue; {match}readlink -f $b | "
            f"grep -q vhci_hcd && basename $b; done")


def vhci_disk(vm: Vm) -> str:
    wait_for(vm, f"[ -n \"$({_disks('')})\" ]")
    return "/dev/" + vm.check(_disks("")).split()[0]


def read_known_file(vm: Vm, disk: str) -> str:
    return vm.check(f"mkdir -p /mnt/stick && mount {disk} /mnt/stick && "
                    f"cat /mnt/stick/{KNOWN_FILE}; umount /mnt/stick")


@pytest.fixture
def clean(stick: Stick) -> Iterator[Stick]:
    """Leave the guest as the test found it: no servers, nothing attached, nothing bound."""
    yield stick
    vm = stick.vm
    # (not pkill -f: the pattern is in this very shell's command line)
    vm.run("[ -e /run/usbipyd.pid ] && kill $(cat /run/usbipyd.pid); pkill -x usbipd; "
           "for p in $(usbip port | sed -n 's/^Port \\([0-9]*\\):.*/\\1/p'); do "
           "usbip detach -p $p; done")
    # detached on both sides: vhci's port free, the stub no longer in use
    wait_for(vm, "! usbip port | grep -q 'Port in Use' && "
             f"! grep -qsx 2 /sys/bus/usb/devices/{stick.busid}/usbip_status")
    vm.run(f"[ -e /sys/bus/usb/drivers/usbip-host/{stick.busid} ] && "
           f"usbip unbind -b {stick.busid}")
    wait_for(vm, f"[ -n \"$({_disks('! ')})\" ]")
    wait_for(vm, "! pgrep -x usbipd && [ ! -e /run/usbipyd.pid ]")


def start_usbipyd(vm: Vm, *args: str) -> None:
    vm.check(f"{USBIPYD} -D -P /run/usbipyd.pid {' '.join(args)}")
    wait_for(vm, f"{USBIPY} list -r {LOOPBACK} >/dev/null 2>&1")


def test_usbipy_bind_and_usbipyd_serve_the_c_client(clean: Stick) -> None:
    vm, busid = clean.vm, clean.busid
    out = vm.check(f"{USBIPY} bind -b {busid}")
    assert f"bind device on busid {busid}: complete" in out
    assert vm.check(f"readlink /sys/bus/usb/devices/{busid}/driver").strip().endswith(
        "usbip-host")
    # usb-storage let go of it: the local disk is gone
    wait_for(vm, f"[ -z \"$({_disks('! ')})\" ]")
    start_usbipyd(vm)
    c_list = vm.check(f"usbip list -r {LOOPBACK}")
    assert f"{busid}: QEMU : unknown product ({STICK_ID})" in c_list, c_list
    # the same device list, in the same words, from both clients
    assert vm.check(f"{USBIPY} list -r {LOOPBACK}") == c_list

    vm.check(f"usbip attach -r {LOOPBACK} -b {busid}")
    disk = vhci_disk(vm)
    assert read_known_file(vm, disk) == KNOWN_TEXT
    assert vm.check(f"cat /sys/bus/usb/devices/{busid}/usbip_status").strip() == "2"
    # in use: usbipyd no longer offers it, as it does with its own devices
    assert busid not in vm.check(f"{USBIPY} list -r {LOOPBACK} 2>&1")

    out = vm.check(f"{USBIPY} unbind -b {busid}")
    assert f"unbind device on busid {busid}: complete" in out
    # the stick is back with usb-storage, and vhci lost its disk
    wait_for(vm, f"readlink /sys/bus/usb/devices/{busid}:1.0/driver | grep -q usb-storage")
    wait_for(vm, f"[ -z \"$({_disks('')})\" ]")
    wait_for(vm, f"[ -n \"$({_disks('! ')})\" ]")
    local = vm.check(_disks("! ")).split()[0]
    assert read_known_file(vm, f"/dev/{local}") == KNOWN_TEXT


def test_c_usbipd_serves_usbipy_attach(clean: Stick) -> None:
    vm, busid = clean.vm, clean.busid
    vm.check(f"usbip bind -b {busid}")
    vm.check("usbipd -D")
    wait_for(vm, f"usbip list -r {LOOPBACK} 2>/dev/null | grep -q {busid}")

    attached = json.loads(vm.check(f"{USBIPY} attach -r {LOOPBACK} -b {busid} --json"))
    port = attached["port"]
    # SuperSpeed stick: the port must be on vhci's SuperSpeed hub
    assert attached["device"]["speed"] == "super"
    assert vm.check(f"cat /var/run/vhci_hcd/port{port}") == f"{LOOPBACK} 3240 {busid}\n"
    disk = vhci_disk(vm)
    assert read_known_file(vm, disk) == KNOWN_TEXT

    url = f"usbip://{LOOPBACK}:3240/{busid}"
    ours, theirs = vm.check(f"{USBIPY} port"), vm.check("usbip port")
    assert url in ours and url in theirs
    assert f"Port {port:02d}: <Port in Use> at Super Speed(5000Mbps)" in theirs
    assert ours == theirs  # the same words, line for line
    [entry] = json.loads(vm.check(f"{USBIPY} port --json"))
    assert (entry["port"], entry["url"], entry["hub"]) == (port, url, "ss")

    detached = json.loads(vm.check(f"{USBIPY} detach -p {port} --json"))
    assert detached == {"port": port, "detached": True}
    wait_for(vm, f"[ -z \"$({_disks('')})\" ]")
    assert "Port in Use" not in vm.check("usbip port")
    vm.check(f"[ ! -e /var/run/vhci_hcd/port{port} ]")


def test_usbipyd_with_usbipy_attach_and_a_busy_second_client(clean: Stick) -> None:
    vm, busid = clean.vm, clean.busid
    vm.check(f"{USBIPY} bind -b {busid}")
    start_usbipyd(vm)
    out = vm.check(f"{USBIPY} attach -r {LOOPBACK} -b {busid}")
    assert f"attached {busid} from {LOOPBACK}:3240 on port" in out
    disk = vhci_disk(vm)
    vm.check(f"mkdir -p /mnt/stick && mount {disk} /mnt/stick && "
             "head -c 3000000 /dev/urandom > /mnt/stick/written && "
             "md5sum /mnt/stick/written > /run/written.md5 && umount /mnt/stick")

    second = vm.run(f"{USBIPY} attach -r {LOOPBACK} -b {busid}")
    assert second.rc == 1
    assert "already imported by another client (DEV_BUSY)" in second.out
    as_json = vm.run(f"{USBIPY} --json attach -r {LOOPBACK} -b {busid} 2>/dev/null")
    assert as_json.rc == 1 and json.loads(as_json.out)["kind"] == "ImportRefused"

    # the first client did not notice: its data reads back after a remount
    vm.check(f"echo 3 > /proc/sys/vm/drop_caches; mount {disk} /mnt/stick && "
             "md5sum -c /run/written.md5 && "
             f"cat /mnt/stick/{KNOWN_FILE} && rm /mnt/stick/written; umount /mnt/stick")
    [entry] = json.loads(vm.check(f"{USBIPY} port --json"))
    vm.check(f"{USBIPY} detach -p {entry['port']}")
    wait_for(vm, f"[ -z \"$({_disks('')})\" ]")
    # free again: offered in the list, importable
    wait_for(vm, f"{USBIPY} list -r {LOOPBACK} | grep -q ' {busid}: '")
    vm.check(f"{USBIPY} unbind -b {busid}")


POLICY = """\
usbip_host = true
libusb = false
[policy]
default = "deny"
{rules}"""

ALLOW_LOOPBACK = """
[[policy.rule]]
action = "allow"
client.network = "127.0.0.1/32"
"""


def test_a_reload_that_revokes_the_client_ends_the_kernel_session(clean: Stick) -> None:
    """usbipyd handed the stick to usbip-host for a client; a SIGHUP with a policy that
    no longer allows that client ends the kernel's session (usbip_sockfd "-1"): the
    stub is free again and vhci-hcd lets go of the disk."""
    vm, busid = clean.vm, clean.busid
    vm.check(f"{USBIPY} bind -b {busid}")
    vm.check(f"cat > /run/usbipyd.toml <<'EOF'\n{POLICY.format(rules=ALLOW_LOOPBACK)}EOF")
    # (in the foreground, logging to a file; the clean fixture stops it by its pid file)
    vm.check(f"setsid {USBIPYD} -c /run/usbipyd.toml -P /run/usbipyd.pid "
             "</dev/null >/run/usbipyd.log 2>&1 &")
    wait_for(vm, f"{USBIPY} list -r {LOOPBACK} 2>/dev/null | grep -q ' {busid}: '")

    vm.check(f"usbip attach -r {LOOPBACK} -b {busid}")
    disk = vhci_disk(vm)
    assert read_known_file(vm, disk) == KNOWN_TEXT
    assert vm.check(f"cat /sys/bus/usb/devices/{busid}/usbip_status").strip() == "2"

    vm.check(f"cat > /run/usbipyd.toml <<'EOF'\n{POLICY.format(rules='')}EOF")
    vm.check("kill -HUP $(cat /run/usbipyd.pid)")
    # the stub's session ends: available again, and the client's port and disk are gone
    wait_for(vm, f"grep -qx 1 /sys/bus/usb/devices/{busid}/usbip_status")
    wait_for(vm, "! usbip port | grep -q 'Port in Use'")
    wait_for(vm, f"[ -z \"$({_disks('')})\" ]")
    log = vm.check("cat /run/usbipyd.log")
    assert (f"dropped from {busid} (served by the kernel): no longer allowed by the default "
            "(deny, usbipyd.toml line 4)") in log, log
    # and the client may not have it back: refused as an unknown device
    again = vm.run(f"usbip attach -r {LOOPBACK} -b {busid}")
    assert again.rc != 0 and "Device not found" in again.out, again.out
    assert busid not in vm.check(f"{USBIPY} list -r {LOOPBACK}")


STATUS = f"{USBIPY} --json status -r {LOOPBACK}:3241"
RELEASE = (f"{PYTHON} -c \"import urllib.request as u; print(u.urlopen(u.Request("
           "'http://127.0.0.1:3241/api/v1/devices/{busid}/release', data=b'{{}}', "
           "headers={{'Content-Type': 'application/json'}})).read().decode())\"")


def stick_status(vm: Vm, busid: str) -> dict[str, object]:
    [server] = json.loads(vm.check(STATUS))["servers"]
    [record] = [d for d in server["status"]["devices"] if d["busid"] == busid]
    return dict(record)


def test_the_status_page_shows_a_kernel_session_and_releases_it(clean: Stick) -> None:
    """usbipyd hands the stick to usbip-host for the C client: its status says so
    (served by the kernel, for whom, by which rule), and an admin's release ends the
    kernel's session: the stub is free and vhci-hcd lets go of the disk."""
    vm, busid = clean.vm, clean.busid
    vm.check(f"{USBIPY} bind --device {STICK_ID}")  # (a rule: the page names it)
    try:
        vm.check(f"setsid {USBIPYD} -c /dev/null --http 3241 -P /run/usbipyd.pid "
                 "</dev/null >/run/usbipyd.log 2>&1 &")
        wait_for(vm, f"{USBIPY} list -r {LOOPBACK} 2>/dev/null | grep -q ' {busid}: '")
        wait_for(vm, f"{STATUS} >/dev/null 2>&1")
        record = stick_status(vm, busid)
        assert (record["state"], record["via"], record["rule"]) == (
            "available", "usbip-host", "usbipy bind"), record

        vm.check(f"usbip attach -r {LOOPBACK} -b {busid}")
        disk = vhci_disk(vm)
        assert read_known_file(vm, disk) == KNOWN_TEXT
        record = stick_status(vm, busid)
        client = record["client"]
        assert record["state"] == "served-by-kernel" and record["can_release"] is True
        assert isinstance(client, dict) and client["address"] == LOOPBACK
        assert client["bytes_in"] is None  # (the kernel moves the bytes: nobody counts them)
        text = vm.check(f"{USBIPY} status -r {LOOPBACK}:3241")
        assert f"in use by {LOOPBACK}" in text and "served by the kernel" in text, text

        released = json.loads(vm.check(RELEASE.format(busid=busid)))
        assert released == {"released": busid, "client": LOOPBACK}
        wait_for(vm, f"grep -qx 1 /sys/bus/usb/devices/{busid}/usbip_status")
        wait_for(vm, "! usbip port | grep -q 'Port in Use'")
        wait_for(vm, f"[ -z \"$({_disks('')})\" ]")
        wait_for(vm, f"{STATUS} | grep -q '\"state\": \"available\"'")
        log = vm.check("cat /run/usbipyd.log")
        assert (f"{busid}: released from {LOOPBACK}:" in log
                and "(served by the kernel) by 127.0.0.1 (status page)" in log), log
    finally:
        vm.run(f"{USBIPY} unbind --device {STICK_ID}")


def test_pyusb_on_the_host_drives_the_stick_the_c_usbipd_exports(clean: Stick) -> None:
    """usbipy.pyusb against the kernel's stub: the C usbipd serves usbip-host in the
    guest, PyUSB on the host reads and writes the stick with SCSI commands, and the
    guest's own usb-storage then sees what PyUSB wrote."""
    usb_core = pytest.importorskip("usb.core")
    import usb.util

    from usbipy import pyusb

    vm, busid = clean.vm, clean.busid
    vm.check(f"usbip bind -b {busid}")
    vm.check("usbipd -D")
    wait_for(vm, f"usbip list -r {LOOPBACK} 2>/dev/null | grep -q {busid}")
    image = clean.image.read_bytes()
    known_lba = image.index(KNOWN_TEXT.encode()) // 512
    spare_lba = len(image) // 512 - 1  # the last block: ext2 leaves it unused
    assert image[spare_lba * 512:] == bytes(512)
    pattern = bytes(range(256)) * 2

    backend = pyusb.get_backend(f"usbip://127.0.0.1:{vm.guest_port}/{busid}")
    dev = usb_core.find(backend=backend)
    assert dev is not None, f"PyUSB found no {busid} on the guest's usbipd"
    try:
        assert f"{dev.idVendor:04x}:{dev.idProduct:04x}" == STICK_ID
        assert usb.util.get_string(dev, dev.iManufacturer) == "QEMU"
        assert usb.util.get_string(dev, dev.iProduct) == "QEMU USB HARDDRIVE"
        assert dev.speed == 4  # libusb's SuperSpeed, from usbip's USB_SPEED_SUPER
        assert vm.check(f"cat /sys/bus/usb/devices/{busid}/usbip_status").strip() == "2"
        dev.set_configuration()
        intf = dev.get_active_configuration()[(0, 0)]
        assert (intf.bInterfaceClass, intf.bInterfaceSubClass, intf.bInterfaceProtocol) == (
            8, 6, 0x50)  # mass storage, SCSI, bulk-only
        out, into = sorted(intf, key=lambda e: e.bEndpointAddress)  # 0x02 OUT, 0x81 IN
        tag = iter(range(1, 100))

        def scsi(cdb: bytes, data_in: int = 0, data_out: bytes = b"") -> bytes:
            this = next(tag)
            out.write(struct.pack("<IIIBBB16s", 0x43425355, this, data_in or len(data_out),
                                  0x80 if data_in else 0, 0, len(cdb), cdb), timeout=10000)
            got = bytes(into.read(data_in, timeout=10000)) if data_in else b""
            if data_out:
                out.write(data_out, timeout=10000)
            csw = bytes(into.read(13, timeout=10000))
            assert struct.unpack("<IIIB", csw) == (0x53425355, this, 0, 0), csw.hex()
            return got

        def read10(lba: int) -> bytes:
            return scsi(struct.pack(">BBIBHB", 0x28, 0, lba, 0, 1, 0), data_in=512)

        assert KNOWN_TEXT.encode() in read10(known_lba)
        scsi(struct.pack(">BBIBHB", 0x2A, 0, spare_lba, 0, 1, 0), data_out=pattern)
        assert read10(spare_lba) == pattern
        with pytest.raises(usb_core.USBError) as stall:  # QEMU refuses a vendor request
            dev.ctrl_transfer(0xC0, 0x42, 0, 0, 4)
        assert stall.value.errno == errno.EPIPE
    finally:
        usb.util.dispose_resources(dev)
        backend.close()
    # released: the stub is offered again
    wait_for(vm, f"grep -qx 1 /sys/bus/usb/devices/{busid}/usbip_status")
    vm.check(f"usbip unbind -b {busid}")
    wait_for(vm, f"[ -n \"$({_disks('! ')})\" ]")
    local = "/dev/" + vm.check(_disks("! ")).split()[0]
    on_disk = vm.check(f"dd if={local} bs=512 skip={spare_lba} count=1 2>/dev/null | md5sum")
    assert on_disk.split()[0] == hashlib.md5(pattern).hexdigest()
    vm.check(f"dd if=/dev/zero of={local} bs=512 seek={spare_lba} count=1 conv=fsync "
             "2>/dev/null")  # (the image as the other tests know it)


def _doctor(vm: Vm, args: str = "") -> tuple[int, dict[str, dict[str, str]]]:
    """usbipy doctor in the guest: its exit status, and its checks by name."""
    result = vm.run(f"{USBIPY} doctor {args} --json 2>/dev/null", timeout=180)
    report = json.loads(result.out)
    return result.rc, {c["check"]: c for c in report["checks"]}


def test_usbipy_doctor_names_what_is_wrong_in_a_real_kernel(
        clean: Stick, tmp_path_factory: pytest.TempPathFactory) -> None:
    """Each failure the doctor knows, made for real in the guest, and then a full
    attach it checks: nothing listening, a module not loaded, a firewall rule that
    drops the port, a server on loopback only, an expired certificate."""
    import datetime

    from usbipy.tls import certs

    vm, busid = clean.vm, clean.busid
    vm.check(f"usbip bind -b {busid}")
    rc, checks = _doctor(vm, "-c /dev/null")
    assert rc == 1
    assert checks["server"]["status"] == "fail"
    assert checks["server"]["detail"] == "nothing listens on port 3240"
    assert checks[f"binding {busid}"]["status"] == "ok"
    assert checks["module usbip-host"]["status"] == "ok"

    vm.check("usbipd -D")
    wait_for(vm, f"usbip list -r {LOOPBACK} 2>/dev/null | grep -q {busid}")
    rc, checks = _doctor(vm, "-c /dev/null")
    assert checks["server"]["status"] == "ok", checks["server"]
    assert "usbipd (pid" in checks["server"]["detail"]
    assert "dumpcap -i usbmon" in checks["capture"]["detail"]

    # a firewall rule that drops the port, on both sides of the walk
    vm.check("nft add table inet usbipytest && nft add chain inet usbipytest input "
             "'{ type filter hook input priority 0; }' && "
             "nft add rule inet usbipytest input tcp dport 3240 drop")
    try:
        rc, checks = _doctor(vm, "-c /dev/null")
        assert rc == 1 and checks["firewall"]["status"] == "fail"
        assert "nft: tcp dport 3240 drop" in checks["firewall"]["detail"]
        rc, checks = _doctor(vm, f"-r {LOOPBACK}")
        assert rc == 1
        assert "no answer in 5 s: a firewall drops the packets" in checks["TCP"]["detail"]
    finally:
        vm.check("nft delete table inet usbipytest")

    # vhci-hcd not loaded: said, with the command that loads it
    vm.check("modprobe -r vhci-hcd")
    try:
        rc, checks = _doctor(vm, f"-r {LOOPBACK} -b {busid}")
        assert rc == 1 and checks["vhci-hcd"]["status"] == "fail"
        assert checks["vhci-hcd"]["fix"] == "modprobe vhci-hcd"
    finally:
        vm.check("modprobe vhci-hcd")

    # the whole way: an attach the kernel enumerates (usb-storage, a disk), then detached
    rc, checks = _doctor(vm, f"-r {LOOPBACK} -b {busid} --attach")
    assert rc == 0, checks
    assert checks["TCP"]["status"] == "ok"
    attach = checks["attach"]["detail"]
    assert "usb-storage" in attach and "nodes sd" in attach, attach
    assert "vhci_hcd" in checks["kernel log"]["detail"]
    assert checks["detach"]["status"] == "ok"
    wait_for(vm, "! usbip port | grep -q 'Port in Use'")
    vm.run("pkill -x usbipd")
    wait_for(vm, "! pgrep -x usbipd")

    # usbipyd on loopback only, with a device bound: no one else can import it; and
    # its TLS files, one of them expired
    base = tmp_path_factory.mktemp("doctor-pki")
    certs.init_ca(base)
    past = datetime.datetime.now(datetime.UTC) - datetime.timedelta(days=10)
    old = certs.issue("old", server=True, base=base, not_before=past, days=1)
    start_usbipyd(vm, "-a", LOOPBACK)
    rc, checks = _doctor(vm, f"-c /dev/null --tls-cert {old.cert} --tls-key {old.key} "
                             f"--tls-ca {old.ca}")
    assert checks["server"]["status"] == "warning"
    assert "only: no other host can import" in checks["server"]["detail"]
    assert checks["TLS certificate"]["status"] == "fail"
    assert "expired on" in checks["TLS certificate"]["detail"]
    assert rc == 1
