"""usbipy: the USB/IP client and admin tool, with the words of Linux usbip."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Sequence

from ..client import ClientError, list_devices
from ..protocol import DeviceInfo
from ..server import USBIP_PORT


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="usbipy", description="USB/IP client (protocol 1.1.1).")
    p.add_argument("-t", "--tcp-port", type=int, default=USBIP_PORT, metavar="PORT",
                   help=f"TCP port of the server (default: {USBIP_PORT})")
    p.add_argument("--json", action="store_true", help="print JSON for scripts")
    sub = p.add_subparsers(dest="command", required=True)
    lst = sub.add_parser("list", help="list exportable or local USB devices")
    lst.add_argument("-r", "--remote", metavar="HOST", required=True,
                     help="list the devices HOST exports")
    lst.add_argument("-p", "--parsable", action="store_true", help="parsable output")
    return p


def _device_dict(d: DeviceInfo) -> dict[str, object]:
    return {
        "busid": d.busid, "path": d.path, "busnum": d.busnum, "devnum": d.devnum,
        "speed": d.speed.name.lower(), "idVendor": f"{d.idVendor:04x}",
        "idProduct": f"{d.idProduct:04x}", "bcdDevice": f"{d.bcdDevice:04x}",
        "class": f"{d.bDeviceClass:02x}/{d.bDeviceSubClass:02x}/{d.bDeviceProtocol:02x}",
        "bConfigurationValue": d.bConfigurationValue,
        "bNumConfigurations": d.bNumConfigurations,
        "interfaces": [
            f"{i.bInterfaceClass:02x}/{i.bInterfaceSubClass:02x}/{i.bInterfaceProtocol:02x}"
            for i in d.interfaces
        ],
    }


def _print_remote(host: str, devices: Sequence[DeviceInfo]) -> None:
    # The layout of `usbip list -r`.
    print("Exportable USB devices")
    print("======================")
    print(f" - {host}")
    for d in devices:
        ids = f"{d.idVendor:04x}:{d.idProduct:04x}"
        print(f"{d.busid:>11}: unknown vendor : unknown product ({ids})")
        print(f"{'':>11}: {d.path}")
        print(f"{'':>11}: ({d.bDeviceClass:02x}/{d.bDeviceSubClass:02x}/{d.bDeviceProtocol:02x})")
        for n, i in enumerate(d.interfaces):
            print(f"{'':>11}: {n:>2} - ({i.bInterfaceClass:02x}/{i.bInterfaceSubClass:02x}/"
                  f"{i.bInterfaceProtocol:02x})")
        print()


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "list":
            devices = asyncio.run(list_devices(args.remote, args.tcp_port))
            if args.json:
                print(json.dumps([_device_dict(d) for d in devices], indent=2))
            else:
                _print_remote(args.remote, devices)
            return 0
    except ClientError as exc:
        print(f"usbipy: error: {exc}", file=sys.stderr)
        return 1
    return 2


if __name__ == "__main__":
    sys.exit(main())
