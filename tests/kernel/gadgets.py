"""configfs USB gadgets on dummy_hcd: real USB devices inside the guest.

dummy_hcd pairs a virtual host controller with a virtual device controller
(UDC). A gadget bound to the UDC enumerates on the host side like a device
plugged into a port, with a busid, drivers and a node in /dev/bus/usb, which
is what libusb needs.
"""

from __future__ import annotations

import json
import shlex

from .guest import wait_for, wait_output
from .vm import Vm

GADGETS = "/sys/kernel/config/usb_gadget"


def load(vm: Vm, udcs: int = 3) -> None:
    vm.check(f"modprobe dummy_hcd num={udcs} && modprobe -a libcomposite usb_f_mass_storage "
             "usb_f_acm usb_f_ss_lb u_serial && { mountpoint -q /sys/kernel/config || "
             "mount -t configfs configfs /sys/kernel/config; }")


def create(vm: Vm, name: str, vid_pid: str, function: str,
           attrs: dict[str, str | bytes] | None = None, udc: int = 0) -> None:
    """Make gadget ``name`` with one function (e.g. 'mass_storage.0', 'acm.usb0') and
    bind it to dummy_udc.<udc>. An attribute given as bytes is written as they are (a
    HID report descriptor)."""
    vid, pid = vid_pid.split(":")
    g = f"{GADGETS}/{name}"
    lines = [
        f"mkdir -p {g}/strings/0x409 {g}/configs/c.1/strings/0x409 {g}/functions/{function}",
        f"echo 0x{vid} > {g}/idVendor", f"echo 0x{pid} > {g}/idProduct",
        f"echo usbipy > {g}/strings/0x409/manufacturer",
        f"echo {name} > {g}/strings/0x409/product",
        f"echo {name}-0001 > {g}/strings/0x409/serialnumber",
        f"echo c > {g}/configs/c.1/strings/0x409/configuration",
    ]
    for attr, value in (attrs or {}).items():
        if isinstance(value, bytes):
            escaped = "".join(f"\\x{b:02x}" for b in value)
            lines.append(f"printf '{escaped}' > {g}/functions/{function}/{attr}")
        else:
            lines.append(f"echo {shlex.quote(value)} > {g}/functions/{function}/{attr}")
    lines.append(f"ln -s {g}/functions/{function} {g}/configs/c.1/")
    lines.append(f"echo dummy_udc.{udc} > {g}/UDC")
    vm.check(" && ".join(lines))
    wait_for(vm, f"[ -n \"$({busid_script(vid_pid)})\" ]")


def busid_script(vid_pid: str) -> str:
    vid, pid = vid_pid.split(":")
    # (ids read with the read builtin: a fork per sysfs entry costs seconds in the guest)
    return (f"for d in /sys/bus/usb/devices/*; do [ -f $d/idVendor ] && read -r v < $d/idVendor "
            f"&& read -r p < $d/idProduct && [ \"$v:$p\" = {vid}:{pid} ] && "
            f"case $d in *vhci*) ;; *) echo ${{d##*/}};; esac; done; true")


def busid(vm: Vm, vid_pid: str) -> str:
    """The busid of the gadget on dummy_hcd (not a copy attached through vhci)."""
    for name in vm.check(busid_script(vid_pid)).split():
        if "vhci" not in vm.check(f"readlink -f /sys/bus/usb/devices/{name}"):
            return name
    raise AssertionError(f"no {vid_pid} on dummy_hcd")


def vhci_busid(vm: Vm, vid_pid: str, timeout: float = 120) -> str:
    """The busid of the gadget's copy attached through vhci-hcd, once it has enumerated
    (AssertionError after ``timeout`` seconds)."""
    vid, pid = vid_pid.split(":")
    return wait_output(vm, "for d in /sys/bus/usb/devices/*; do [ -f $d/idVendor ] && "
                           "read -r v < $d/idVendor && read -r p < $d/idProduct && "
                           f"[ \"$v:$p\" = {vid}:{pid} ] && readlink -f $d | grep -q vhci "
                           "&& echo ${d##*/}; done; true", timeout).split()[0]


def unplug(vm: Vm, name: str) -> None:
    """Unbind the gadget from its UDC: to the host side, the device is unplugged."""
    vm.check(f"echo '' > {GADGETS}/{name}/UDC")


def plug(vm: Vm, name: str, udc: int = 0) -> None:
    vm.check(f"echo dummy_udc.{udc} > {GADGETS}/{name}/UDC")


def local_json(vm: Vm, usbipy: str) -> list[dict[str, object]]:
    result: list[dict[str, object]] = json.loads(vm.check(f"{usbipy} list -l --json"))
    return result
