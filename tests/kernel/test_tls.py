"""Mutual TLS where the Linux kernel owns the socket (kTLS), as a user sees it.

One guest holds every path: its vhci-hcd imports the host's emulated disk over
TLS (kernel TLS in the guest, userspace TLS in the host's server), and a QEMU
USB stick is exported by usbip-host and imported by vhci-hcd in the same guest,
both sockets in kernel TLS. A capture of the host's side of the connection
proves the bytes on the wire are encrypted.
"""

from __future__ import annotations

import hashlib
import logging
import re
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from usbipy.devices import CdcAcm, HidKeyboard, ImageFile, MassStorage
from usbipy.server import ServerThread
from usbipy.server.tls import ServerTls
from usbipy.tls import TlsFiles, server_context
from usbipy.tls.certs import Issued, init_ca, issue

from .conftest import qemu_stick, require_vm
from .guest import KEEPERS, STOP_KEEPERS, USBIPY, USBIPYD, ext2_image, vhci_node, wait_for
from .vm import SERVER_ALIAS, Vm

STICK_ID = "46f4:0001"  # QEMU's usb-storage
KNOWN_FILE = "hello.txt"
KNOWN_TEXT = "the stick's own bytes, read through USB/IP over kernel TLS\n"
STICK_SIZE = 16 << 20
MODULES = "xhci_pci usb-storage sd_mod usbip-host vhci-hcd ext4 tls cdc_acm"
LOOPBACK = "127.0.0.1"
SERVER_NAME = "usbipy-lab"
CLIENT_NAME = "alice"
#: the guest's own usbipyd: TLS, and (for the speed figure) plaintext on loopback
GUEST_TLS_PORT = 3240
GUEST_PLAIN_PORT = 3241
MARKER = b"USBIPY-PLAINTEXT-MARKER-0123456789"
#: Shell: no socket in kernel TLS any more.
NO_KTLS_SOCKETS = ("awk '$1 ~ /^TlsCurr(Tx|Rx)Sw$/ && $2 != 0 { n++ } END { exit n }' "
                   "/proc/net/tls_stat")
#: Ceiling of a wait on the host.
WAIT = 120

pytestmark = pytest.mark.kernel


@dataclass(frozen=True)
class Certs:
    server: TlsFiles
    client: TlsFiles
    #: a client certificate signed by another CA (its holder trusts our CA: the
    #: server's certificate passes, the server refuses the client's)
    foreign: TlsFiles


def _files(issued: Issued) -> TlsFiles:
    return TlsFiles(issued.cert, issued.key, issued.ca)


def options(files: TlsFiles) -> str:
    """The --tls-* options for ``files`` (the guest reads the host's files over 9p)."""
    return f"--tls-cert {files.cert} --tls-key {files.key} --tls-ca {files.ca}"


@dataclass
class Lab:
    vm: Vm
    certs: Certs
    stick_busid: str
    stick_image: Path


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    """One guest with a QEMU USB stick, kernel TLS loaded, and certificates from two CAs.

    The files are made before the guest boots: it sees the host's / over 9p.
    """
    require_vm("mke2fs", "dumpcap", "debugfs")
    base = tmp_path_factory.mktemp("tls")
    init_ca(base / "ours")
    server = issue(SERVER_NAME, server=True, base=base / "ours",
                   alt_names=(SERVER_ALIAS, LOOPBACK))
    client = issue(CLIENT_NAME, server=False, base=base / "ours")
    init_ca(base / "theirs", name="another CA")
    foreign = issue("mallory", server=False, base=base / "theirs")
    certs = Certs(_files(server), _files(client),
                  TlsFiles(foreign.cert, foreign.key, server.ca))
    image = ext2_image(tmp_path_factory.mktemp("stick") / "stick.img", str(STICK_SIZE >> 10),
                       {KNOWN_FILE: KNOWN_TEXT})
    with Vm(extra_args=qemu_stick(image)) as vm:
        vm.check(f"modprobe -a {MODULES}")
        # the guest reads the host's files where the host wrote them
        assert vm.check(f"cat {certs.client.cert}") == certs.client.cert.read_text()
        wait_for(vm, f"lsusb | grep -q {STICK_ID}")
        busid = wait_for_stick(vm)
        yield Lab(vm, certs, busid, image)


def wait_for_stick(vm: Vm) -> str:
    wait_for(vm, f"[ -n \"$({_local_disks()})\" ]")
    out = vm.check("for d in /sys/bus/usb/devices/*; do [ -r $d/idVendor ] && "
                   "read -r v < $d/idVendor && read -r p < $d/idProduct && "
                   f"[ \"$v:$p\" = {STICK_ID} ] && basename $d; done; true")
    [busid] = out.split()
    return busid


def _local_disks() -> str:
    """Shell: the sd disks that are not behind vhci_hcd (the stick on QEMU's xHCI)."""
    return ("for b in /sys/block/sd*; do [ -e \"$b\" ] || continue; ! readlink -f $b | "
            "grep -q vhci_hcd && basename $b; done")


@pytest.fixture
def clean(lab: Lab) -> Iterator[Lab]:
    """Leave the guest as the test found it: no usbipyd, nothing attached, nothing bound."""
    yield lab
    vm, busid = lab.vm, lab.stick_busid
    vm.run("[ -e /run/usbipyd.pid ] && kill $(cat /run/usbipyd.pid); "
           "for p in $(usbip port | sed -n 's/^Port \\([0-9]*\\):.*/\\1/p'); do "
           "usbip detach -p $p; done")
    wait_for(vm, "! usbip port | grep -q 'Port in Use' && "
             f"! grep -qsx 2 /sys/bus/usb/devices/{busid}/usbip_status")
    vm.run(f"[ -e /sys/bus/usb/drivers/usbip-host/{busid} ] && usbip unbind -b {busid}")
    wait_for(vm, f"[ -n \"$({_local_disks()})\" ] && [ ! -e /run/usbipyd.pid ]")


def tls_server(lab: Lab, image: Path) -> ServerThread:
    """The demo devices on the host, behind mutual TLS (userspace: this host has no kTLS)."""
    tls = ServerTls(server_context(lab.certs.server, kernel=False), kernel=False)
    return ServerThread([HidKeyboard(), MassStorage(ImageFile(image)), CdcAcm()],
                        port=lab.vm.server_port, tls=tls)


def plain_server(lab: Lab, image: Path) -> ServerThread:
    return ServerThread([HidKeyboard(), MassStorage(ImageFile(image)), CdcAcm()],
                        port=lab.vm.server_port)


def tls_stat(vm: Vm) -> dict[str, int]:
    out = vm.check("cat /proc/net/tls_stat")
    return {name: int(value) for name, value in (line.split() for line in out.splitlines())}


def attached_port(vm: Vm) -> int:
    [port] = re.findall(r"^Port (\d+): <Port in Use>", vm.check(f"{USBIPY} port"), re.M)
    return int(port)


def detach(vm: Vm) -> None:
    vm.check(f"{USBIPY} detach -p {attached_port(vm)}")
    wait_for(vm, "! usbip port | grep -q 'Port in Use'")


class Capture:
    """dumpcap on the host's loopback, on the port the guest's connections reach.

    Started and proven live before any traffic (a probe datagram on a side port
    must reach the file); stopped, and so flushed, before the file is read.
    """

    def __init__(self, port: int, path: Path) -> None:
        self.port = port
        self.path = path
        self.proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> Capture:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.bind((LOOPBACK, 0))
            probe_port = s.getsockname()[1]
        self.log = self.path.with_suffix(".log")
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(
                ["dumpcap", "-q", "-i", "lo", "-f",
                 f"tcp port {self.port} or udp port {probe_port}", "-w", str(self.path)],
                stdout=subprocess.DEVNULL, stderr=log)
        deadline = time.monotonic() + WAIT
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            while b"probe-" + str(probe_port).encode() not in self._read():
                assert self.proc.poll() is None, self.log.read_text()
                assert time.monotonic() < deadline, "the capture did not start"
                probe.sendto(b"probe-%d" % probe_port, (LOOPBACK, probe_port))
                time.sleep(0.1)
        return self

    def _read(self) -> bytes:
        try:
            return self.path.read_bytes()
        except FileNotFoundError:
            return b""

    def stop(self) -> bytes:
        """Stop the capture; the captured file's bytes."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            self.proc.wait(timeout=WAIT)
        return self._read()

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def write_marker(vm: Vm, disk: str, mib: int) -> None:
    """Write ``mib`` MiB of the marker onto the raw disk and read them back, bypassing the
    page cache both ways: the pattern crosses the connection in both directions."""
    out = vm.check(f"set -e; yes {MARKER.decode()} | head -c {mib}M | "
                   f"dd of={disk} bs=1M oflag=direct status=none; "
                   f"dd if={disk} bs=1M count={mib} iflag=direct status=none | "
                   f"grep -c {MARKER.decode()}", timeout=300)
    # ('yes' writes the marker and a newline: the whole area reads back as marker lines)
    assert int(out) >= (mib << 20) // (len(MARKER) + 1) - 1, out


def test_a_capture_of_plaintext_usbip_shows_the_pattern(clean: Lab, image: Path,
                                                        tmp_path: Path) -> None:
    """The positive control for the encryption test: the capture sees plaintext."""
    vm = clean.vm
    with plain_server(clean, image), Capture(vm.server_port, tmp_path / "plain.pcapng") as cap:
        vm.check(f"{USBIPY} attach -r {SERVER_ALIAS} -b 1-2")
        disk = vhci_node(vm, "block")
        write_marker(vm, disk, 1)
        detach(vm)
        wire = cap.stop()
    assert wire.count(MARKER) > 1000


def test_emulated_disk_over_tls(clean: Lab, image: Path, tmp_path: Path) -> None:
    vm, certs = clean.vm, clean.certs
    with tls_server(clean, image), Capture(vm.server_port, tmp_path / "tls.pcapng") as cap:
        out = vm.check(f"{USBIPY} {options(certs.client)} attach -r {SERVER_ALIAS} -b 1-2")
        assert f"attached 1-2 from {SERVER_ALIAS}:3240 on port" in out, out
        assert f"over TLS with CN={SERVER_NAME}" in out, out
        disk = vhci_node(vm, "block")
        # the kernel holds the session: vhci-hcd's socket in kTLS both ways
        stat = tls_stat(vm)
        assert stat["TlsCurrTxSw"] >= 1 and stat["TlsCurrRxSw"] >= 1, stat
        ports = vm.check(f"{USBIPY} port")
        assert f"usbip://{SERVER_ALIAS}:3240/1-2" in ports, ports
        assert f"-> encrypted (kernel TLS, TLSv1.2) with CN={SERVER_NAME}" in ports, ports

        write_marker(vm, disk, 2)
        out = vm.check(
            f"set -e; mkfs.ext4 -q -F {disk}; mkdir -p /mnt/d; mount {disk} /mnt/d; "
            "head -c 5M /dev/urandom > /mnt/d/a.bin; head -c 3M /dev/urandom > /mnt/d/b.bin; "
            "md5sum /mnt/d/a.bin /mnt/d/b.bin > /tmp/sums; umount /mnt/d; "
            "echo 3 > /proc/sys/vm/drop_caches; "
            f"mount {disk} /mnt/d; cd /mnt && md5sum -c /tmp/sums; cd /; umount /mnt/d; "
            "cat /tmp/sums", timeout=600)
        assert "a.bin: OK" in out and "b.bin: OK" in out, out
        sums = {line.split()[1].split("/")[-1]: line.split()[0]
                for line in out.splitlines() if line.endswith(".bin") and len(line.split()) == 2}
        detach(vm)
        wire = cap.stop()
    # vhci-hcd let go of the socket, and with it the kernel's TLS state
    wait_for(vm, NO_KTLS_SOCKETS)
    assert vm.check("grep TlsDecryptError /proc/net/tls_stat").split()[1] == "0"
    # the bytes crossed this connection (megabytes of it), and none in clear
    assert len(wire) > 8 << 20, len(wire)
    assert MARKER not in wire
    assert MARKER[:16] not in wire
    # the files are in the host's image
    for name, digest in sums.items():
        data = subprocess.run(["debugfs", "-R", f"cat /{name}", str(image)],
                              capture_output=True, check=True).stdout
        assert hashlib.md5(data).hexdigest() == digest


def test_a_client_from_another_ca_is_refused(clean: Lab, image: Path,
                                             caplog: pytest.LogCaptureFixture) -> None:
    vm, certs = clean.vm, clean.certs
    caplog.set_level(logging.WARNING, logger="usbipy.server")
    with tls_server(clean, image):
        refused = vm.run(f"{USBIPY} {options(certs.foreign)} attach -r {SERVER_ALIAS} -b 1-2")
        assert refused.rc == 1, refused.out
        # one line that says why
        assert refused.out.count("\n") == 1, refused.out
        # (the server's TLS is userspace here: it too must send the alert that says why)
        assert refused.out == (f"usbipy: error: TLS with {SERVER_ALIAS}:3240 failed: the peer "
                               "refused the TLS handshake: our certificate is not signed by a "
                               "CA it trusts\n"), refused.out
        assert "Port in Use" not in vm.check("usbip port")
        # the server said why, and serves on: a good client attaches
        deadline = time.monotonic() + WAIT
        while not any("TLS handshake refused" in r.getMessage() for r in caplog.records):
            assert time.monotonic() < deadline, caplog.text
            time.sleep(0.1)
        [refusal] = [r.getMessage() for r in caplog.records
                     if "TLS handshake refused" in r.getMessage()]
        assert "the peer's certificate is not accepted" in refusal, refusal
        out = vm.check(f"{USBIPY} {options(certs.client)} attach -r {SERVER_ALIAS} -b 1-2")
        assert f"over TLS with CN={SERVER_NAME}" in out, out
        disk = vhci_node(vm, "block")
        vm.check(f"dd if={disk} of=/dev/null bs=64k count=16 iflag=direct status=none")
        detach(vm)


def start_usbipyd(vm: Vm, *args: str) -> None:
    """usbipyd in the guest's background, logging to /run/usbipyd.log."""
    vm.check(f"setsid {USBIPYD} -P /run/usbipyd.pid {' '.join(args)} "
             "</dev/null >/run/usbipyd.log 2>&1 &")


def dd_seconds(vm: Vm, disk: str, mib: int) -> float:
    """Seconds to read ``mib`` MiB of ``disk`` through vhci, bypassing the page cache."""
    out = vm.check(f"dd if={disk} of=/dev/null bs=1M count={mib} iflag=direct", timeout=600)
    m = re.search(r"copied, ([\d.]+) s", out)
    assert m, out
    return float(m.group(1))


def test_usbip_host_exports_over_kernel_tls_in_one_guest(clean: Lab) -> None:
    vm, certs, busid = clean.vm, clean.certs, clean.stick_busid
    expected = hashlib.md5(clean.stick_image.read_bytes()[:STICK_SIZE]).hexdigest()
    vm.check(f"{USBIPY} bind -b {busid}")
    wait_for(vm, f"[ -z \"$({_local_disks()})\" ]")  # usb-storage let go of it
    start_usbipyd(vm, options(certs.server), "-a", LOOPBACK, "-t", str(GUEST_TLS_PORT),
                  "--plaintext-port", str(GUEST_PLAIN_PORT))
    wait_for(vm, f"grep -qF 'listening on {LOOPBACK}:{GUEST_TLS_PORT} (mutual TLS, kernel TLS)' "
             "/run/usbipyd.log || { cat /run/usbipyd.log; false; }")

    # a client from another CA is refused, with the reason on both sides
    refused = vm.run(f"{USBIPY} {options(certs.foreign)} attach -r {LOOPBACK} "
                     f"-t {GUEST_TLS_PORT} -b {busid}")
    assert refused.rc == 1, refused.out
    assert refused.out == (f"usbipy: error: TLS with {LOOPBACK}:{GUEST_TLS_PORT} failed: the "
                           "peer refused the TLS handshake: our certificate is not signed by a "
                           "CA it trusts\n"), refused.out
    wait_for(vm, "grep -qF \"TLS handshake refused: the peer's certificate is not accepted: "
             "unable to get local issuer certificate\" /run/usbipyd.log")
    assert vm.check(f"cat /sys/bus/usb/devices/{busid}/usbip_status").strip() == "1"

    out = vm.check(f"{USBIPY} {options(certs.client)} --tls-server-name {SERVER_NAME} "
                   f"attach -r {LOOPBACK} -t {GUEST_TLS_PORT} -b {busid}")
    assert f"over TLS with CN={SERVER_NAME}" in out, out
    disk = vhci_node(vm, "block")
    # both ends' sockets are the kernel's, each in kTLS both ways
    stat = tls_stat(vm)
    assert stat["TlsCurrTxSw"] >= 2 and stat["TlsCurrRxSw"] >= 2, stat
    assert vm.check(f"cat /sys/bus/usb/devices/{busid}/usbip_status").strip() == "2"
    ports = vm.check(f"{USBIPY} port")
    assert f"-> encrypted (kernel TLS, TLSv1.2) with CN={SERVER_NAME}" in ports, ports

    read = vm.check(f"dd if={disk} bs=1M count=16 iflag=direct status=none | md5sum")
    assert read.split()[0] == expected
    tls_seconds = dd_seconds(vm, disk, 16)
    out = vm.check(f"mkdir -p /mnt/stick && mount -o ro {disk} /mnt/stick && "
                   f"cat /mnt/stick/{KNOWN_FILE}; umount /mnt/stick")
    assert out == KNOWN_TEXT
    assert vm.check("grep TlsDecryptError /proc/net/tls_stat").split()[1] == "0"
    detach(vm)
    # the stub saw the connection end, and offers the stick again; neither end holds a
    # kTLS socket any more
    wait_for(vm, f"grep -qx 1 /sys/bus/usb/devices/{busid}/usbip_status")
    wait_for(vm, NO_KTLS_SOCKETS)

    # The same read in plaintext, for the speed figure (printed, not asserted).
    vm.check(f"{USBIPY} attach -r {LOOPBACK} -t {GUEST_PLAIN_PORT} -b {busid}")
    disk = vhci_node(vm, "block")
    assert "encrypted" not in vm.check(f"{USBIPY} port")
    plain_seconds = dd_seconds(vm, disk, 16)
    detach(vm)
    mib = 16
    print(f"\nkernel path, 16 MiB read through vhci (usbip-host in the same guest, TCG): "
          f"kTLS {mib / tls_seconds:.2f} MiB/s, plaintext {mib / plain_seconds:.2f} MiB/s, "
          f"kTLS/plaintext throughput {plain_seconds / tls_seconds:.2f}")


def test_python_served_devices_over_a_kernel_tls_server(clean: Lab) -> None:
    """usbipyd's own devices when its sessions are in kernel TLS: the protocol reads and
    writes a kTLS socket, and the client's vhci another; a serial port echoes through
    both."""
    vm, certs = clean.vm, clean.certs
    start_usbipyd(vm, options(certs.server), "--demo", "--disk-size", str(1 << 20),
                  "--no-usbip-host", "--no-libusb", "-a", LOOPBACK, "-t", str(GUEST_TLS_PORT))
    wait_for(vm, f"grep -qF 'exporting 1-3' /run/usbipyd.log && grep -qF 'listening on "
             f"{LOOPBACK}:{GUEST_TLS_PORT} (mutual TLS, kernel TLS)' /run/usbipyd.log "
             "|| { cat /run/usbipyd.log; false; }")
    tls = f"{options(certs.client)} --tls-server-name {SERVER_NAME} -t {GUEST_TLS_PORT}"
    listed = vm.check(f"{USBIPY} {tls} list -r {LOOPBACK}")  # the userspace client, too
    assert "1-1: " in listed and "1-3: " in listed, listed
    out = vm.check(f"{USBIPY} {tls} attach -r {LOOPBACK} -b 1-3")
    assert f"over TLS with CN={SERVER_NAME}" in out, out
    tty = vhci_node(vm, "tty")
    stat = tls_stat(vm)
    assert stat["TlsCurrTxSw"] >= 2 and stat["TlsCurrRxSw"] >= 2, stat
    out = vm.check(
        f"stty -F {tty} raw -echo; exec 3<>{tty}; "
        "for w in alpha beta gamma; do printf '%s\\n' $w >&3; read -t 60 line <&3; "
        "echo \"got:$line\"; done")
    assert out.split() == ["got:alpha", "got:beta", "got:gamma"]
    assert vm.check("grep TlsDecryptError /proc/net/tls_stat").split()[1] == "0"
    detach(vm)
    wait_for(vm, "grep -qF 'released 1-3' /run/usbipyd.log || { cat /run/usbipyd.log; false; }")
    wait_for(vm, NO_KTLS_SOCKETS)




def test_a_persistent_attachment_comes_back_over_tls(clean: Lab, image: Path) -> None:
    """`usbipy attach --persistent` over mutual TLS: the server goes away and comes
    back; the keeper makes a new handshake, and the device is attached again, its
    session in kernel TLS as before."""
    vm, certs = clean.vm, clean.certs
    with tls_server(clean, image):
        vm.check(f"setsid {USBIPY} {options(certs.client)} attach -r {SERVER_ALIAS} -b 1-1 "
                 "--persistent </dev/null >/run/keeper-tls.log 2>&1 &")
        try:
            wait_for(vm, f"grep -qs '\"state\": \"attached\"' {KEEPERS}")
        except BaseException:
            vm.run(STOP_KEEPERS)
            raise
    try:
        wait_for(vm, "grep -q 'connection lost' /run/keeper-tls.log")
        with tls_server(clean, image):
            wait_for(vm, f"grep -qs '\"state\": \"attached\".*\"reattached\": 1' {KEEPERS}")
            # (the port is listed once vhci-hcd has set it up, a moment after the attach)
            wait_for(vm, "usbip port | grep -q 'Port in Use'")
            ports = vm.check(f"{USBIPY} port")
            assert "re-attached 1 times)" in ports, ports
            assert f"-> encrypted (kernel TLS, TLSv1.2) with CN={SERVER_NAME}" in ports, ports
            stat = tls_stat(vm)
            assert stat["TlsCurrTxSw"] >= 1 and stat["TlsCurrRxSw"] >= 1, stat
            vm.check(f"{USBIPY} detach -b 1-1")
        log = vm.check("cat /run/keeper-tls.log")
        assert re.search(r"^usbipy: attached usbip://\S+ on port \d+ again$", log, re.M), log
    finally:
        vm.run(STOP_KEEPERS)
