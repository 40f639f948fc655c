"""What the doctor reads off this machine: kernel modules, processes, sockets,
firewall rules and the kernel log. Each root is a module variable read at
call time (as :data:`usbipy.linux.sysfs.SYSFS_ROOT`), so tests point them at
fake trees; the firewall's rules come from a function a test can replace.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from ..linux import sysfs

PROC_ROOT = Path("/proc")
MODULES_ROOT = Path("/lib/modules")

#: /proc/net/tcp's st field (include/net/tcp_states.h).
TCP_ESTABLISHED = 0x01
TCP_LISTEN = 0x0A


# --- kernel modules -----------------------------------------------------------------


def module_loaded(name: str) -> bool:
    """Loaded, or built into the kernel: /sys/module/NAME exists either way."""
    return (sysfs.SYSFS_ROOT / "module" / name.replace("-", "_")).is_dir()


def module_installed(name: str) -> bool:
    """In this kernel's module tree (modules.dep or modules.builtin name it)."""
    base = MODULES_ROOT / os.uname().release
    wanted = {name.replace("-", "_"), name.replace("_", "-")}
    for index in ("modules.dep", "modules.builtin"):
        try:
            text = (base / index).read_text()
        except OSError:
            continue
        for line in text.splitlines():
            stem = line.split(":", 1)[0].rsplit("/", 1)[-1].split(".ko", 1)[0]
            if stem in wanted:
                return True
    return False


# --- sockets and processes ----------------------------------------------------------


@dataclass(frozen=True)
class TcpSocket:
    local: str
    local_port: int
    remote: str
    remote_port: int
    state: int
    inode: int


def _address(hex_address: str) -> str:
    raw = bytes.fromhex(hex_address)
    if len(raw) == 4:
        return ".".join(str(b) for b in reversed(raw))
    # IPv6: four little-endian 32-bit words
    words = [raw[i:i + 4][::-1] for i in range(0, 16, 4)]
    import ipaddress

    return str(ipaddress.IPv6Address(b"".join(words)))


def tcp_sockets() -> list[TcpSocket]:
    """Every TCP socket of this network namespace (/proc/net/tcp and tcp6)."""
    found = []
    for name in ("tcp", "tcp6"):
        try:
            lines = (PROC_ROOT / "net" / name).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if len(fields) < 10:
                continue
            local, local_port = fields[1].split(":")
            remote, remote_port = fields[2].split(":")
            found.append(TcpSocket(_address(local), int(local_port, 16), _address(remote),
                                   int(remote_port, 16), int(fields[3], 16), int(fields[9])))
    return found


@dataclass(frozen=True)
class Process:
    pid: int
    name: str
    cmdline: str


def processes() -> list[Process]:
    found = []
    try:
        entries = os.listdir(PROC_ROOT)
    except OSError:
        return []
    for entry in entries:
        if not entry.isdigit():
            continue
        base = PROC_ROOT / entry
        try:
            name = (base / "comm").read_text().strip()
            cmdline = (base / "cmdline").read_bytes().replace(b"\0", b" ").decode(
                errors="replace").strip()
        except OSError:
            continue
        found.append(Process(int(entry), name, cmdline))
    return found


def socket_owners() -> dict[int, int]:
    """Socket inode -> pid, for the processes this user may look into."""
    owners = {}
    for process in processes():
        fd_dir = PROC_ROOT / str(process.pid) / "fd"
        try:
            fds = os.listdir(fd_dir)
        except OSError:
            continue
        for fd in fds:
            try:
                target = os.readlink(fd_dir / fd)
            except OSError:
                continue
            match = re.fullmatch(r"socket:\[(\d+)\]", target)
            if match:
                owners[int(match.group(1))] = process.pid
    return owners


# --- the firewall ---------------------------------------------------------------------


def firewall_rules() -> dict[str, str] | None:
    """The rule sets as their tools print them ("nft", "iptables", "ip6tables");
    None when no tool is here (or none may be run)."""
    found = {}
    for tool, argv in (("nft", ["nft", "list", "ruleset"]),
                       ("iptables", ["iptables-save"]), ("ip6tables", ["ip6tables-save"])):
        if shutil.which(argv[0]) is None:
            continue
        try:
            done = subprocess.run(argv, capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            continue
        if done.returncode == 0:
            found[tool] = done.stdout
    return found or None


def dropping_rules(rules: dict[str, str], port: int) -> list[str]:
    """The rules that drop or reject TCP to ``port``, as their tool prints them."""
    hits = []
    ports = re.compile(rf"dport\s+(?:{port}\b|\{{[^}}]*\b{port}\b[^}}]*\}})")
    for tool, text in rules.items():
        for line in text.splitlines():
            stripped = line.strip()
            if tool == "nft":
                if ports.search(stripped) and re.search(r"\b(drop|reject)\b", stripped):
                    hits.append(f"nft: {stripped}")
            elif re.search(rf"--dports?\s+(?:\S*[,:])?{port}\b", stripped) and re.search(
                    r"-j\s+(DROP|REJECT)\b", stripped):
                hits.append(f"{tool}: {stripped}")
    return hits


# --- the kernel log -------------------------------------------------------------------


def kernel_log_since(marker: int) -> list[str]:
    """Kernel log lines after the ``marker``th (see :func:`kernel_log_length`)."""
    return _kernel_log()[marker:]


def kernel_log_length() -> int:
    return len(_kernel_log())


def _kernel_log() -> list[str]:
    if shutil.which("dmesg") is None:
        return []
    try:
        done = subprocess.run(["dmesg"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return []
    return done.stdout.splitlines() if done.returncode == 0 else []
