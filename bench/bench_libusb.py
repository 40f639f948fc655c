"""The libusb export against the kernel stub, on the same device in the same VM run.

    python bench/bench_libusb.py [--size-mib 64] [--json results.json]

Boots this machine's kernel under QEMU (the kernel tests' harness), makes a
configfs mass-storage gadget on dummy_hcd, and reads it through vhci-hcd
twice: exported by usbipyd through libusb, and exported by the kernel's
usbip-host. Prints MB/s for each and the ratio. Needs root, like the kernel
tests. Figures are for a TCG guest: compare the ratio, not the MB/s.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.kernel import gadgets  # noqa: E402
from tests.kernel.guest import vhci_node, vhci_nodes, wait_for  # noqa: E402
from tests.kernel.vm import Vm  # noqa: E402

PYTHON = sys.executable
ENV = "USBIPY_STATE_DIR=/run/usbipy"
USBIPY = f"{ENV} {PYTHON} -m usbipy.cli.usbipy"
USBIPYD = f"{ENV} {PYTHON} -m usbipy.cli.usbipyd"
MSC = "1d6b:0104"


def read_rate(vm: Vm, size_mib: int) -> float:
    disk = vhci_node(vm, "block")
    out = vm.check(f"dd if={disk} of=/dev/null bs=1M count={size_mib} iflag=direct 2>&1",
                   timeout=600)
    match = re.search(r"(\d+) bytes .* copied, ([\d.]+) s", out)
    if match is None:
        raise RuntimeError(f"unexpected dd output: {out}")
    return int(match.group(1)) / float(match.group(2)) / 1e6


def detach(vm: Vm) -> None:
    vm.check("for p in $(usbip port | sed -n 's/^Port \\([0-9]*\\):.*/\\1/p'); do "
             "usbip detach -p $p; done")
    wait_for(vm, f"[ -z \"$({vhci_nodes('block')})\" ]")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-mib", type=int, default=64, help="how much to read each time")
    parser.add_argument("--rounds", type=int, default=2, help="reads per export; best counts")
    parser.add_argument("--json", type=Path, help="write the results here too")
    args = parser.parse_args()
    rates: dict[str, float] = {}
    with tempfile.TemporaryDirectory():
        with Vm(memory_mb=1536) as vm:
            vm.check("modprobe -a usbip-host vhci-hcd usb-storage sd_mod")
            gadgets.load(vm, udcs=1)
            vm.check(f"dd if=/dev/urandom of=/run/msc.img bs=1M count={args.size_mib} "
                     "2>/dev/null")
            gadgets.create(vm, "msc", MSC, "mass_storage.0", {"lun.0/file": "/run/msc.img"})
            busid = gadgets.busid(vm, MSC)

            vm.check(f"{USBIPY} bind --libusb -b {busid}")
            vm.check(f"({USBIPYD} -P /run/usbipyd.pid > /run/usbipyd.log 2>&1 &)")
            wait_for(vm, f"{USBIPY} list -r 127.0.0.1 2>/dev/null | grep -q ' {busid}: '")
            vm.check(f"{USBIPY} attach -r 127.0.0.1 -b {busid}")
            rates["libusb"] = max(read_rate(vm, args.size_mib) for _ in range(args.rounds))
            detach(vm)
            vm.check(f"{USBIPY} unbind -b {busid}")
            vm.check("kill $(cat /run/usbipyd.pid)")
            wait_for(vm, "[ ! -e /run/usbipyd.pid ]")

            vm.check(f"usbip bind -b {busid} && usbipd -D")
            wait_for(vm, f"usbip list -r 127.0.0.1 2>/dev/null | grep -q ' {busid}: '")
            vm.check(f"usbip attach -r 127.0.0.1 -b {busid}")
            rates["usbip-host"] = max(read_rate(vm, args.size_mib) for _ in range(args.rounds))
            detach(vm)
    ratio = rates["libusb"] / rates["usbip-host"]
    print(f"{'export':<12} {'read MB/s':>10}")
    for name, rate in rates.items():
        print(f"{name:<12} {rate:>10.1f}")
    print(f"libusb / usbip-host: {ratio:.2f}x  ({args.size_mib} MiB, O_DIRECT, 1 MiB reads, "
          "best of " f"{args.rounds}, TCG guest)")
    if args.json:
        args.json.write_text(json.dumps({"rates_mb_s": rates, "ratio": ratio}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
