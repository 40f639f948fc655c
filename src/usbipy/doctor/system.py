"""What the doctor reads off this machine: kernel modules, processes, sockets,
firewall rules and the kernel log. Each root is a module variable read at
call time (as :data:`usbipy.linux.sysfs.SYSFS_ROOT`), so tests point them at
fake trees; the firewall's rules come from a function a test can replace.
"""

from __future__ import annotations

import ipaddress
import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from ..linux import sysfs
from ..linux.modules import listed
from ..linux.modules import module_installed as module_installed  # (re-exported)

PROC_ROOT = Path("/proc")

#: /proc/net/tcp's st field (include/net/tcp_states.h).
TCP_ESTABLISHED = 0x01
TCP_LISTEN = 0x0A


# --- kernel modules -----------------------------------------------------------------


def module_loaded(name: str) -> bool:
    """Loaded, or built into the kernel (a built-in one may have no /sys/module
    entry: modules.builtin names it; TLS shows as an available ULP)."""
    if (sysfs.SYSFS_ROOT / "module" / name.replace("-", "_")).is_dir():
        return True
    if name == "tls":
        try:
            if "tls" in (PROC_ROOT / "sys/net/ipv4/tcp_available_ulp").read_text().split():
                return True
        except OSError:
            pass
    return listed(name, ("modules.builtin",))


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


def kernel_held(sockets: list[TcpSocket]) -> list[TcpSocket]:
    """Established connections no process has open: ones the kernel holds (a socket
    handed to usbip-host or vhci-hcd), or, without root, other users' too."""
    owners = socket_owners()
    return [s for s in sockets if s.state == TCP_ESTABLISHED and s.inode not in owners]


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


@dataclass
class FirewallVerdict:
    """What the rules say of TCP to one port, in the input path."""

    #: rules that drop or reject it, and come before any that accepts it
    drops: list[str]
    #: rules that accept it
    accepts: list[str]
    #: what drops everything not accepted: a chain's policy, a catch-all rule
    default_drops: list[str]


def _port_in(spec: str, port: int) -> bool:
    """Whether ``port`` is in an nft or iptables port expression: 3240, 3000-4000,
    3000:4000, { 22, 3240 }, 22,3240."""
    for part in re.split(r"[\s,{}]+", spec):
        if not part:
            continue
        low, sep, high = part.replace(":", "-").partition("-")
        if low.isdigit() and (high.isdigit() if sep else True):
            if int(low) <= port <= (int(high) if sep else int(low)):
                return True
    return False


_NFT_PORT = re.compile(r"\btcp\s+dport\s+(?P<neg>!=\s*)?(?P<spec>\{[^}]*\}|\S+)")
_IPT_PORT = re.compile(r"(?P<neg>!\s+)?--dports?\s+(?P<spec>\S+)")
_NFT_MATCH = re.compile(r"\b(ip6?|tcp|udp|th|meta|ct|iif|iifname|oif|oifname|saddr|daddr|"
                        r"dport|sport|mark|@)\b")


def firewall_verdict(rules: dict[str, str], port: int) -> FirewallVerdict:
    verdict = FirewallVerdict([], [], [])
    for tool, text in rules.items():
        accepted = False
        if tool == "nft":
            chain_is_input = False
            for line in text.splitlines():
                rule = line.strip()
                if rule.startswith("chain "):
                    chain_is_input = False
                    continue
                if "hook input" in rule:
                    chain_is_input = True
                    if re.search(r"\bpolicy\s+drop\b", rule):
                        verdict.default_drops.append(f"nft: {rule}")
                    continue
                if not chain_is_input:
                    continue
                action = re.search(r"\b(accept|drop|reject)\b", rule)
                if action is None:
                    continue
                match = _NFT_PORT.search(rule)
                if match is not None:
                    if "udp " in rule.split("tcp", 1)[0] or not _port_in(match["spec"], port):
                        continue
                    if match["neg"]:
                        continue
                    if action[1] == "accept":
                        accepted = True
                        verdict.accepts.append(f"nft: {rule}")
                    elif not accepted:
                        verdict.drops.append(f"nft: {rule}")
                elif action[1] != "accept" and not _NFT_MATCH.search(
                        rule.split(action[1], 1)[0]):
                    verdict.default_drops.append(f"nft: {rule}")  # (drops all that gets here)
        else:
            for line in text.splitlines():
                rule = line.strip()
                policy = re.match(r":INPUT\s+(DROP|REJECT)\b", rule)
                if policy:
                    verdict.default_drops.append(f"{tool}: {rule}")
                    continue
                target = re.search(r"-j\s+(ACCEPT|DROP|REJECT)\b", rule)
                if not rule.startswith("-A ") or target is None:
                    continue
                match = _IPT_PORT.search(rule)
                if match is not None:
                    if "-p udp" in rule or match["neg"] or not _port_in(match["spec"], port):
                        continue
                    if target[1] == "ACCEPT":
                        accepted = True
                        verdict.accepts.append(f"{tool}: {rule}")
                    elif not accepted:
                        verdict.drops.append(f"{tool}: {rule}")
                elif target[1] != "ACCEPT" and rule.startswith("-A INPUT") and len(
                        rule.split()) <= 4:
                    verdict.default_drops.append(f"{tool}: {rule}")
    return verdict


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
