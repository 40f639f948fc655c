"""Boot this machine's Debian kernel under QEMU and run commands in it.

The guest's root is the host's / over 9p, read-only, under a tmpfs overlay, so
it has the host's python3, usbip tools and this checkout. A small initramfs
(busybox and the modules that reach the 9p root) is built once and cached.
Commands reach the guest through an agent on virtio-serial. Networking is
QEMU user mode with restrict=on: the guest reaches only 10.0.2.100:3240,
which QEMU forwards to the host's 127.0.0.1:<server_port>; the host's
127.0.0.1:<guest_port> reaches the guest's port 3240.

Facts this relies on: KVM here is the PVM flavour, which cannot boot a stock
kernel, so TCG is used; a boot takes about 10 s; Python in the guest is about
9x slower than on the host.
"""

from __future__ import annotations

import glob
import gzip
import hashlib
import json
import lzma
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

INITRAMFS_MODULES = ("virtio_pci", "9pnet_virtio", "9p", "overlay", "virtio_net",
                     "virtio_console")
INIT_VERSION = 5
GUEST_IP = "10.0.2.15"
SERVER_ALIAS = "10.0.2.100"  # what the guest dials to reach the host's server

INIT = r"""#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
while read -r m; do insmod "/modules/$m" || echo "init: insmod $m failed"; done < /modules/order
mkdir -p /lower /upper /newroot
NINEP=trans=virtio,version=9p2000.L,msize=512000
mount -t 9p -o $NINEP,cache=loose,ro hostroot /lower || poweroff -f
mount -t tmpfs -o mode=0755 tmpfs /upper
mkdir -p /upper/u /upper/w
OVL=lowerdir=/lower,upperdir=/upper/u,workdir=/upper/w
mount -t overlay overlay -o $OVL,xino=off,index=off,redirect_dir=off,metacopy=off /newroot \
  || poweroff -f
R=/newroot
# Module loads that the kernel starts itself (a filesystem, a protocol) run
# /proc/sys/kernel/modprobe from the initramfs: send them into the new root.
echo /bin/modprobe-chroot > /proc/sys/kernel/modprobe
mount -t proc proc $R/proc
mount -t sysfs sysfs $R/sys
mount -t devtmpfs devtmpfs $R/dev
mkdir -p $R/dev/pts $R/dev/shm
mount -t devpts -o gid=5,mode=620,ptmxmode=666 devpts $R/dev/pts
mount -t tmpfs -o mode=1777 tmpfs $R/dev/shm
mount -t tmpfs -o mode=0755 tmpfs $R/run
mount -t configfs configfs $R/sys/kernel/config 2>/dev/null
mkdir -p $R/run/vm $R/run/lock
mount -t 9p -o $NINEP,cache=mmap vmio $R/run/vm || poweroff -f
ip link set lo up
ip link set eth0 up && ip addr add 10.0.2.15/24 dev eth0 && ip route add default via 10.0.2.2
hostname vm
echo "init: starting the agent at $(cut -d' ' -f1 /proc/uptime)s"
chroot $R /usr/bin/env -i PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
  HOME=/root LANG=C.UTF-8 $(cat /agent-python) /run/vm/agent.py
echo "init: the agent exited"
poweroff -f
"""


class VmUnavailable(Exception):
    """This machine cannot boot the test kernel; the message says why."""


@dataclass
class Result:
    rc: int
    out: str


def _kernel() -> tuple[Path, str]:
    kernels = sorted(glob.glob("/boot/vmlinuz-*"))
    if not kernels:
        raise VmUnavailable("no kernel in /boot (apt-get install linux-image-amd64)")
    kernel = Path(kernels[-1])
    version = kernel.name.removeprefix("vmlinuz-")
    if not Path(f"/lib/modules/{version}").is_dir():
        raise VmUnavailable(f"no /lib/modules/{version} for {kernel}")
    if not os.access(kernel, os.R_OK):
        raise VmUnavailable(f"{kernel} is not readable (run as root)")
    return kernel, version


def check_host() -> None:
    if os.geteuid() != 0:
        raise VmUnavailable("the kernel tests need root (9p passthrough of /)")
    for tool in ("qemu-system-x86_64", "busybox", "cpio", "modprobe", "socat"):
        if shutil.which(tool) is None:
            raise VmUnavailable(f"{tool} is missing (scripts/setup.sh --test installs it)")
    _kernel()


def _initramfs(version: str, kernel: Path, agent_python: str) -> Path:
    cache = Path(os.environ.get("USBIPY_VM_CACHE", "/var/tmp/usbipy-vm"))
    cache.mkdir(parents=True, exist_ok=True)
    # (hashlib, not hash(): str hashes change with every process)
    python_key = hashlib.sha256(agent_python.encode()).hexdigest()[:12]
    key = f"{version}-{int(kernel.stat().st_mtime)}-v{INIT_VERSION}-{python_key}"
    target = cache / f"initramfs-{key}.cpio.gz"
    if target.exists():
        return target
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for d in ("bin", "proc", "sys", "dev", "modules"):
            (root / d).mkdir()
        busybox = shutil.which("busybox")
        assert busybox is not None
        shutil.copy(busybox, root / "bin/busybox")
        order: list[str] = []
        for module in INITRAMFS_MODULES:
            deps = subprocess.run(["modprobe", "-S", version, "--show-depends", module],
                                  capture_output=True, text=True, check=True).stdout
            for line in deps.splitlines():
                parts = line.split()
                if not parts or parts[0] != "insmod":
                    continue
                src = parts[1]
                name = Path(src).name
                for suffix in (".xz", ".zst", ".gz"):
                    name = name.removesuffix(suffix)
                if name in order:
                    continue
                if src.endswith(".xz"):
                    (root / "modules" / name).write_bytes(lzma.decompress(Path(src).read_bytes()))
                elif src.endswith(".gz"):
                    (root / "modules" / name).write_bytes(gzip.decompress(Path(src).read_bytes()))
                elif src.endswith(".zst"):
                    data = subprocess.run(["zstd", "-qdc", src], capture_output=True,
                                          check=True).stdout
                    (root / "modules" / name).write_bytes(data)
                else:
                    shutil.copy(src, root / "modules" / name)
                order.append(name)
        (root / "modules/order").write_text("\n".join(order) + "\n")
        (root / "init").write_text(INIT)
        (root / "init").chmod(0o755)
        (root / "agent-python").write_text(agent_python + "\n")
        helper = root / "bin/modprobe-chroot"
        helper.write_text(
            '#!/bin/busybox sh\nexec /bin/busybox chroot /newroot /sbin/modprobe "$@"\n')
        helper.chmod(0o755)
        files = subprocess.run(["find", "."], cwd=root, capture_output=True, check=True).stdout
        archive = subprocess.run(["cpio", "-o", "-H", "newc", "--quiet"], cwd=root, input=files,
                                 capture_output=True, check=True).stdout
        partial = target.with_suffix(".tmp")
        partial.write_bytes(gzip.compress(archive, compresslevel=1))
        partial.rename(target)
    return target


class Vm:
    """One booted guest. Use as a context manager; :meth:`run` executes a command."""

    def __init__(self, *, memory_mb: int = 1024, cpus: int = 2, extra_args: list[str] | None = None,
                 qmp: bool = False) -> None:
        check_host()
        self.kernel, self.version = _kernel()
        self.memory_mb = memory_mb
        self.cpus = cpus
        self.extra_args = extra_args or []
        self.dir = Path(tempfile.mkdtemp(prefix="usbipy-vm-"))
        self.server_port = _free_port()
        #: The host's 127.0.0.1:guest_port reaches the guest's port 3240 (a server there).
        self.guest_port = _free_port()
        self._proc: subprocess.Popen[bytes] | None = None
        #: QEMU's monitor (QMP), to plug and unplug devices: with ``qmp``.
        self._qmp_path = self.dir / "qmp.sock" if qmp else None
        self._qmp: socket.socket | None = None
        self._qmp_buf = b""
        self._agent: socket.socket | None = None
        self._buf = b""
        self._last_id = 0
        #: The agent runs one command at a time, each up to its timeout. A command
        #: whose caller gave up (a test that timed out) runs on in the guest: until
        #: this time (monotonic), the next one may wait behind it.
        self._busy_until = 0.0

    @property
    def io_dir(self) -> Path:
        """Shared read-write with the guest, where it is /run/vm."""
        return self.dir

    def start(self, boot_timeout: float = 180) -> Vm:
        agent_python = sys.executable
        initrd = _initramfs(self.version, self.kernel, agent_python)
        shutil.copy(Path(__file__).with_name("guest_agent.py"), self.dir / "agent.py")
        sock_path = self.dir / "agent.sock"
        # (restrict=on isolates the guest; explicit forwards, both ways, still work;
        # socat's own messages go to /dev/null, not into the guest's connection, where
        # a server that is down would look like one that answers its error text)
        net = (f"user,id=n0,restrict=on,ipv6=off,guestfwd=tcp:{SERVER_ALIAS}:3240-"
               f"cmd:socat -lf /dev/null STDIO TCP:127.0.0.1:{self.server_port},"
               f"hostfwd=tcp:127.0.0.1:{self.guest_port}-:3240")
        args = [
            "qemu-system-x86_64", "-nodefaults", "-no-user-config", "-display", "none",
            "-monitor", "none", "-no-reboot", "-machine", "q35",
            "-accel", "tcg,thread=multi", "-cpu", "qemu64,+ssse3,+sse4.1,+sse4.2,+popcnt,+cx16",
            "-m", str(self.memory_mb), "-smp", str(self.cpus),
            "-kernel", str(self.kernel), "-initrd", str(initrd),
            "-append", "console=ttyS0 rdinit=/init panic=-1 mitigations=off loglevel=6",
            "-serial", f"file:{self.dir / 'console.log'}",
            "-fsdev", "local,id=hostroot,path=/,security_model=none,readonly=on,multidevs=remap",
            "-device", "virtio-9p-pci,fsdev=hostroot,mount_tag=hostroot",
            "-fsdev", f"local,id=vmio,path={self.dir},security_model=none,multidevs=remap",
            "-device", "virtio-9p-pci,fsdev=vmio,mount_tag=vmio",
            "-netdev", net, "-device", "virtio-net-pci,netdev=n0",
            "-chardev", f"socket,id=agent,path={sock_path},server=on,wait=off",
            "-device", "virtio-serial-pci", "-device", "virtserialport,chardev=agent,name=agent",
            *(["-qmp", f"unix:{self._qmp_path},server=on,wait=off"] if self._qmp_path else []),
            *self.extra_args,
        ]
        self._qemu_log = open(self.dir / "qemu.log", "wb")
        self._proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=self._qemu_log,
                                      stderr=subprocess.STDOUT)
        deadline = time.monotonic() + boot_timeout
        while True:
            try:
                agent = socket.socket(socket.AF_UNIX)
                agent.connect(str(sock_path))
                break
            except OSError:
                agent.close()
                self._check_alive(deadline)
                time.sleep(0.05)
        self._agent = agent
        reply = self._read(deadline)
        if not reply.get("ready"):
            raise RuntimeError(f"unexpected greeting from the guest agent: {reply}")
        return self

    def qmp(self, execute: str, **arguments: object) -> object:
        """A QMP command (``device_add``, ``device_del``, ``blockdev-add``...); its
        return value. RuntimeError with QEMU's error."""
        assert self._qmp_path is not None, "the VM was made without qmp=True"
        if self._qmp is None:
            sock = socket.socket(socket.AF_UNIX)
            sock.settimeout(30)
            sock.connect(str(self._qmp_path))
            self._qmp = sock
            self._qmp_reply()  # the greeting
            self.qmp("qmp_capabilities")
        message: dict[str, object] = {"execute": execute}
        if arguments:
            message["arguments"] = arguments
        self._qmp.sendall(json.dumps(message).encode() + b"\n")
        reply = self._qmp_reply()
        if "error" in reply:
            raise RuntimeError(f"QMP {execute}: {reply['error']}")
        return reply.get("return")

    def _qmp_reply(self) -> dict[str, object]:
        """The next reply (or greeting), events in between skipped."""
        assert self._qmp is not None
        while True:
            while b"\n" not in self._qmp_buf:
                chunk = self._qmp.recv(65536)
                if not chunk:
                    raise RuntimeError("QEMU closed its QMP socket")
                self._qmp_buf += chunk
            line, self._qmp_buf = self._qmp_buf.split(b"\n", 1)
            reply: dict[str, object] = json.loads(line)
            if "event" not in reply:
                return reply

    def _check_alive(self, deadline: float) -> None:
        assert self._proc is not None
        if self._proc.poll() is not None:
            raise RuntimeError(f"QEMU exited ({self._proc.returncode}):\n{self.diagnostics()}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"the guest did not come up in time:\n{self.diagnostics()}")

    def _read(self, deadline: float) -> dict[str, object]:
        assert self._agent is not None
        while b"\n" not in self._buf:
            self._check_alive(deadline)
            self._agent.settimeout(max(0.1, min(1.0, deadline - time.monotonic())))
            try:
                chunk = self._agent.recv(65536)
            except TimeoutError:
                continue
            if not chunk:
                raise RuntimeError(f"the guest agent hung up:\n{self.diagnostics()}")
            self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        reply: dict[str, object] = json.loads(line)
        return reply

    def run(self, cmd: str, timeout: float = 120) -> Result:
        """Run ``cmd`` with bash in the guest; returns its exit code and output."""
        assert self._agent is not None, "the VM is not running"
        self._last_id += 1
        request_id = self._last_id
        now = time.monotonic()
        queued = max(0.0, self._busy_until - now)
        self._busy_until = now + queued + timeout + 30
        self._agent.sendall(json.dumps({"id": request_id, "cmd": cmd, "timeout": timeout}
                                       ).encode() + b"\n")
        while True:
            reply = self._read(self._busy_until)
            if reply.get("id") == request_id:
                break
            # the late reply to a command whose caller gave up: not ours
        self._busy_until = 0.0
        rc, out = reply["rc"], reply["out"]
        assert isinstance(rc, int) and isinstance(out, str)
        return Result(rc, out)

    def check(self, cmd: str, timeout: float = 120) -> str:
        """Run ``cmd``; fail the test with the guest's output and kernel log unless it exits 0."""
        result = self.run(cmd, timeout)
        if result.rc != 0:
            raise AssertionError(
                f"guest command failed (exit {result.rc}): {cmd}\n--- output ---\n{result.out}"
                f"\n--- kernel log (tail) ---\n{self.kernel_log()}")
        return result.out

    def kernel_log(self, lines: int = 40) -> str:
        if self._agent is None or not self.alive:
            return self.console_tail(lines)
        try:
            return self.run(f"dmesg | tail -n {lines}", timeout=30).out
        except Exception:  # the agent may be what is broken
            return self.console_tail(lines)

    def console_tail(self, lines: int = 40) -> str:
        try:
            text = (self.dir / "console.log").read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def diagnostics(self) -> str:
        qemu = ""
        try:
            qemu = (self.dir / "qemu.log").read_text(errors="replace")[-2000:]
        except OSError:
            pass
        return f"--- console (tail) ---\n{self.console_tail()}\n--- qemu ---\n{qemu}"

    @property
    def alive(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def kill(self) -> None:
        """Pull the plug: QEMU dies at once, the guest gets no chance to say goodbye."""
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait(timeout=30)
        if self._agent is not None:
            self._agent.close()
            self._agent = None
        if self._qmp is not None:
            self._qmp.close()
            self._qmp = None

    def close(self) -> None:
        self.kill()
        if self._proc is not None:
            self._qemu_log.close()
            self._proc = None
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> Vm:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
