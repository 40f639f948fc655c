"""Shell snippets run in the guest, named for what they do."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

from .vm import SERVER_ALIAS, Vm

PYTHON = sys.executable  # the host's venv is visible in the guest over 9p
USBIPY = f"{PYTHON} -m usbipy.cli.usbipy"
USBIPYD = f"{PYTHON} -m usbipy.cli.usbipyd"
#: The state files of persistent attachments (cheaper to poll than `usbipy port`).
KEEPERS = "/run/usbipy/attach/*.json"
#: Stop every persistent attachment and wait until they are gone (a pattern this
#: shell's own command line does not match).
STOP_KEEPERS = ("pkill -f '[u]sbipy.cli.usbipy .*attach'; end=$((SECONDS + 60)); "
                "while pgrep -f '[u]sbipy.cli.usbipy .*attach' >/dev/null && "
                "[ $SECONDS -lt $end ]; do sleep 0.2; done")

#: Ceiling of a wait in the guest. Generous: a condition that holds after a few
#: seconds on a fast host may take three times as long on a slow one, and the
#: wait ends as soon as it holds.
WAIT = 120


def _poll(condition: str, timeout: float, then: str) -> str:
    """Shell: poll ``condition`` until it holds (then run ``then``) or ``timeout`` seconds
    of guest time have passed. The deadline is time, not a count of rounds, so a slow
    condition cannot stretch the wait past the agent's timeout."""
    return (f"end=$((SECONDS + {int(timeout)})); while :; do if {condition}; then {then}; exit 0; "
            f"fi; [ $SECONDS -lt $end ] || break; sleep 0.2; done; "
            f"echo 'timed out after {int(timeout)} s waiting for: '{shlex.quote(condition)}; "
            "exit 1")


def wait_for(vm: Vm, condition: str, timeout: float = WAIT) -> None:
    """Poll a shell condition in the guest."""
    vm.check(_poll(condition, timeout, "true"), timeout=timeout + 60)


def wait_output(vm: Vm, script: str, timeout: float = WAIT) -> str:
    """Run ``script`` in the guest until it prints something, and return that."""
    return vm.check(_poll(f"out=$({script}); [ -n \"$out\" ]", timeout,
                          "printf '%s\\n' \"$out\""), timeout=timeout + 60)


def attach(vm: Vm, busid: str) -> None:
    """`usbip attach`, then wait until the kernel has enumerated the device."""
    vm.check(f"usbip attach -r {SERVER_ALIAS} -b {busid}")
    # usbip port lists a port once vhci-hcd has addressed the device.
    wait_for(vm, f"usbip port | grep -q '{SERVER_ALIAS}:3240/{busid}$'")


def ports(vm: Vm) -> dict[int, str]:
    """vhci port number -> busid on the server, from `usbip port`."""
    out = vm.check("usbip port")
    result: dict[int, str] = {}
    port = None
    for line in out.splitlines():
        m = re.match(r"Port (\d+): <Port in Use>", line)
        if m:
            port = int(m.group(1))
        m = re.search(r"usbip://[^/]+/(\S+)", line)
        if m and port is not None:
            result[port] = m.group(1)
    return result


def detach_all(vm: Vm) -> None:
    for port in ports(vm):
        vm.check(f"usbip detach -p {port}")
    wait_for(vm, "! usbip port | grep -q 'Port in Use'")


def device_node(vm: Vm, vid_pid: str, pattern: str, timeout: float = WAIT) -> str:
    """The /dev node (matching ``pattern``, e.g. 'sd*') of the USB device vid:pid."""
    vid, pid = vid_pid.split(":")
    # (ids read with the read builtin: a fork per sysfs entry costs seconds in the guest)
    script = (
        f"for d in /sys/bus/usb/devices/*; do [ -r $d/idVendor ] && read -r v < $d/idVendor "
        f"&& read -r p < $d/idProduct && [ \"$v:$p\" = {vid}:{pid} ] || continue; "
        f"find $d/ -name '{pattern}' \\( -path '*/block/*' -o -path '*tty*' -o -path '*input*' "
        f"\\) -print -quit; done"
    )
    name = wait_output(vm, script, timeout).split()[0].rsplit("/", 1)[-1]
    return f"/dev/input/{name}" if name.startswith("event") else f"/dev/{name}"


def ext2_image(path: Path, size: str, files: dict[str, str]) -> Path:
    """An ext2 image at ``path`` holding ``files`` (name -> text), made on the host."""
    root = path.with_suffix(".d")
    root.mkdir()
    for name, text in files.items():
        (root / name).write_text(text)
    subprocess.run(["mke2fs", "-q", "-t", "ext2", "-d", str(root), str(path), size], check=True)
    return path


def vhci_nodes(kind: str) -> str:
    """Shell: the block devices ('block') or ttys ('tty') behind vhci_hcd."""
    glob = "/sys/block/sd*" if kind == "block" else "/sys/class/tty/ttyACM*"
    return (f"for b in {glob}; do [ -e \"$b\" ] || continue; readlink -f $b | "
            f"grep -q vhci_hcd && basename $b; done")


def vhci_node(vm: Vm, kind: str, timeout: float = WAIT) -> str:
    wait_for(vm, f"[ -n \"$({vhci_nodes(kind)})\" ]", timeout)
    if kind == "block":
        wait_for(vm, f"[ \"$(cat /sys/block/$({vhci_nodes(kind)} | head -n1)/size)\" != 0 ]",
                 timeout)
    return "/dev/" + vm.check(vhci_nodes(kind)).split()[0]
