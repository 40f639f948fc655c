"""Connections that heal, in the real kernel: a server that restarts, a network that
goes silent, and `usbipy attach --persistent` bringing the device back.

One guest, with a QEMU USB stick for usbip-host. The network that goes silent
is a veth pair the test makes in the guest: usbipyd listens on 10.77.0.1 in
the guest's own namespace, the clients attach from the namespace "far"
(10.77.0.2), and netem drops every packet both ways: no FIN, no RST, nothing.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from usbipy.keepalive import DEFAULT_TIMEOUT

from .conftest import require_vm
from .guest import KEEPERS, PYTHON, STOP_KEEPERS, USBIPY, USBIPYD, ext2_image, vhci_nodes, wait_for
from .vm import SERVER_ALIAS, Vm

MODULES = "xhci_pci usb-storage sd_mod usbip-host vhci-hcd ext4 veth sch_netem"
STICK_ID = "46f4:0001"
KNOWN_FILE = "hello.txt"
KNOWN_TEXT = "the stick's own bytes, still there after the network came back\n"
SERVER_IP = "10.77.0.1"
FAR = "ip netns exec far"
NETWORK = f"""
ip netns add far
ip link add usbipy0 type veth peer name usbipy1 netns far
ip addr add {SERVER_IP}/24 dev usbipy0 && ip link set usbipy0 up
ip -n far addr add 10.77.0.2/24 dev usbipy1 && ip -n far link set usbipy1 up
ip -n far link set lo up
"""
#: The pair and the namespace gone (ip link del is synchronous; netns del is not).
NETWORK_DOWN = "ip link del usbipy0; ip netns del far"
#: A silent network: every packet dropped, both ways.
CUT = "tc qdisc add dev usbipy0 root netem loss 100% && " \
      "ip netns exec far tc qdisc add dev usbipy1 root netem loss 100%"
RESTORE = "tc qdisc del dev usbipy0 root; ip netns exec far tc qdisc del dev usbipy1 root"
#: nft: the namespace sends no TCP reset (gone with it when the namespace goes).
QUIET_RESETS = """table inet quiet {
    chain out { type filter hook output priority 0; tcp flags rst drop; }
}"""
#: The bound on noticing a dead peer: the default timeout, one probe interval of
#: slack, and the time to look (the waits poll every 0.2 s of guest time).
BOUND = DEFAULT_TIMEOUT + 10




def stick_busid(vm: Vm) -> str:
    vid, pid = STICK_ID.split(":")
    out = vm.check("for d in /sys/bus/usb/devices/*; do [ -r $d/idVendor ] && "
                   "read -r v < $d/idVendor && read -r p < $d/idProduct && "
                   f"[ \"$v:$p\" = {vid}:{pid} ] && basename $d; done; true")
    [busid] = out.split()
    return busid


def attached(count: int) -> str:
    """Shell: ``count`` keepers say they are attached (their state files: cheaper to
    poll than a Python command in the guest)."""
    return (f"[ $(grep -l '\"state\": \"attached\"' {KEEPERS} 2>/dev/null | "
            f"wc -l) = {count} ]")


def report(text: str) -> None:
    """A measured time, in the test's output (pytest -s) and in its log."""
    print(f"measured: {text}", file=sys.stderr)


@pytest.fixture(scope="module")
def vm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Vm]:
    require_vm("mke2fs")
    image = ext2_image(tmp_path_factory.mktemp("stick") / "stick.img", "16M",
                       {KNOWN_FILE: KNOWN_TEXT})
    # (the stick on port 4: busid 1-4, apart from the emulated bus's 1-1)
    stick = ["-device", "qemu-xhci,id=xhci",
             "-drive", f"if=none,id=stick,format=raw,file={image}",
             "-device", "usb-storage,bus=xhci.0,port=4,drive=stick"]
    with Vm(extra_args=stick) as machine:
        machine.check(f"modprobe -a {MODULES}")
        wait_for(machine, f"lsusb | grep -q {STICK_ID}")
        yield machine


def guest_clock(vm: Vm) -> float:
    return float(vm.check("cat /proc/uptime").split()[0])


def keepers(vm: Vm) -> list[dict[str, object]]:
    entries = json.loads(vm.check(f"{USBIPY} port --json"))
    return [e["persistent"] for e in entries if e.get("persistent")]


def _until(condition: Callable[[], bool], timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.2)


def test_a_server_restart_brings_the_disk_back(vm: Vm, tmp_path: Path) -> None:
    """The host's usbipyd serves a disk; the guest holds it with --persistent. The
    server is killed (SIGKILL) and started again: the disk comes back as a new block
    device, and a file written and synced before reads back whole."""
    image = tmp_path / "disk.img"
    with open(image, "wb") as f:
        f.truncate(16 << 20)
    log_path = tmp_path / "usbipyd.log"
    command = [PYTHON, "-m", "usbipy.cli.usbipyd", "-c", "/dev/null", "--no-usbip-host",
               "--no-libusb", "--disk", str(image), "-t", str(vm.server_port)]

    def start() -> subprocess.Popen[bytes]:
        with open(log_path, "ab") as log_file:
            daemon = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=log_file,
                                      stderr=log_file)
        _until(lambda: daemon.poll() is not None
               or f"listening on 127.0.0.1:{vm.server_port}" in log_path.read_text())
        assert daemon.poll() is None, log_path.read_text()
        return daemon

    daemon = start()
    try:
        vm.check(f"setsid {USBIPY} attach -r {SERVER_ALIAS} -b 1-1 --persistent "
                 "--max-delay 5 </dev/null >/run/keeper.log 2>&1 &")
        wait_for(vm, f"[ -n \"$({vhci_nodes('block')})\" ]")
        first = vm.check(vhci_nodes("block")).split()[0]
        wait_for(vm, f"[ \"$(cat /sys/block/{first}/size)\" != 0 ]")
        # resumable: a lost network would be resumed; a killed server is not, as before
        assert [k["resumable"] for k in keepers(vm)] == [True]
        vm.check(f"set -e; mkfs.ext4 -q -F /dev/{first}; mkdir -p /mnt/a; "
                 f"mount /dev/{first} /mnt/a; head -c 2M /dev/urandom > /mnt/a/data; "
                 "md5sum /mnt/a/data | cut -d' ' -f1 > /run/data.md5; sync", timeout=300)

        daemon.kill()  # no goodbye: the process is gone
        daemon.wait()
        lost_at = guest_clock(vm)
        wait_for(vm, "grep -q 'connection lost' /run/keeper.log")
        report(f"server killed: the keeper noticed after {guest_clock(vm) - lost_at:.1f} s "
               "(guest time)")
        vm.run("umount -l /mnt/a")
        wait_for(vm, f"[ -z \"$({vhci_nodes('block')})\" ]")  # the disk is gone
        # not listening: the keeper waits and retries, and says so in `usbipy port`
        wait_for(vm, "grep -q '\"state\": \"waiting\"' /run/usbipy/attach/*.json")
        ports = vm.check(f"{USBIPY} port")
        assert "Persistent attachments waiting" in ports, ports
        assert f"usbip://{SERVER_ALIAS}:3240/1-1: <" in ports and "last error: " in ports, ports

        daemon = start()
        back_at = guest_clock(vm)
        wait_for(vm, f"[ -n \"$({vhci_nodes('block')})\" ] && {attached(1)}")
        second = vm.check(vhci_nodes("block")).split()[0]
        wait_for(vm, f"[ \"$(cat /sys/block/{second}/size)\" != 0 ]")
        report(f"server restarted: the disk was back after {guest_clock(vm) - back_at:.1f} s "
               "(guest time)")
        out = vm.check(f"mkdir -p /mnt/b && mount /dev/{second} /mnt/b && "
                       "md5sum /mnt/b/data | cut -d' ' -f1; umount /mnt/b")
        assert out.strip() == vm.check("cat /run/data.md5").strip()
        [keeper] = keepers(vm)
        assert keeper["state"] == "attached" and keeper["reattached"] == 1, keeper
        assert "re-attached 1 times)" in vm.check(f"{USBIPY} port")

        # stopped for good: detached, and not back when the server is
        vm.check(f"{USBIPY} detach -b 1-1")
        assert keepers(vm) == []
        wait_for(vm, f"[ -z \"$({vhci_nodes('block')})\" ]")
        # (a pattern this shell's own command line does not match)
        assert vm.run("pgrep -f '[u]sbipy.cli.usbipy .*attach'").rc == 1
        log = vm.check("cat /run/keeper.log")
        assert "stopped: port" in log, log
        # (through QEMU's forward a server that is gone is a connection accepted and
        # closed, not one refused: the keeper gives resuming up either way)
        assert re.search(r"nothing listens on the server's port any more|3 connections in a "
                         r"row closed with no answer to the resume", log), log
    finally:
        daemon.kill()
        daemon.wait()
        vm.run(f"{STOP_KEEPERS}; for p in $(usbip port | sed -n "
               "'s/^Port \\([0-9]*\\):.*/\\1/p'); do usbip detach -p $p; done")


def _stub_status(vm: Vm, busid: str) -> str:
    return vm.check(f"cat /sys/bus/usb/devices/{busid}/usbip_status").strip()


def test_a_silent_network_frees_the_devices_and_the_clients_come_back(vm: Vm) -> None:
    """usbipyd in the guest exports the stick (usbip-host) and an emulated disk
    (Python); from the other namespace, both are held with --persistent. Then the
    network goes silent. Within the dead-peer bound the server frees both (the
    stub "available" again, the emulated disk importable) and the clients let go;
    when the network is back, both come back, with their data."""
    # (the C tools where usbipy's are not the point: Python starts slowly in the guest)
    stick = stick_busid(vm)
    assert stick != "1-1"
    vm.check(NETWORK)
    vm.check(f"usbip bind -b {stick} && truncate -s 16M /run/scratch.img")
    vm.check(f"setsid {USBIPYD} -c /dev/null --no-libusb --disk /run/scratch.img "
             f"-a {SERVER_IP} -a 127.0.0.1 -P /run/usbipyd.pid </dev/null "
             ">/run/usbipyd.log 2>&1 &")
    try:
        wait_for(vm, f"usbip list -r 127.0.0.1 2>/dev/null | grep -q ' {stick}: '")
        for busid in (stick, "1-1"):
            # (--no-resume: today's loss and re-attach; resumption has its own test)
            vm.check(f"{FAR} setsid {USBIPY} attach -r {SERVER_IP} -b {busid} --persistent "
                     f"--no-resume </dev/null >/run/keeper-{busid}.log 2>&1 &")
        wait_for(vm, attached(2))
        assert _stub_status(vm, stick) == "2"
        wait_for(vm, f"[ $({vhci_nodes('block')} | wc -l) = 2 ]")
        stick_disk = _disk_of(vm, STICK_ID)
        assert vm.check(f"mount -o ro /dev/{stick_disk} /mnt && cat /mnt/{KNOWN_FILE}; "
                        "umount /mnt") == KNOWN_TEXT

        vm.check(CUT)
        # One loop of cheap reads notes when each side let go, in guest seconds: the
        # stub available again, usbipyd's log line for the emulated disk, vhci-hcd's
        # ports all free (status 004).
        times = _first_times(vm, {
            "stub": f"grep -qx 1 /sys/bus/usb/devices/{stick}/usbip_status",
            "emulated": "grep -q '1-1 lost' /run/usbipyd.log",
            "ports": "! grep -q ' 006 ' /sys/devices/platform/vhci_hcd.0/status",
        }, BOUND)
        report(f"network silent: usbip-host free after {times['stub']:.1f} s, the emulated "
               f"disk after {times['emulated']:.1f} s, the client's ports after "
               f"{times['ports']:.1f} s (dead-peer timeout {DEFAULT_TIMEOUT:g} s, guest time)")
        # and the emulated disk is offered again
        wait_for(vm, "usbip list -r 127.0.0.1 | grep -q ' 1-1: '")
        log = vm.check("cat /run/usbipyd.log")
        assert re.search(r"1-1 lost: the client stopped answering \(dead_peer_timeout\)",
                         log), log

        vm.check(RESTORE)
        back_at = guest_clock(vm)
        wait_for(vm, attached(2))
        wait_for(vm, f"[ $({vhci_nodes('block')} | wc -l) = 2 ]")
        report(f"network back: both re-attached after {guest_clock(vm) - back_at:.1f} s")
        assert _stub_status(vm, stick) == "2"
        stick_disk = _disk_of(vm, STICK_ID)
        assert vm.check(f"mount -o ro /dev/{stick_disk} /mnt && cat /mnt/{KNOWN_FILE}; "
                        "umount /mnt") == KNOWN_TEXT

        # a stopped persistent attachment does not come back
        port = next(k["port"] for k in keepers(vm) if k["busid"] == stick)
        vm.check(f"{USBIPY} detach -p {port}")
        wait_for(vm, f"grep -qx 1 /sys/bus/usb/devices/{stick}/usbip_status")
        assert vm.check(f"grep -h -o '\"busid\": \"[^\"]*\"' {KEEPERS}").split() == [
            '"busid":', '"1-1"']
    finally:
        vm.run(f"{STOP_KEEPERS}; {RESTORE}; "
               "[ -e /run/usbipyd.pid ] && kill $(cat /run/usbipyd.pid); "
               "for p in $(usbip port | sed -n 's/^Port \\([0-9]*\\):.*/\\1/p'); do "
               f"usbip detach -p $p; done; {NETWORK_DOWN}; usbip unbind -b {stick}")
        wait_for(vm, "[ ! -e /run/usbipyd.pid ]")


def test_against_the_c_usbipd_the_stub_stays_busy_until_freed(vm: Vm) -> None:
    """The same silence with Debian's usbipd as the server, which sets no keepalive on
    the socket it hands to usbip-host: the client lets go within the bound, but the
    stub stays "in use" and the keeper is answered DEV_BUSY; it rides through that,
    and attaches again once the stub is freed (unbind and bind)."""
    stick = stick_busid(vm)
    vm.check(NETWORK)
    vm.run(f"usbip bind -b {stick}")
    vm.check("usbipd -D")
    try:
        wait_for(vm, f"usbip list -r 127.0.0.1 2>/dev/null | grep -q ' {stick}: '")
        # (in the background, as a user would start it: its log is in the run directory)
        out = vm.check(f"{FAR} {USBIPY} --json attach -r {SERVER_IP} -b {stick} "
                       "--persistent --background --dead-peer-timeout 5 --max-delay 2")
        keeper_log = json.loads(out)["log"]
        wait_for(vm, attached(1))
        vm.check(CUT)
        cut_at = guest_clock(vm)
        wait_for(vm, "! usbip port | grep -q 'Port in Use'", 5 + 10)
        report(f"C usbipd, network silent: the client's port free after "
               f"{guest_clock(vm) - cut_at:.1f} s")
        # The client's kernel would answer a segment of the stub's old connection (a
        # reply it retransmits after the silence) with a reset, and free the stub:
        # what a client that is gone for good (rebooted, moved) never sends.
        vm.check(f"{FAR} nft -f - <<'EOF'\n{QUIET_RESETS}\nEOF")
        vm.check(RESTORE)
        # the keeper is back in touch with the server, which still holds the stub
        try:
            wait_for(vm, f"grep -q DEV_BUSY {keeper_log}")
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n--- the keeper's log ---\n"
                                 f"{vm.run(f'cat {keeper_log}').out}") from None
        assert _stub_status(vm, stick) == "2"
        report(f"C usbipd: the stub still in use {guest_clock(vm) - cut_at:.1f} s after the "
               "network went silent")
        vm.check(f"usbip unbind -b {stick} && usbip bind -b {stick}")
        wait_for(vm, attached(1))
        assert _stub_status(vm, stick) == "2"
        keeper_text = vm.check(f"cat {keeper_log}")
        assert "refused: the device is already imported by another client (DEV_BUSY)" in (
            keeper_text)
        # usbipd never saw the offer of a resumable stream, nor did the keeper try one
        assert "resum" not in keeper_text, keeper_text
        assert '"resumable": false' in vm.check(f"cat {KEEPERS}")
    finally:
        vm.run(f"{STOP_KEEPERS}; {RESTORE}; pkill -x usbipd; "
               "for p in $(usbip port | sed -n 's/^Port \\([0-9]*\\):.*/\\1/p'); do "
               f"usbip detach -p $p; done; {NETWORK_DOWN}; usbip unbind -b {stick}")
        wait_for(vm, "! pgrep -x usbipd")


def _first_times(vm: Vm, conditions: dict[str, str], bound: float) -> dict[str, float]:
    """Poll shell ``conditions`` together from now; the guest seconds until each first
    held. Fails when one has not held after ``bound`` seconds."""
    checks = "".join(
        f"[ -z \"${name}\" ] && {{ {cond}; }} && {name}=$(awk -v s=$start "
        f"'{{print $1 - s}}' /proc/uptime); "
        for name, cond in conditions.items())
    names = " ".join(f"{name}=${name}" for name in conditions)
    done = " && ".join(f"[ -n \"${name}\" ]" for name in conditions)
    script = (f"start=$(cut -d' ' -f1 /proc/uptime); end=$((SECONDS + {int(bound) + 1})); "
              f"while :; do {checks}if {done}; then echo {names}; exit 0; fi; "
              f"[ $SECONDS -lt $end ] || {{ echo timed out: {names}; exit 1; }}; sleep 0.1; "
              "done")
    out = vm.check(script, timeout=bound + 60)
    return {key: float(value) for key, value in
            (item.split("=", 1) for item in out.split())}


def _disk_of(vm: Vm, vid_pid: str) -> str:
    """The vhci block device of the USB device vid:pid."""
    vid, pid = vid_pid.split(":")
    script = (f"for b in $({vhci_nodes('block')}); do d=$(readlink -f /sys/block/$b); "
              f"while [ \"$d\" != / ]; do [ -r $d/idVendor ] && break; d=${{d%/*}}; done; "
              f"[ \"$(cat $d/idVendor):$(cat $d/idProduct)\" = {vid}:{pid} ] && echo $b; "
              "done; true")
    wait_for(vm, f"[ -n \"$({script})\" ]")
    return vm.check(script).split()[0]


#: 64 KiB records written one at a time, each O_DIRECT|O_SYNC (acknowledged by the
#: disk before the next), while the network is cut.
RECORDS = 200
WRITER = (f"(for i in $(seq 0 {RECORDS - 1}); do dd if=/tmp/records of=DISK bs=64k skip=$i "
          "seek=$i count=1 oflag=direct,dsync 2>/tmp/writer.err "
          "|| { echo $? > /tmp/writer.rc; exit; }; echo $i > /tmp/progress; done; "
          "echo 0 > /tmp/writer.rc) >/dev/null 2>&1 &")


def _progress(vm: Vm) -> int:
    out = vm.check("cat /tmp/progress 2>/dev/null || echo -1")
    return int(out.strip() or -1)


def _start_resumable(vm: Vm, server_options: str = "") -> str:
    """usbipyd in the guest with an emulated disk; the client in the other namespace
    with --persistent; the records' writer started. The disk's block device."""
    vm.check(NETWORK)
    vm.check("truncate -s 16M /run/resume.img")
    vm.check(f"setsid {USBIPYD} -c /dev/null --no-libusb --no-usbip-host --disk "
             f"/run/resume.img -a {SERVER_IP} -P /run/usbipyd.pid {server_options} "
             "</dev/null >/run/usbipyd.log 2>&1 &")
    wait_for(vm, f"grep -q 'listening on {SERVER_IP}' /run/usbipyd.log")
    vm.check(f"{FAR} setsid {USBIPY} attach -r {SERVER_IP} -b 1-1 --persistent "
             "--max-delay 2 </dev/null >/run/keeper.log 2>&1 &")
    wait_for(vm, attached(1))
    wait_for(vm, f"[ -n \"$({vhci_nodes('block')})\" ]")
    [disk] = vm.check(vhci_nodes("block")).split()
    wait_for(vm, f"[ \"$(cat /sys/block/{disk}/size)\" != 0 ]")
    assert [k["resumable"] for k in keepers(vm)] == [True]
    vm.check(f"dmesg -C; head -c $((64 * 1024 * {RECORDS})) /dev/urandom > /tmp/records; "
             "rm -f /tmp/progress /tmp/writer.rc")
    vm.check(WRITER.replace("DISK", f"/dev/{disk}"))
    return disk


def _stop_resumable(vm: Vm) -> None:
    vm.run(f"pkill -f '[d]d if=/tmp/records'; {STOP_KEEPERS}; {RESTORE}; "
           "[ -e /run/usbipyd.pid ] && kill $(cat /run/usbipyd.pid); "
           "for p in $(usbip port | sed -n 's/^Port \\([0-9]*\\):.*/\\1/p'); do "
           f"usbip detach -p $p; done; {NETWORK_DOWN}")
    wait_for(vm, "[ ! -e /run/usbipyd.pid ]")


def _cut_for(vm: Vm, seconds: float) -> None:
    """Cut the network for ``seconds`` of guest time (the cut itself is what the test
    is about), making sure the client noticed and said so in `usbipy port`."""
    before = _progress(vm)
    vm.check(CUT)
    cut_at = guest_clock(vm)
    wait_for(vm, f"grep -qs '\"down_since\": [0-9]' {KEEPERS}", BOUND + 30)
    ports = vm.check(f"{USBIPY} port")
    assert re.search(r"resuming, down \d+ s", ports), ports
    report(f"cut of {seconds:g} s: the client noticed after {guest_clock(vm) - cut_at:.1f} s")
    left = seconds - (guest_clock(vm) - cut_at)
    if left > 0:
        vm.check(f"sleep {left:.1f}", timeout=left + 60)
    vm.check(RESTORE)
    back_at = guest_clock(vm)
    wait_for(vm, f"! grep -qs '\"down_since\": [0-9]' {KEEPERS}")
    report(f"cut of {seconds:g} s: resumed {guest_clock(vm) - back_at:.1f} s after the "
           "network came back")
    # the writes go on
    wait_for(vm, f"[ -s /tmp/writer.rc ] || [ $(cat /tmp/progress) -ge {before + 8} ]")


def test_a_cut_network_is_resumed_in_place(vm: Vm) -> None:
    """O_DIRECT|O_SYNC records go to usbipyd's emulated disk while the network is cut
    for 25 s, then 45 s (longer than the SCSI command timeout). The connection is
    resumed in place each time: the same block device throughout, no write fails,
    no disconnect, and every record reads back."""
    try:
        disk = _start_resumable(vm)
        wait_for(vm, "[ -s /tmp/progress ] && [ $(cat /tmp/progress) -ge 8 ]")
        _cut_for(vm, 25)
        _cut_for(vm, 45)
        wait_for(vm, "[ -s /tmp/writer.rc ]", timeout=600)
        rc = vm.check("cat /tmp/writer.rc; cat /tmp/writer.err").split("\n", 1)
        log = vm.check("dmesg")
        assert rc[0].strip() == "0", f"a write failed: {rc}\n{log[-3000:]}"
        assert "USB disconnect" not in log, log[-3000:]
        assert vm.check(vhci_nodes("block")).split() == [disk]
        same = vm.check(f"cmp -n $((64 * 1024 * {RECORDS})) /tmp/records /dev/{disk} "
                        "&& echo same")
        assert "same" in same
        [keeper] = keepers(vm)
        assert (keeper["resumed"], keeper["reattached"]) == (2, 0), keeper
        server_log = vm.check("cat /run/usbipyd.log")
        assert len(re.findall(r"resumed 1-1 of ", server_log)) == 2, server_log
        assert "resumed 2 times" in vm.check(f"{USBIPY} port")
    finally:
        _stop_resumable(vm)


def test_a_cut_longer_than_the_window_falls_back_to_attaching_again(vm: Vm) -> None:
    """With a resume window of 5 s, a cut of 40 s ends the attachment on both sides,
    as before resumption: the disk goes, and comes back once the network does."""
    try:
        _start_resumable(vm, "--resume-window 5")
        vm.check("pkill -f '[d]d if=/tmp/records'; true")
        vm.check(CUT)
        wait_for(vm, "grep -q 'not resumed within 5 s (resume_window): 1-1 released' "
                     "/run/usbipyd.log", BOUND + 30)
        wait_for(vm, "grep -q \"not resumed within the server's 5 s\" /run/keeper.log",
                 BOUND + 30)
        wait_for(vm, f"[ -z \"$({vhci_nodes('block')})\" ]")  # the disk went
        vm.check(RESTORE)
        wait_for(vm, f"[ -n \"$({vhci_nodes('block')})\" ] && {attached(1)}")
        [keeper] = keepers(vm)
        assert keeper["reattached"] == 1 and keeper["resumed"] == 0, keeper
    finally:
        _stop_resumable(vm)
