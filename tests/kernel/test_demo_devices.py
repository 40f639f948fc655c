"""The demo devices as a Linux user sees them through vhci-hcd: a disk, a tty, a keyboard."""

from __future__ import annotations

import asyncio
import hashlib
import os
import re
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

from usbipy.client import import_device, list_devices
from usbipy.devices import CdcAcm, HidKeyboard, ImageFile, MassStorage, PtyBackend
from usbipy.protocol import (
    ClientConnection,
    OpRepDevlist,
    OpRepImport,
    OpReqDevlist,
    OpReqImport,
    OpStatus,
)
from usbipy.server import ServerThread

from .guest import attach, detach_all, device_node, ports, wait_for
from .vm import SERVER_ALIAS, Vm


def serve(vm: Vm, *devices: object) -> ServerThread:
    return ServerThread(devices, port=vm.server_port)  # type: ignore[arg-type]


def demo(vm: Vm, image: Path, **disk: bool) -> ServerThread:
    return serve(vm, HidKeyboard(), MassStorage(ImageFile(image, **disk)), CdcAcm())


def test_list_attach_and_port(vm: Vm, image: Path) -> None:
    with demo(vm, image):
        out = vm.check(f"usbip list -r {SERVER_ALIAS}")
        for busid, ids in (("1-1", "1209:0001"), ("1-2", "1209:0002"), ("1-3", "1209:0003")):
            assert f"{busid}: " in out and ids in out, out
        for busid in ("1-1", "1-2", "1-3"):
            attach(vm, busid)
        assert sorted(ports(vm).values()) == ["1-1", "1-2", "1-3"]
        wait_for(vm, "lsusb | grep -q 1209:0003")
        lsusb = vm.check("lsusb")
        assert "1209:0001" in lsusb and "1209:0002" in lsusb and "1209:0003" in lsusb
        # imported devices are no longer offered
        assert "1-2" not in vm.check(f"usbip list -r {SERVER_ALIAS}")
        detach_all(vm)


def test_disk_keeps_its_data(vm: Vm, image: Path) -> None:
    with demo(vm, image):
        attach(vm, "1-2")
        disk = device_node(vm, "1209:0002", "sd*")
        out = vm.check(
            f"set -e; mkfs.ext4 -q -F {disk}; mkdir -p /mnt/d; mount {disk} /mnt/d; "
            "head -c 6M /dev/urandom > /mnt/d/a.bin; head -c 3M /dev/urandom > /mnt/d/b.bin; "
            "md5sum /mnt/d/a.bin /mnt/d/b.bin > /tmp/sums; umount /mnt/d; "
            "echo 3 > /proc/sys/vm/drop_caches; "
            f"mount {disk} /mnt/d; cd /mnt && md5sum -c /tmp/sums; cd /; umount /mnt/d; "
            f"fsck.ext4 -n -f {disk}; cat /tmp/sums", timeout=600)
        assert "a.bin: OK" in out and "b.bin: OK" in out, out
        sums = {line.split()[1].split("/")[-1]: line.split()[0]
                for line in out.splitlines() if line.endswith(".bin") and len(line.split()) == 2}
        detach_all(vm)
    # The bytes are in the server's image file.
    for name, digest in sums.items():
        data = subprocess.run(["debugfs", "-R", f"cat /{name}", str(image)],
                              capture_output=True, check=True).stdout
        assert hashlib.md5(data).hexdigest() == digest


def test_read_only_disk_refuses_writes(vm: Vm, image: Path, tmp_path: Path) -> None:
    content = tmp_path / "content"
    content.mkdir()
    (content / "hello.txt").write_text("hello from the image\n")
    subprocess.run(["mkfs.ext4", "-q", "-F", "-d", str(content), str(image)], check=True)
    before = hashlib.sha256(image.read_bytes()).hexdigest()
    with demo(vm, image, read_only=True):
        attach(vm, "1-2")
        disk = device_node(vm, "1209:0002", "sd*")
        assert vm.check(f"blockdev --getro {disk}").strip() == "1"
        result = vm.run(f"dd if=/dev/zero of={disk} bs=512 count=1 oflag=direct")
        assert result.rc != 0
        assert "Read-only file system" in result.out or "Operation not permitted" in result.out
        out = vm.check(f"mkdir -p /mnt/r; mount -o ro {disk} /mnt/r && cat /mnt/r/hello.txt; "
                       "umount /mnt/r")
        assert "hello from the image" in out
        detach_all(vm)
    assert hashlib.sha256(image.read_bytes()).hexdigest() == before


def test_serial_echo(vm: Vm, image: Path) -> None:
    with demo(vm, image):
        attach(vm, "1-3")
        tty = device_node(vm, "1209:0003", "ttyACM*")
        out = vm.check(
            f"stty -F {tty} raw -echo; exec 3<>{tty}; "
            "for w in alpha beta gamma; do printf '%s\\n' $w >&3; read -t 60 line <&3; "
            "echo \"got:$line\"; done")
        assert out.split() == ["got:alpha", "got:beta", "got:gamma"]
        detach_all(vm)


def test_serial_pty_on_the_server(vm: Vm) -> None:
    backend = PtyBackend()
    answered: list[bytes] = []

    def program_on_the_server() -> None:
        fd = os.open(backend.path, os.O_RDWR | os.O_NOCTTY)
        try:
            buf = b""
            while buf.count(b"\n") < 2:
                buf += os.read(fd, 100)
            for line in buf.splitlines():
                answered.append(line)
                os.write(fd, b"server says " + line[::-1] + b"\n")
        finally:
            os.close(fd)

    with serve(vm, CdcAcm(backend)):
        program = threading.Thread(target=program_on_the_server, daemon=True)
        program.start()
        attach(vm, "1-1")
        tty = device_node(vm, "1209:0003", "ttyACM*")
        out = vm.check(f"stty -F {tty} raw -echo; exec 3<>{tty}; printf 'abc\\nxyz\\n' >&3; "
                       "read -t 60 a <&3; read -t 60 b <&3; echo \"$a|$b\"")
        assert out.strip() == "server says cba|server says zyx"
        program.join(timeout=60)
        assert answered == [b"abc", b"xyz"]
        detach_all(vm)


KEY_READER = r"""
import struct, sys
# struct input_event on x86_64: timeval (2 longs), type, code, value
ev = struct.Struct("llHHi")
with open(sys.argv[1], "rb") as f:
    print("ready", flush=True)
    downs = 0
    while downs < int(sys.argv[2]):
        t1, t2, kind, code, value = ev.unpack(f.read(ev.size))
        if kind == 1 and value == 1:  # EV_KEY, pressed
            print(code, flush=True)
            downs += 1
"""


def test_keyboard_typing_arrives_as_key_events(vm: Vm) -> None:
    keyboard = HidKeyboard()
    (vm.io_dir / "keys.py").write_text(KEY_READER)
    with serve(vm, keyboard):
        attach(vm, "1-1")
        event = device_node(vm, "1209:0001", "event*")
        vm.check(f"nohup python3 /run/vm/keys.py {event} 6 > /run/vm/keys.txt 2>&1 &")
        wait_for(vm, "grep -q ready /run/vm/keys.txt")
        keyboard.type_text("hello\n")
        wait_for(vm, "[ $(wc -l < /run/vm/keys.txt) -ge 7 ]")
        codes = [int(x) for x in (vm.io_dir / "keys.txt").read_text().split()[1:]]
        # KEY_H, KEY_E, KEY_L, KEY_L, KEY_O, KEY_ENTER (linux/input-event-codes.h)
        assert codes == [35, 18, 38, 38, 24, 28]
        detach_all(vm)


def _fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


def _until(condition: Callable[[], bool], timeout: float = 120) -> bool:
    """Poll ``condition`` on the host until it holds or ``timeout`` seconds pass."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def _has_read(pidfile: str) -> str:
    """Shell: the process in ``pidfile`` is running and has read its first megabyte."""
    return (f"[ \"$(sed -n 's/^rchar: //p' /proc/$(cat {pidfile})/io 2>/dev/null)\" "
            "-ge 1048576 ] 2>/dev/null")


def test_unlink_under_load_leaves_the_server_healthy(vm: Vm, image: Path) -> None:
    with demo(vm, image) as srv:
        attach(vm, "1-2")
        disk = device_node(vm, "1209:0002", "sd*")
        # a reader killed in the middle of a large read
        vm.check(f"nohup dd if={disk} of=/dev/null bs=1M count=64 iflag=direct "
                 "> /tmp/dd1.log 2>&1 & echo $! > /tmp/dd1.pid")
        wait_for(vm, _has_read("/tmp/dd1.pid"))
        vm.check("kill -9 $(cat /tmp/dd1.pid)")
        # gone, or a zombie
        wait_for(vm, "! grep -qs '^State:[[:space:]]*[^Z]' /proc/$(cat /tmp/dd1.pid)/status")
        vm.check(f"dd if={disk} of=/dev/null bs=64k count=16 iflag=direct")
        # a detach during I/O
        vm.check(f"nohup dd if={disk} of=/dev/null bs=1M count=64 iflag=direct "
                 "> /tmp/dd2.log 2>&1 & echo $! > /tmp/dd2.pid")
        wait_for(vm, _has_read("/tmp/dd2.pid"))
        detach_all(vm)
        # the server still serves the other devices, and the next attach works
        assert "1-1" in vm.check(f"usbip list -r {SERVER_ALIAS}")
        attach(vm, "1-2")
        disk = device_node(vm, "1209:0002", "sd*")
        vm.check(f"dd if={disk} of=/dev/null bs=64k count=16 iflag=direct")
        detach_all(vm)
        server = srv.server
        assert server is not None
        _until(lambda: not server.connections)
        assert not server.connections


ROUNDS = 4


def test_detach_and_reattach_four_times_leaks_nothing(vm: Vm, image: Path) -> None:
    """The first round sets the baseline; a leak of even one fd or task per round
    shows in each round after it."""
    with demo(vm, image) as srv:
        server = srv.server
        assert server is not None
        devices = {"1-1": ("1209:0001", "event*"), "1-2": ("1209:0002", "sd*"),
                   "1-3": ("1209:0003", "ttyACM*")}

        def state() -> tuple[int, object]:
            return _fd_count(), srv.call(lambda: len(asyncio.all_tasks()))

        def released() -> bool:
            return not srv.call(lambda: server.connections or server.registry.held())

        def one_round(round_: int) -> None:
            for busid, (ids, node) in devices.items():
                attach(vm, busid)
                device_node(vm, ids, node)
            detach_all(vm)
            wait_for(vm, "! lsusb | grep -q 1209:")
            # the server sees the connections close in its own time, and releases
            # each device once its detach is done
            _until(released)
            assert not server.connections, f"round {round_}: connections left"
            assert not srv.call(server.registry.held), f"round {round_}: devices still held"

        one_round(0)
        baseline = state()
        for round_ in range(1, ROUNDS):
            one_round(round_)
            _until(lambda: state() == baseline, timeout=30)
            now = state()
            assert now == baseline, f"round {round_}: fds/tasks {now} != {baseline}"


PYTHON = sys.executable  # the host's venv is visible in the guest over 9p
USBIPY = f"{PYTHON} -m usbipy.cli.usbipy"

#: usbipyd's configuration in test_access_policy_by_network: only the disk, and only
#: to clients from NETWORK. The guest's connections reach the host's server from
#: 127.0.0.1: QEMU's guestfwd runs socat on the host for each one, and socat
#: dials 127.0.0.1 (see vm.py).
NETWORK = "127.0.0.1/32"
#: A loopback address outside NETWORK, for the host's check that the rule is what
#: lets the guest in.
OUTSIDER = "127.0.0.2"
POLICY_CONFIG = """\
listen = ["127.0.0.1"]
port = {port}
usbip_host = false
libusb = false

[devices]
demo = true            # keyboard 1-1 (1209:0001), disk 1-2 (1209:0002), serial 1-3 (1209:0003)

[policy]
default = "deny"

[[policy.rule]]
action = "allow"
client = {{ network = "{network}" }}
device = {{ busid = "1-2" }}
"""


def _ask_from(source: str, port: int, request: OpReqDevlist | OpReqImport
              ) -> OpRepDevlist | OpRepImport:
    """One OP request to the server on 127.0.0.1:``port``, from the local address
    ``source``; its reply."""
    conn = ClientConnection()
    with socket.create_connection(("127.0.0.1", port), timeout=60,
                                  source_address=(source, 0)) as sock:
        sock.sendall(conn.send(request))
        while True:
            data = sock.recv(65536)
            conn.receive_data(data)
            for event in conn.events():
                if isinstance(event, OpRepDevlist | OpRepImport):
                    return event
            if not data:
                raise AssertionError(f"the server closed without answering {request}")


def test_access_policy_by_network(vm: Vm, tmp_path: Path) -> None:
    """The real usbipyd with a configuration file whose one rule allows the disk to
    clients from 127.0.0.1/32: the guest sees and imports the disk only, and a
    device it may not use is refused as one that does not exist."""
    config = tmp_path / "usbipyd.toml"
    config.write_text(POLICY_CONFIG.format(port=vm.server_port, network=NETWORK))
    log_path = tmp_path / "usbipyd.log"

    def log() -> str:
        return log_path.read_text(errors="replace")

    with open(log_path, "wb") as log_file:
        daemon = subprocess.Popen([PYTHON, "-m", "usbipy.cli.usbipyd", "-c", str(config)],
                                  stdin=subprocess.DEVNULL, stdout=log_file, stderr=log_file)
    try:
        ready = f"listening on 127.0.0.1:{vm.server_port}"
        _until(lambda: daemon.poll() is not None or ("exporting 1-3" in log()
                                                     and ready in log()))
        assert daemon.poll() is None and ready in log(), log()

        # On the host: the same server, the same listening socket, two source
        # addresses. From inside NETWORK only the disk; from outside it nothing,
        # and an import refused as NODEV.
        inside = asyncio.run(list_devices("127.0.0.1", vm.server_port))
        assert [d.busid for d in inside] == ["1-2"], log()
        outside = _ask_from(OUTSIDER, vm.server_port, OpReqDevlist())
        assert isinstance(outside, OpRepDevlist) and outside.devices == (), outside
        refused = _ask_from(OUTSIDER, vm.server_port, OpReqImport("1-2"))
        assert refused == OpRepImport(OpStatus.NODEV), refused
        _until(lambda: f"{OUTSIDER}:" in log() and "import of 1-2 denied by the default" in log())
        assert re.search(rf"^usbipyd: WARNING: {re.escape(OUTSIDER)}:\d+: import of 1-2 "
                         r"denied by the default \(deny, ", log(), re.M), log()

        # In the guest: both clients list the disk alone.
        listed = vm.check(f"{USBIPY} list -r {SERVER_ALIAS}")
        c_listed = vm.check(f"usbip list -r {SERVER_ALIAS}")
        for out in (listed, c_listed):
            assert "1-2: " in out and "1209:0002" in out, out
            for hidden in ("1-1", "1209:0001", "1-3", "1209:0003"):
                assert hidden not in out, out

        # A forbidden device fails to attach exactly as one that does not exist.
        forbidden = vm.run(f"usbip attach -r {SERVER_ALIAS} -b 1-1")
        missing = vm.run(f"usbip attach -r {SERVER_ALIAS} -b 9-9")
        assert forbidden.rc != 0, forbidden.out
        assert forbidden.rc == missing.rc, (forbidden, missing)
        assert forbidden.out.replace("1-1", "BUSID") == missing.out.replace("9-9", "BUSID"), \
            (forbidden.out, missing.out)
        assert not ports(vm)

        # The allowed one attaches, and the disk appears.
        attach(vm, "1-2")
        assert list(ports(vm).values()) == ["1-2"]
        disk = device_node(vm, "1209:0002", "sd*")
        vm.check(f"dd if={disk} of=/dev/null bs=64k count=16 iflag=direct")
        detach_all(vm)

        # The log names the rule that refused the guest, and the guest's address.
        denied = re.search(r"^usbipyd: WARNING: (\S+):\d+: import of 1-1 denied by the "
                           r"default \(deny, usbipyd\.toml line \d+\)$", log(), re.M)
        assert denied is not None, log()
        assert denied.group(1) == "127.0.0.1", denied.group(0)
        assert "import of 9-9 refused: NODEV" in log(), log()
    finally:
        daemon.terminate()
        try:
            daemon.wait(timeout=30)
        except subprocess.TimeoutExpired:
            daemon.kill()
            daemon.wait()
    assert daemon.returncode == 0, log()
    assert "shutting down" in log(), log()


class StallingRelay:
    """Between the guest and the server: forwards both ways until told to stall, and
    then reads nothing from either side, the sockets left open, as a network that
    goes silent (a SIGSTOP of the server would not do: TCP's buffers absorb it)."""

    def __init__(self, listen_port: int, server_port: int) -> None:
        self._listener = socket.create_server(("127.0.0.1", listen_port))
        self._server_port = server_port
        self.flowing = threading.Event()
        self.flowing.set()
        self._sockets: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return  # (closed)
            server = socket.create_connection(("127.0.0.1", self._server_port))
            self._sockets += [client, server]
            for source, sink in ((client, server), (server, client)):
                threading.Thread(target=self._pipe, args=(source, sink), daemon=True).start()

    def _pipe(self, source: socket.socket, sink: socket.socket) -> None:
        while True:
            self.flowing.wait()
            try:
                data = source.recv(1 << 16)
                self.flowing.wait()  # (a chunk read as the stall began waits too)
                if not data:
                    sink.shutdown(socket.SHUT_WR)
                    return
                sink.sendall(data)
            except OSError:
                return

    def close(self) -> None:
        self.flowing.set()
        # (shutdown wakes the accept() blocked in the other thread; close alone would
        # leave the port listening until it returned)
        self._listener.shutdown(socket.SHUT_RDWR)
        self._listener.close()
        for sock in self._sockets:
            sock.close()


#: Longer than the SCSI command timeout (30 s): the kernel aborts the write in
#: flight, unlinks its URBs and resets the device.
STALL = 45
RECORDS = 160


def test_a_disk_survives_a_stall_longer_than_the_scsi_timeout(vm: Vm, image: Path) -> None:
    """O_DIRECT|O_SYNC records are written while the network stalls for 45 s. The
    kernel resets the disk and writes again: no write fails, every record reads back,
    and one reset does it (a disk that answered the new CBW with the CSW queued before
    the reset got the wrong tag, and was reset again and again until its writes
    failed with EIO)."""
    with ServerThread([MassStorage(ImageFile(image))], port=0) as server:
        assert server.server is not None
        relay = StallingRelay(vm.server_port, server.server.port)
        try:
            attach(vm, "1-1")
            disk = device_node(vm, "1209:0002", "sd*")
            vm.check(f"dmesg -C; head -c $((64 * 1024 * {RECORDS})) /dev/urandom > "
                     "/tmp/records; rm -f /tmp/progress /tmp/writer.rc")
            # one record at a time, each acknowledged before the next
            vm.check(f"(for i in $(seq 0 {RECORDS - 1}); do dd if=/tmp/records of={disk} "
                     "bs=64k skip=$i seek=$i count=1 oflag=direct,dsync 2>/tmp/writer.err "
                     "|| { echo $? > /tmp/writer.rc; exit; }; echo $i > /tmp/progress; done; "
                     "echo 0 > /tmp/writer.rc) >/dev/null 2>&1 &")
            wait_for(vm, "[ -s /tmp/progress ] && [ $(cat /tmp/progress) -ge 8 ]")
            relay.flowing.clear()
            time.sleep(STALL)  # (the stall itself: what the test is about)
            relay.flowing.set()
            wait_for(vm, "[ -s /tmp/writer.rc ]", timeout=600)
            rc = vm.check("cat /tmp/writer.rc; cat /tmp/writer.err").split("\n", 1)
            log = vm.check("dmesg")
            assert rc[0].strip() == "0", f"a write failed: {rc}\n{log[-3000:]}"
            resets = len(re.findall(r"reset high-speed USB device", log))
            # (none: the stall was too short to be one; many: the bug)
            assert 1 <= resets <= 3, f"{resets} resets\n{log[-3000:]}"
            same = vm.check(f"cmp -n $((64 * 1024 * {RECORDS})) /tmp/records {disk} "
                            "&& echo same")
            assert "same" in same
            detach_all(vm)
        finally:
            relay.close()


def test_vanished_client_frees_the_device(vm: Vm, image: Path) -> None:
    """Last in the module: it powers the guest off."""
    with demo(vm, image) as srv:
        assert srv.server is not None
        attach(vm, "1-2")
        device_node(vm, "1209:0002", "sd*")
        assert srv.server.registry.owner("1-2") is not None
        vm.kill()
        _until(lambda: srv.server is not None and srv.server.registry.owner("1-2") is None)
        assert srv.server.registry.owner("1-2") is None

        async def reimport() -> int:
            async with await import_device("127.0.0.1", "1-2", srv.port) as dev:
                return len(await dev.control(0x80, 6, 0x0100, 0, 18))

        assert asyncio.run(reimport()) == 18

