"""usbipy: the USB/IP client and admin tool, with the words of Linux usbip.

    usbipy list -l | -r HOST [-p]      usbipy attach -r HOST -b BUSID [--persistent]
    usbipy bind -b BUSID               usbipy detach -p PORT | -b BUSID
    usbipy unbind -b BUSID             usbipy port
    usbipy cert init                   usbipy cert issue NAME --server|--client
    usbipy policy check --client NAME|ADDR --device BUSID [-c FILE]

With --tls-cert/--tls-key/--tls-ca (before or after the command), list and
attach speak mutual TLS to usbipyd.

Text output follows the C tool's layout; ``--json`` prints one JSON document
for scripts. Errors go to stderr (and, with ``--json``, as {"error": ...} to
stdout) with exit status 1.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import io
import json
import logging
import os
import signal
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .. import __version__
from ..client import persistent
from ..client.address import split_address
from ..client.attach import attach, attach_device
from ..client.backoff import Backoff
from ..client.identity import DeviceSpec
from ..config.values import MAX_SECONDS, positive, whole
from ..daemonize import DaemonFailed, daemonize
from ..discovery.records import BROWSE_TIME
from ..errors import UsbipError
from ..escape import printable
from ..exports.admin import (
    LocalRules,
    bind_matching,
    find_recorded,
    find_recorded_spec,
    give_back,
    present,
    refuse_protected,
)
from ..exports.rules import ExportRule, PluggedDevice, Via
from ..exports.store import WHERE as STORE_WHERE
from ..keepalive import DEFAULT_TIMEOUT, Keepalive
from ..linux import usbip_host, vhci, vudc
from ..linux.modules import load_hint
from ..linux.sysfs import (
    SysfsError,
    UsbDevice,
    read_device,
    usb_devices,
    usb_devices_dir,
)
from ..linux.usbids import UsbIds, system_ids
from ..linux.usbip_host import UsbipHostError
from ..policy import DeviceSelector
from ..protocol import USBIP_PORT, DeviceInfo
from ..tls import TlsError, TlsFiles, client_context
from ..tls.certs import LEAF_DAYS
from ..usb.classes import UsbClass

if TYPE_CHECKING:  # (loaded where used: each command starts with what it needs only)
    from ..policy import Client, DeviceFacts

#: The socket of the system log, for -l.
SYSLOG = "/dev/log"

def browse_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--browse-time", type=positive(60.0), default=BROWSE_TIME,
                        metavar="SECONDS", help="how long to listen for servers by DNS-SD "
                                                f"(default: {BROWSE_TIME:g})")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="usbipy", description="USB/IP client (protocol 1.1.1).")
    p.add_argument("--version", action="version", version=f"usbipy {__version__}")
    p.add_argument("-d", "--debug", action="store_true",
                   help="print debugging information (as usbip -d)")
    p.add_argument("-l", "--log", action="store_true",
                   help="log to syslog as well (as usbip -l)")
    p.add_argument("-t", "--tcp-port", type=whole(1, 65535), default=USBIP_PORT, metavar="PORT",
                   help=f"TCP port of the server (default: {USBIP_PORT})")
    p.add_argument("--json", action="store_true", help="print JSON for scripts")
    # Also accepted after the subcommand: `usbipy port --json`.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--json", action="store_true", default=argparse.SUPPRESS,
                        help="print JSON for scripts")
    common.add_argument("-t", "--tcp-port", type=whole(1, 65535), default=argparse.SUPPRESS,
                        metavar="PORT", help="TCP port of the server")
    for parser, default in ((p, None), (common, argparse.SUPPRESS)):
        tls = parser.add_argument_group("mutual TLS (usbipyd --tls-*)")
        tls.add_argument("--tls-cert", metavar="FILE", default=default,
                         help="this client's certificate")
        tls.add_argument("--tls-key", metavar="FILE", default=default,
                         help="its private key")
        tls.add_argument("--tls-ca", metavar="FILE", default=default,
                         help="the CA that signed the server's certificate")
        tls.add_argument("--tls-server-name", metavar="NAME", default=default,
                         help="the name the server's certificate must carry "
                              "(default: the HOST given with -r)")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    lst = sub.add_parser("list", parents=[common], help="list exportable or local USB devices "
                         "(with neither -r nor -l: every server's on the network)")
    where = lst.add_mutually_exclusive_group()
    where.add_argument("-r", "--remote", metavar="HOST[:PORT]", help="the devices HOST exports")
    where.add_argument("-l", "--local", action="store_true", help="the local USB devices")
    where.add_argument("-d", "--device", action="store_true",
                       help="the local gadgets bound to usbip-vudc, which 'usbipyd -e' "
                            "exports (device mode)")
    where.add_argument("--all", action="store_true",
                       help="the devices of every usbipy server DNS-SD finds (the default), "
                            "and of those found within a day that do not answer now")
    browse_option(lst)
    lst.add_argument("-p", "--parsable", action="store_true",
                     help="parsable format for -l (as usbip, -r ignores it)")

    def rules_options(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("-c", "--config", metavar="FILE",
                            help="usbipyd's configuration file, for its [[export]] rules "
                                 "(default: usbipyd's, when it exists)")
        parser.add_argument("--state-dir", metavar="DIR",
                            help="where the rules 'usbipy bind' records live (default: "
                                 "$USBIPY_STATE_DIR or /var/lib/usbipy)")

    rules_options(lst)
    for name, text in (("bind", "export a device: bind it to usbip-host (or with --libusb, "
                                "through usbipyd's libusb), now by busid, or by its ids "
                                "wherever and whenever it is plugged in (a rule)"),
                       ("unbind", "stop exporting a device and give it back to its driver "
                                  "(by busid: until it is plugged in again; by --device: "
                                  "the rule removed)")):
        cmd = sub.add_parser(name, parents=[common], help=text)
        which = cmd.add_mutually_exclusive_group(required=True)
        which.add_argument("-b", "--busid", help="the device's bus id")
        which.add_argument("--device", metavar="VID:PID[:SERIAL]",
                           help="the device by its ids, wherever it is plugged in: an export "
                                "rule that usbipyd applies as it appears")
        if name == "bind":
            cmd.add_argument("--libusb", action="store_true",
                             help="export through libusb (usbipyd) rather than usbip-host")
        rules_options(cmd)

    att = sub.add_parser("attach", parents=[common], help="import a remote device into vhci-hcd")
    att.add_argument("-r", "--remote", metavar="HOST[:PORT]", action="append",
                     help="the machine that exports the device; with --device, may repeat: "
                          "the first that offers a match serves it, and without -r, every "
                          "server DNS-SD finds is asked")
    browse_option(att)
    which_device = att.add_mutually_exclusive_group(required=True)
    which_device.add_argument("-b", "--busid", "-d", dest="busid",
                              help="the device's bus id on HOST")
    which_device.add_argument("--device", metavar="VID:PID[:SERIAL]",
                              help="the device by its ids (and serial), at whatever bus id it "
                                   "has: looked up in the device lists at each attempt")
    att.add_argument("--first", action="store_true",
                     help="with --device: where several devices match, the first")
    att.add_argument("--dead-peer-timeout", type=positive(MAX_SECONDS), default=DEFAULT_TIMEOUT,
                     metavar="SECONDS",
                     help="give the server up when it has not answered for this long: the "
                          "device goes away (TCP keepalive and user timeout; default: "
                          f"{DEFAULT_TIMEOUT:g})")
    keep = att.add_argument_group("keeping the device attached")
    keep.add_argument("--persistent", action="store_true",
                      help="stay and attach the device again whenever it is lost (the "
                           "server restarts, the network drops), with backoff; stop with "
                           "'usbipy detach', SIGTERM or Ctrl-C, which detach it")
    keep.add_argument("--retries", type=whole(0, 1 << 30), metavar="N",
                      help="with --persistent: give up when N retries in a row have failed "
                           "(default: never)")
    keep.add_argument("--max-delay", type=positive(MAX_SECONDS), default=60.0, metavar="SECONDS",
                      help="with --persistent: the longest wait between attempts "
                           "(default: 60; the first is 1 s, doubling)")
    keep.add_argument("--background", action="store_true",
                      help="with --persistent: run in the background (the log goes to "
                           "/run/usbipy/attach/PID.log)")
    keep.add_argument("--no-resume", dest="resume", action="store_false",
                      help="with --persistent: do not resume the connection in place when "
                           "the network drops (usbipyd offers it; then the keeper relays "
                           "every byte): attach again instead, and hand the socket itself "
                           "to vhci-hcd (kernel TLS with no process in between)")
    det = sub.add_parser("detach", parents=[common],
                         help="detach a device from vhci-hcd (and stop keeping it attached)")
    which_port = det.add_mutually_exclusive_group(required=True)
    which_port.add_argument("-p", "--port", type=int, help="the vhci port")
    which_port.add_argument("-b", "--busid", help="a persistent attachment, by the busid on "
                                                  "the server (also while it waits)")
    det.add_argument("-r", "--remote", metavar="HOST",
                     help="with -b: the attachment from this server")
    sub.add_parser("port", parents=[common], help="show imported devices")
    status = sub.add_parser("status", parents=[common],
                            help="who holds which device, since when, and the traffic: from "
                                 "usbipyd's status API (usbipyd --http)")
    status_where = status.add_mutually_exclusive_group()
    status_where.add_argument("-r", "--remote", metavar="HOST:PORT|URL",
                              help="the status listener of a server (its --http address; "
                                   "https unless on loopback)")
    status_where.add_argument("--all", action="store_true",
                              help="every server DNS-SD finds that serves its status on the "
                                   "network")
    status.add_argument("-c", "--config", metavar="FILE",
                        help="without -r: usbipyd's configuration file, for its [diagnostics] "
                             "http address (default: usbipyd's)")
    browse_option(status)
    sub.add_parser("version", parents=[common], help="show the version (as usbip version)")

    cert = sub.add_parser("cert", parents=[common],
                          help="make a small CA and certificates for mutual TLS")
    cert_sub = cert.add_subparsers(dest="cert_command", required=True, metavar="ACTION")
    init = cert_sub.add_parser("init", parents=[common],
                               help="make the CA in the state directory")
    init.add_argument("--force", action="store_true", help="replace an existing CA")
    init.add_argument("--name", help="the CA's name (default: \"usbipy CA on HOST\" and a "
                                     "random suffix, unique)")
    issue = cert_sub.add_parser("issue", parents=[common],
                                help="make a key and a certificate signed by the CA")
    issue.add_argument("name", help="the certificate's name: a server's host name, or a "
                                    "client's identity")
    kind = issue.add_mutually_exclusive_group(required=True)
    kind.add_argument("--server", action="store_true", help="for usbipyd")
    kind.add_argument("--client", action="store_true", help="for usbipy")
    issue.add_argument("--san", action="append", default=[], metavar="NAME|IP",
                       help="another host name or address the server is reached by "
                            "(may repeat)")
    issue.add_argument("--days", type=int, default=LEAF_DAYS,
                       help=f"validity in days (default: {LEAF_DAYS})")
    issue.add_argument("--force", action="store_true",
                       help="replace a certificate of that name and its key")
    for parser in (init, issue):
        parser.add_argument("--state-dir", metavar="DIR",
                            help="where the CA lives (default: $USBIPY_STATE_DIR or "
                                 "/var/lib/usbipy), in its tls/ folder")

    doctor = sub.add_parser(
        "doctor", parents=[common],
        help="check this server (or, with -r, the way to HOST) and say what to fix; exit "
             "status 0 only when every check passed")
    doctor.add_argument("-r", "--remote", metavar="HOST[:PORT]",
                        help="check a client's way to HOST: name, TCP, TLS, device list, "
                             "vhci-hcd")
    doctor.add_argument("-b", "--busid", help="with -r: also import this device and release it")
    doctor.add_argument("--attach", action="store_true",
                        help="with -b: attach it for real, check that the kernel enumerated "
                             "it, then detach")
    doctor.add_argument("-c", "--config", metavar="FILE",
                        help="usbipyd's configuration file, for its port and TLS files "
                             "(default: usbipyd's, when it exists)")

    policy = sub.add_parser("policy", parents=[common],
                            help="what usbipyd's access policy decides, without a server")
    policy_sub = policy.add_subparsers(dest="policy_command", required=True, metavar="ACTION")
    check = policy_sub.add_parser(
        "check", parents=[common],
        help="may this client import this device, and which rule says so (exit status 0: "
             "allowed, 3: denied)")
    check.add_argument("--client", action="append", default=[], metavar="CN|ADDR",
                       help="the client: its certificate's CN, its IP address, or both "
                            "(give --client twice)")
    check.add_argument("--san", action="append", default=[], metavar="NAME",
                       help="a subjectAltName of its certificate (may repeat)")
    check.add_argument("--cert", metavar="FILE",
                       help="its certificate itself: CN, subjectAltNames and issuer (for "
                            "rules that name a CA)")
    check.add_argument("--device", "-b", "--busid", dest="device", required=True,
                       metavar="BUSID", help="the device, as usbipyd would export it")
    check.add_argument("-c", "--config", metavar="FILE",
                       help="usbipyd's configuration file (default: usbipyd's)")
    return p


def _class_triple(c: int, s: int, p: int) -> str:
    return f"{c:02x}/{s:02x}/{p:02x}"


def _device_dict(d: DeviceInfo) -> dict[str, object]:
    ids = system_ids()
    return {
        "busid": d.busid, "path": d.path, "busnum": d.busnum, "devnum": d.devnum,
        "speed": d.speed.name.lower(), "idVendor": f"{d.idVendor:04x}",
        "idProduct": f"{d.idProduct:04x}", "bcdDevice": f"{d.bcdDevice:04x}",
        "product": ids.product_name(d.idVendor, d.idProduct),
        "class": _class_triple(d.bDeviceClass, d.bDeviceSubClass, d.bDeviceProtocol),
        "bConfigurationValue": d.bConfigurationValue,
        "bNumConfigurations": d.bNumConfigurations,
        "interfaces": [
            _class_triple(i.bInterfaceClass, i.bInterfaceSubClass, i.bInterfaceProtocol)
            for i in d.interfaces
        ],
    }


# --- list ------------------------------------------------------------------------------


def _print_remote(host: str, devices: Sequence[DeviceInfo], *, escaped: bool = False) -> None:
    # The layout of `usbip list -r`, which has no parsable form (-p is for -l only).
    ids = system_ids()
    shown = host if escaped else printable(host)
    if not devices:
        print(f"usbipy: info: no exportable devices found on {shown}", file=sys.stderr)
        return
    print("Exportable USB devices")
    print("======================")
    print(f" - {shown}")
    for d in devices:
        # busid and path come from the server: escaped before they reach a terminal
        print(f"{printable(d.busid):>11}: {ids.product_name(d.idVendor, d.idProduct)}")
        print(f"{'':>11}: {printable(d.path)}")
        print(f"{'':>11}: "
              f"{ids.class_name(d.bDeviceClass, d.bDeviceSubClass, d.bDeviceProtocol)}")
        for n, i in enumerate(d.interfaces):
            name = ids.class_name(i.bInterfaceClass, i.bInterfaceSubClass, i.bInterfaceProtocol)
            print(f"{'':>11}: {n:>2} - {name}")
        print()


def _exportable_local() -> list[UsbDevice]:
    # As `usbip list -l`: no hubs, nothing that vhci-hcd attached (exporting it would loop).
    return [d for d in usb_devices() if not d.is_hub and not d.on_vhci]


def _print_local(devices: Sequence[UsbDevice], parsable: bool, rules: LocalRules) -> None:
    ids = system_ids()
    for dev in devices:
        _print_listed(dev.busid, dev.info, parsable, ids,
                      None if parsable else _exported_by(dev, rules))


def _print_listed(busid: str, info: DeviceInfo, parsable: bool, ids: UsbIds,
                  status: str | None) -> None:
    """One device of `list -l` or `list -d`, as `usbip list` prints it, with ``status``
    on a third line (not in the parsable form)."""
    usbid = f"{info.idVendor:04x}:{info.idProduct:04x}"
    if parsable:
        print(f"busid={busid}#usbid={usbid}#")
    else:
        print(f" - busid {busid} ({usbid})")
        print(f"   {ids.product_name(info.idVendor, info.idProduct)}")
        print(f"   {status}")
    print()


def _list_gadgets(parsable: bool, as_json: bool) -> object:
    """`usbipy list -d`: the UDCs of usbip-vudc and the gadget bound to each, as
    `usbip list -d` lists them (a UDC with no gadget has nothing to export)."""
    if not vudc.driver_loaded():
        raise UsbipError(f"the usbip-vudc driver is not loaded: {load_hint('usbip-vudc')}")
    found = vudc.gadgets()
    if as_json:
        return [{"busid": g.busid, "function": g.function,
                 **({} if g.info is None else {
                     "usbid": f"{g.info.idVendor:04x}:{g.info.idProduct:04x}",
                     "speed": g.info.speed.name.lower()})} for g in found]
    ids = system_ids()
    for gadget in found:
        info = gadget.info
        if info is None:
            if not parsable:
                print(f" - busid {gadget.busid}: no gadget bound\n")
            continue
        _print_listed(gadget.busid, info, parsable, ids,
                      f"gadget {printable(gadget.function or '?')}")
    return None


def _rule_of(dev: UsbDevice, rules: LocalRules) -> tuple[ExportRule | None, bool]:
    """The rule that exports ``dev``, and whether it is held back (unbound by hand)."""
    held = rules.store.load().unbound.get(dev.busid) == dev.info.devnum
    return rules.rule_for(PluggedDevice.of(dev)), held


def _exported_by(dev: UsbDevice, rules: LocalRules) -> str:
    """How `list -l` says what exports a device: the rule, usbip-host bound by hand, or
    nothing."""
    rule, held = _rule_of(dev, rules)
    if rule is not None and held:
        return f"not exported: unbound by hand until replugged ({rule.where})"
    if rule is not None:
        return f"exported through {rule.via.value} by rule: {rule.where}"
    if dev.driver == usbip_host.DRIVER:
        return "exported through usbip-host (bound by busid: no rule)"
    return "not exported (no rule)"


def _local_dict(dev: UsbDevice, rules: LocalRules) -> dict[str, object]:
    result = _device_dict(dev.info)
    result["driver"] = dev.driver
    rule, held = _rule_of(dev, rules)
    result["exported"] = dev.driver == usbip_host.DRIVER or (
        rule is not None and rule.via is Via.LIBUSB and not held)
    result["rule"] = None if rule is None else {
        "where": rule.where, "export": rule.via.value, "text": str(rule),
        "held_until_replugged": held}
    return result


# --- port ------------------------------------------------------------------------------


def _print_ports(devices: Sequence[vhci.ImportedDevice],
                 keepers: Sequence[persistent.KeeperState] = ()) -> None:
    ids = system_ids()
    print("Imported USB devices")
    print("====================")
    attached = {k.port: k for k in keepers if k.state == "attached"}
    for dev in devices:
        speed = dev.local.info.speed if dev.local is not None else dev.port.speed
        print(f"Port {dev.port.port:02d}: <{dev.port.status.label}> at "
              f"{vhci.SPEED_LABELS[speed]}")
        if dev.local is not None:
            print(f"       {ids.product_name(dev.local.info.idVendor, dev.local.info.idProduct)}")
        else:
            print("       unknown vendor : unknown product (0000:0000)")
        local = dev.port.local_busid
        if dev.record is not None:
            print(f"{local:>10} -> {printable(dev.record.url)}")
        else:
            print(f"{local:>10} -> unknown host, remote port and remote busid")
        print(f"{'':>10} -> remote bus/dev {dev.remote_busnum:03d}/{dev.remote_devnum:03d}")
        tls = dev.record.tls if dev.record is not None else None
        if tls:  # (a plaintext port looks exactly as `usbip port` shows it)
            where = "kernel TLS" if tls.get("kernel") else "TLS"
            print(f"{'':>10} -> encrypted ({where}, {printable(str(tls.get('version')))}) "
                  f"with {printable(str(tls.get('peer')))}")
        keeper = attached.get(dev.port.port)
        if keeper is not None and keeper.devid == dev.port.devid:
            print(f"{'':>10} -> {_keeper_text(keeper)}")
    waiting = [k for k in keepers if k.state != "attached"]
    if waiting:
        print()
        print("Persistent attachments waiting")
        print("==============================")
    for keeper in waiting:
        print(f"{printable(keeper.url)}: <{keeper.state}>")
        print(f"{'':>10} -> {_keeper_text(keeper)}")
        if keeper.last_error:
            print(f"{'':>10} -> last error: {printable(keeper.last_error)}")


def _keeper_text(keeper: persistent.KeeperState) -> str:
    """One line about a persistent attachment: its process, and what it waits for."""
    import time

    text = f"persistent (pid {keeper.pid}"
    if keeper.match is not None:
        text += f", by {keeper.match}"
    if keeper.state == "attached":
        text += f", attached {_ago(time.time() - keeper.since)} ago"
        if keeper.down_since is not None:
            text += f", resuming, down {_ago(time.time() - keeper.down_since)}"
        elif keeper.resumable:
            text += ", resumable"
        if keeper.resumed:
            text += f", resumed {keeper.resumed} times"
        if keeper.reattached:
            text += f", re-attached {keeper.reattached} times"
    elif keeper.state == "waiting" and keeper.retry_at is not None:
        text += (f", retry in {max(0.0, keeper.retry_at - time.time()):.0f} s, "
                 f"attempt {keeper.attempts}")
    else:
        text += ", connecting now"
    if keeper.state != "attached" and keeper.port is not None:
        text += f", was port {keeper.port}"
    return text + ")"


def _ago(seconds: float) -> str:
    seconds = max(0, int(seconds))
    if seconds < 120:
        return f"{seconds} s"
    if seconds < 7200:
        return f"{seconds // 60} min"
    return f"{seconds // 3600} h"


def _ports_json(devices: Sequence[vhci.ImportedDevice],
                keepers: Sequence[persistent.KeeperState]) -> list[dict[str, object]]:
    """Every imported port, then every persistent attachment that waits (status
    "waiting" or "connecting", port null): one list, each entry an attachment."""
    attached = {k.port: k for k in keepers if k.state == "attached"}
    result = []
    for dev in devices:
        entry = _port_dict(dev)
        keeper = attached.get(dev.port.port)
        entry["persistent"] = (keeper.as_dict() if keeper is not None
                               and keeper.devid == dev.port.devid else None)
        result.append(entry)
    for keeper in keepers:
        if keeper.state != "attached":
            result.append({"port": None, "status": keeper.state, "host": keeper.host,
                           "tcp_port": keeper.tcp_port, "remote_busid": keeper.busid,
                           "url": keeper.url, "persistent": keeper.as_dict()})
    return result


def _port_dict(dev: vhci.ImportedDevice) -> dict[str, object]:
    local = dev.local.info if dev.local is not None else None
    record = dev.record
    return {
        "port": dev.port.port, "hub": dev.port.hub, "status": dev.port.status.name.lower(),
        "speed": (local.speed if local is not None else dev.port.speed).name.lower(),
        "local_busid": dev.port.local_busid,
        "idVendor": f"{local.idVendor:04x}" if local is not None else None,
        "idProduct": f"{local.idProduct:04x}" if local is not None else None,
        "host": record.host if record else None,
        "tcp_port": int(record.service) if record and record.service.isdigit() else None,
        "remote_busid": record.busid if record else None,
        "url": record.url if record else None,
        "remote_busnum": dev.remote_busnum, "remote_devnum": dev.remote_devnum,
        "encrypted": bool(record and record.tls),
        "tls": {k: v for k, v in record.tls.items() if k != "devid"}
        if record and record.tls else None,
    }


def _libusb_plugged_in() -> dict[str, tuple[int, int, int]]:
    """What libusb sees plugged in; its errors as one line."""
    from ..backends.libusb.events import usb1
    from ..backends.libusb.source import plugged_in

    try:
        return plugged_in()
    except usb1.USBError as exc:
        raise UsbipError(f"libusb cannot list the USB devices: {exc}") from None


def _libusb_busid(busid: str) -> None:
    """--libusb -b BUSID: a device that is plugged in, and may be exported."""
    from ..backends.libusb.events import require_usb1

    require_usb1()  # usbipyd could not serve it: say so now, not in its log later
    no_such = UsbipHostError(f"no USB device with busid {printable(busid)} (see "
                             "'usbipy list -l'; to export a device that is not plugged in "
                             "yet, bind it by --device VID:PID)")
    try:
        device = read_device(busid)
    except SysfsError:
        if usb_devices_dir().is_dir():
            raise no_such from None
        # no sysfs here (a container, macOS): libusb knows what is plugged in
        found = _libusb_plugged_in().get(busid)
        if found is None:
            raise no_such from None
        if found[2] == UsbClass.HUB:
            raise UsbipHostError(f"{busid} is a hub: hubs cannot be exported") from None
        return
    if device.is_hub:
        raise UsbipHostError(f"{busid} is a hub: hubs cannot be exported")
    if device.driver == usbip_host.DRIVER:
        raise UsbipHostError(f"{busid} is bound to {usbip_host.DRIVER}: "
                             f"'usbipy unbind -b {busid}' first")


# --- main ------------------------------------------------------------------------------


def _certificate_names(path: str) -> tuple[str | None, tuple[str, ...], bytes]:
    """CN, subjectAltNames and DER of the certificate at ``path``."""
    try:
        from cryptography import x509
        from cryptography.hazmat.primitives.serialization import Encoding
    except ImportError:
        raise UsbipError("--cert needs the cryptography package: pip install "
                         "'usbipy[tls]'") from None
    try:
        cert = x509.load_pem_x509_certificate(Path(path).read_bytes())
    except ValueError:
        raise UsbipError(f"{path}: not a PEM certificate") from None
    cns = cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
    cn = str(cns[0].value) if cns else None
    try:
        alt = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        sans = tuple(str(name.value) for name in alt)
    except x509.ExtensionNotFound:
        sans = ()
    return cn, sans, cert.public_bytes(Encoding.DER)


def _policy_client(values: list[str], sans: list[str], cert: str | None) -> Client:
    from ..policy import Client, parse_address

    if not values and not sans and cert is None:
        raise UsbipError("policy check: say which client (--client CN|ADDR, --san, --cert)")
    address: str | None = None
    name: str | None = None
    der: bytes | None = None
    found_sans = tuple(sans)
    if cert is not None:
        name, cert_sans, der = _certificate_names(cert)
        found_sans += cert_sans
    for value in values:
        try:
            parse_address(value)
        except ValueError:
            if value == name:
                continue  # the certificate's own CN, said twice
            if name is not None:
                raise UsbipError(f"--client {printable(value)}: one CN only "
                                 f"({printable(name)} given)") from None
            name = value
        else:
            if address is not None:
                raise UsbipError(f"--client {value}: one address only ({address} given)")
            address = value
    return Client(address, cn=name, sans=found_sans, certificate=der)


def _policy_device(busid: str, options: argparse.Namespace) -> DeviceFacts:
    """The device ``busid`` as usbipyd would export it: emulated, or from sysfs."""
    from ..policy import DeviceFacts
    from ..server.access import facts_of  # (the server's modules: only this command)
    from ..server.registry import DeviceRegistry
    from ..server.service import emulated_devices

    registry = DeviceRegistry()
    devices = emulated_devices(options, look_only=True)
    try:
        for device in devices:
            registry.add(device)
        emulated = registry.get(busid)
        if emulated is not None:
            return facts_of(emulated)
    finally:
        for device in devices:
            device.close()
    try:
        found = read_device(busid)
    except SysfsError:
        raise UsbipError(f"no device {busid}: neither emulated by usbipyd's configuration "
                         "nor plugged in here") from None
    return DeviceFacts(busid, found.info.idVendor, found.info.idProduct, found.serial)


def _policy_check(args: argparse.Namespace) -> dict[str, object]:
    from .. import config

    settings = config.read_settings(config.config_path(args.config))
    if settings.file is None:
        raise UsbipError(f"policy check: no configuration file to check: "
                         f"{config.file.DEFAULT_PATH} does not exist (give one with -c FILE)")
    client = _policy_client(args.client, args.san, args.cert)
    device = _policy_device(args.device, settings.options)
    decision = settings.policy.decide(client, device)
    verdict = "allowed" if decision.allowed else "denied"
    # Rules on the CA can only be judged with the certificate itself.
    unjudged = [rule.number for rule in settings.policy.rules
                if rule.client.ca and client.certificate is None]
    notes = [*settings.warnings, *(f"rule {n} names a CA: without --cert it matches no "
                                   "client here" for n in unjudged)]
    if not args.json:
        serial = f", serial {printable(device.serial)}" if device.serial else ""
        print(f"{printable(device.busid)} ({device.vid_pid}{serial}) for {client.name}: "
              f"{verdict} by {decision.reason}")
        for note in notes:
            print(f"usbipy: note: {note}")
    return {"client": client.name, "device": {"busid": device.busid,
                                              "vid_pid": device.vid_pid,
                                              "serial": device.serial},
            "allowed": decision.allowed, "decision": decision.action.value,
            "rule": decision.rule.number if decision.rule is not None else None,
            "reason": decision.reason, "notes": notes,
            "config": str(settings.file) if settings.file is not None else None}


def _remote_port(args: argparse.Namespace) -> None:
    """-r HOST:PORT and -r [V6ADDR]:PORT, as the PyUSB backend takes them: the port
    given there is the one dialled (-t gives it otherwise)."""
    if getattr(args, "remote", None) is None or args.command in ("detach", "attach", "status"):
        return  # (attach: -r may repeat, see _servers; status: its own listener)
    try:
        args.remote, port = split_address(args.remote)
    except ValueError as exc:
        raise UsbipError(f"-r: {exc}") from None
    if port is not None:
        args.tcp_port = port


def _run(args: argparse.Namespace) -> object:
    """Do the command; print text and return None, or return what --json prints."""
    as_json: bool = args.json
    _remote_port(args)
    tls = TlsFiles.from_options(args.tls_cert, args.tls_key, args.tls_ca)
    if tls is None and args.tls_server_name is not None:
        raise TlsError("--tls-server-name needs --tls-cert, --tls-key and --tls-ca")
    if args.command == "version":
        if not as_json:
            print(f"usbipy {__version__} (USB/IP protocol 1.1.1)")
        return {"version": __version__, "protocol": "1.1.1"}
    if args.command == "policy":
        return _policy_check(args)
    if args.command == "doctor":
        return _doctor(args, tls)
    if args.command == "list":
        if args.device:
            return _list_gadgets(args.parsable, as_json)
        if args.remote is None and not args.local:
            return _list_fleet(args, tls)
        if args.remote is not None:
            import asyncio

            from ..client import list_devices

            context = client_context(tls) if tls is not None else None
            remote = asyncio.run(list_devices(args.remote, args.tcp_port, tls=context,
                                              server_hostname=args.tls_server_name))
            if as_json:
                return [_device_dict(d) for d in remote]
            _print_remote(args.remote, remote)
        else:
            local = _exportable_local()
            rules = _local_rules(args)
            if as_json:
                return [_local_dict(d, rules) for d in local]
            _print_local(local, args.parsable, rules)
    elif args.command in ("bind", "unbind"):
        return _bind(args)
    elif args.command == "attach":
        return _attach(args, tls)
    elif args.command == "detach":
        return _detach(args)
    elif args.command == "cert":
        return _cert(args)
    elif args.command == "port":
        return _port(args)
    elif args.command == "status":
        return _status(args, tls)
    return None


def _list_fleet(args: argparse.Namespace, tls: TlsFiles | None) -> object:
    """`usbipy list` (--all): every server's devices, found by DNS-SD."""
    import asyncio

    from ..client.fleet import as_json, list_fleet

    answers = asyncio.run(list_fleet(args.browse_time, tls=tls,
                                     server_hostname=args.tls_server_name))
    if not answers:
        raise UsbipError("no usbipy server found on the network by DNS-SD (in "
                         f"{args.browse_time:g} s; give -r HOST, or --browse-time)")
    result = {"servers": as_json(answers, _device_dict),
              "not_answering": sum(a.failed for a in answers)}
    if args.json:
        return result
    for answer in answers:
        server = answer.server
        where = f"{printable(server.host)}:{server.port}"
        if answer.devices is None:
            continue
        if not answer.devices:
            print(f"usbipy: info: no exportable devices found on {server.shown_name} ({where})",
                  file=sys.stderr)
            continue
        _print_remote(f"{where} ({server.shown_name}{', TLS' if server.tls else ''})",
                      answer.devices, escaped=True)
    for answer in answers:
        if answer.error is None:
            continue
        server = answer.server
        # (error: found now, and silent; warning: found before only; info: not asked)
        level = "error" if answer.failed else "info" if answer.needs_tls else "warning"
        print(f"usbipy: {level}: {server.shown_name} ({printable(server.host)}:{server.port})"
              f": {printable(answer.error)}", file=sys.stderr)
    return result


def _status(args: argparse.Namespace, tls: TlsFiles | None) -> object:
    """`usbipy status`: who holds what, from usbipyd's status API."""
    import asyncio

    from ..client.status import fetch_all, status_url

    names: dict[str, str] = {}
    if args.all:
        from ..client.fleet import discover

        servers = asyncio.run(discover(args.browse_time, remember=False))
        urls = []
        for found, _how, _seen in servers:
            if found.page is not None:
                url = f"{found.page}api/v1/status"
                names[url] = found.shown_name
                urls.append(url)
        if not urls:
            raise UsbipError(f"no usbipy server found by DNS-SD serves its status on the "
                             f"network ({len(servers)} found in {args.browse_time:g} s; "
                             "usbipyd --http ADDR:PORT serves it)")
    elif args.remote is not None:
        urls = [status_url(args.remote)]
    else:
        urls = [_local_status_address(args)]
    answers = asyncio.run(fetch_all(urls, tls, args.tls_server_name))
    for answer in answers:
        if answer.status is not None:
            try:
                lines = io.StringIO()
                with contextlib.redirect_stdout(lines):
                    _print_status(answer.status)
                if not args.json:
                    print(lines.getvalue(), end="")
            except UsbipError as exc:  # (not the API: said as this server's error)
                answer.error, answer.status = str(exc), None
    failed = [a for a in answers if a.error is not None]
    if not args.json:
        for answer in failed:
            label = names.get(answer.url, printable(answer.url))
            print(f"usbipy: error: {label}: {printable(answer.error or '')}", file=sys.stderr)
    return {"servers": [{"url": a.url, "status": a.status, "error": a.error}
                        for a in answers], "not_answering": len(failed)}


def _local_status_address(args: argparse.Namespace) -> str:
    """The local usbipyd's status URL, from its configuration file's --http address."""
    from ..client.status import status_url
    from ..config import config_path
    from ..config import load as load_config

    path = config_path(args.config)
    options = load_config(path).options if path is not None else {}
    address = options.get("http") or options.get("metrics")
    if address is None:
        raise UsbipError("which server? give -r HOST:PORT (usbipyd --http), or --all; "
                         + (f"{path} sets no [diagnostics] http" if path is not None else
                            "no usbipyd configuration file here says its http address"))
    host, port = address
    if host in ("0.0.0.0", "::"):  # (every address: this machine's own will do)
        local = "127.0.0.1" if host == "0.0.0.0" else "[::1]"
        return status_url(f"{local}:{port}", secure=True)
    return status_url(f"[{host}]:{port}" if ":" in host else f"{host}:{port}")


def _shown(value: Any) -> str:
    return printable(str(value))


def _print_status(status: Any) -> None:
    """One server's status as lines: every value came from the server, and is escaped;
    a shape it does not have is said, not a traceback."""
    server = status.get("server") if isinstance(status, dict) else None
    devices = status.get("devices") if isinstance(status, dict) else None
    if not isinstance(server, dict) or not isinstance(devices, list):
        raise UsbipError("the server's status is not in the shape of usbipy's API (v1)")
    tls_mark = ", TLS" if server.get("tls") is True else ""
    print(f"{_shown(server.get('name'))} (usbipy {_shown(server.get('version'))}{tls_mark}),"
          f" port {_shown(server.get('port'))}")
    if not devices:
        print("    no devices exported")
    for device in devices:
        if not isinstance(device, dict):
            continue
        names = " : ".join(_shown(n) for n in (device.get("vendor"), device.get("product"))
                           if n)
        print(f"{_shown(device.get('busid')):>11}: {_shown(device.get('vid_pid'))} "
              f"{names}".rstrip())
        print(f"{'':>11}: {_state_text(device)}")
        if device.get("rule"):
            print(f"{'':>11}: exported by rule: {_shown(device['rule'])}")
    print()


def _state_text(device: dict[str, Any]) -> str:
    state = device.get("state")
    client = device.get("client")
    if state not in ("in-use", "served-by-kernel") or not isinstance(client, dict):
        return _shown(state)
    who = _shown(client.get("address") or "a client")
    if client.get("cn"):
        who += f" (CN={_shown(client['cn'])})"
    parts = [f"in use by {who}"]
    if client.get("since"):
        parts.append(f"since {_shown(client['since'])}")
    if isinstance(client.get("bytes_in"), int):
        parts.append(f"{_size(client['bytes_in'])} in, {_size(client.get('bytes_out') or 0)} "
                     "out")
    if state == "served-by-kernel":
        parts.append("served by the kernel")
    parts.append("TLS" if client.get("protected") is True else "plaintext")
    return ", ".join(parts)


def _size(count: Any) -> str:
    value = float(count) if isinstance(count, int | float) else 0.0
    for unit in ("B", "kB", "MB", "GB"):
        if value < 1000 or unit == "GB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1000
    return f"{value:.1f} GB"


def _doctor(args: argparse.Namespace, tls: TlsFiles | None) -> dict[str, object]:
    """`usbipy doctor`: the report as lines (or JSON); what _main's exit status reads."""
    from ..doctor import Check, Status, check_client, check_server

    if args.remote is None and (args.busid or args.attach):
        raise UsbipError("-b and --attach go with -r HOST (a client's check)")
    if args.attach and not args.busid:
        raise UsbipError("--attach needs -b BUSID")
    if args.remote is not None:
        report = check_client(args.remote, args.tcp_port, args.busid, tls=tls,
                              server_name=args.tls_server_name, attach=args.attach)
    else:
        port, files = args.tcp_port, tls
        from ..config import config_path
        from ..config import load as load_config

        path = config_path(args.config)
        options: dict[str, Any] = {}
        limits: dict[str, Any] = {}
        problem = None
        if path is not None:
            try:
                loaded = load_config(path)
                options, limits = loaded.options, loaded.limits
            except UsbipError as exc:  # (a check that fails, not the end of the walk)
                problem = str(exc)
        if options:
            port = options.get("tcp_port", port) if args.tcp_port == USBIP_PORT else port
            if files is None:
                files = TlsFiles.from_options(options.get("tls_cert"), options.get("tls_key"),
                                              options.get("tls_ca"))
        report = check_server(port, files, _libusb_rule_names(args),
                              **({"resume_window": limits["resume_window"]}
                                 if "resume_window" in limits else {}))
        if problem is not None:
            report.checks.insert(0, Check("configuration", Status.FAIL, problem,
                                          "usbipyd --check-config -c FILE says the same"))
    result = report.as_json()
    if not args.json:
        print(report.text())
        print("all checks passed" if report.passed else "some checks failed")
    return result


def _libusb_rule_names(args: argparse.Namespace) -> list[str]:
    """The libusb rules in force here, for doctor: each as `usbipy list -l` names it."""
    try:
        rules = LocalRules.read(getattr(args, "config", None), None).all()
    except UsbipError:
        return []
    return [rule.spec or str(rule.device) for rule in rules.via(Via.LIBUSB)]


def _local_rules(args: argparse.Namespace) -> LocalRules:
    return LocalRules.read(args.config, args.state_dir)


def _bind(args: argparse.Namespace) -> object:
    """bind and unbind: by busid as `usbip bind`, or as a rule (--device, --libusb)."""
    rules = _local_rules(args)
    via = Via.LIBUSB if getattr(args, "libusb", False) else Via.USBIP_HOST
    if args.command == "bind":
        if args.device:
            try:
                rule = ExportRule.for_device(args.device, via, where=STORE_WHERE)
            except ValueError as exc:
                raise UsbipError(str(exc)) from None
            return _bind_rule(args, rules, rule)
        if via is Via.LIBUSB:
            _libusb_busid(args.busid)
            rule = ExportRule(DeviceSelector(busid=(args.busid,)), Via.LIBUSB,
                              where=STORE_WHERE)
            refuse_protected(rule)
            rules.store.release(args.busid)
            rules.store.add(rule)
            if args.json:
                return {"busid": args.busid, "rule": f"busid {args.busid}",
                        "export": "libusb", "plugged_in": True}
            print(f"usbipy: info: bind busid {args.busid} for export through libusb: complete")
            return None
        usbip_host.bind(args.busid)
        rules.store.release(args.busid)  # (bound by hand again: the rules apply again)
        if args.json:
            return {"busid": args.busid, "driver": usbip_host.DRIVER}
        print(f"usbipy: info: bind device on busid {args.busid}: complete")
        return None
    if args.device:
        return _unbind_rule(args, rules)
    recorded = find_recorded(rules, None, args.busid, Via.LIBUSB)
    if recorded is not None:
        # a running usbipyd drops the device's client and gives it back to its driver
        rules.store.remove(recorded)
        if args.json:
            return {"busid": args.busid, "rule": None, "export": None}
        print(f"usbipy: info: unbind busid {args.busid} from export through libusb: complete")
        return None
    return _unbind_busid(args, rules)


def _bind_rule(args: argparse.Namespace, rules: LocalRules, rule: ExportRule) -> object:
    if rule.via is Via.LIBUSB:
        from ..backends.libusb.events import require_usb1

        require_usb1()
    refuse_protected(rule)
    rules.store.add(rule)
    if usb_devices_dir().is_dir():
        plugged = [d.busid for d in present() if rule.matches(d)]
    else:  # (no sysfs: a container, macOS; a serial libusb reads only from an opened
        # device: taken as given)
        serial = rule.device.serial[0] if rule.device.serial else None
        plugged = [busid for busid, (vid, pid, cls) in _libusb_plugged_in().items()
                   if rule.matches(PluggedDevice(busid, vid, pid, serial, cls))]
    try:
        bound = bind_matching(rule, rules) if rule.via is Via.USBIP_HOST else []
    except UsbipError:
        rules.store.remove(rule)  # (not half done: the command may simply be run again)
        raise
    if args.json:
        return {"rule": rule.spec, "export": rule.via.value, "plugged_in": bool(plugged),
                "busids": plugged, "bound": bound}
    for busid in bound:
        print(f"usbipy: info: bind device on busid {busid}: complete")
    later = "" if plugged else " (not plugged in now: usbipyd exports it once it is)"
    print(f"usbipy: info: bind {rule.spec} for export through {rule.via.value}: complete"
          f"{later}")
    return None


def _unbind_rule(args: argparse.Namespace, rules: LocalRules) -> object:
    recorded = find_recorded(rules, args.device, None)
    if recorded is None:
        configured = next((r for r in rules.configured
                           if r.spec is not None and find_recorded_spec(r, args.device)), None)
        if configured is not None:
            raise UsbipError(f"{args.device} is exported by {configured.where}: remove that "
                             "rule there (then 'kill -HUP' usbipyd)")
        raise UsbipError(f"{args.device} is not a rule 'usbipy bind' recorded (see 'usbipy "
                         "list -l')")
    rules.store.remove(recorded)
    given = give_back(recorded, rules) if recorded.via is Via.USBIP_HOST else []
    if args.json:
        return {"rule": recorded.spec, "export": None, "given_back": given}
    for busid in given:
        print(f"usbipy: info: unbind device on busid {busid}: complete")
    print(f"usbipy: info: unbind {recorded.spec} from export through {recorded.via.value}: "
          "complete")
    return None


def _unbind_busid(args: argparse.Namespace, rules: LocalRules) -> object:
    try:
        device: PluggedDevice | None = PluggedDevice.of(read_device(args.busid))
    except SysfsError:
        device = None
    rule = rules.rule_for(device) if device is not None else None
    held_before = rules.store.load().unbound.get(args.busid)
    if device is not None and rule is not None:
        # usbipyd must not take it back at once: left alone until it is plugged in again
        rules.store.hold(device.busid, device.devnum)
    if rule is None or rule.via is Via.USBIP_HOST or (
            device is not None and device.driver == usbip_host.DRIVER):
        try:
            usbip_host.unbind(args.busid)
        except UsbipError:
            if device is not None and rule is not None and held_before != device.devnum:
                rules.store.release(device.busid)  # (only the hold this call made)
            raise
    if args.json:
        return {"busid": args.busid, "driver": None,
                "held_until_replugged": rule is not None}
    print(f"usbipy: info: unbind device on busid {args.busid}: complete")
    if rule is not None:
        print(f"usbipy: info: {args.busid} stays unbound until it is plugged in again "
              f"({rule.where or rule})")
    return None


def _servers(args: argparse.Namespace, tls: TlsFiles | None) -> list[tuple[str, int]]:
    """attach's -r HOST[:PORT], each; one unless the device is named by --device; with
    --device and no -r, the servers DNS-SD finds."""
    if not args.remote:
        if args.device is None:
            raise UsbipError("attach -b BUSID needs -r HOST (or name the device by "
                             "--device VID:PID[:SERIAL] to find it on the network)")
        return []  # (found by DNS-SD at each attempt: see _attach_fn)
    servers = []
    for text in args.remote:
        try:
            host, port = split_address(text)
        except ValueError as exc:
            raise UsbipError(f"-r: {exc}") from None
        servers.append((host, port if port is not None else args.tcp_port))
    if len(servers) > 1 and args.device is None:
        raise UsbipError("-r may repeat only with --device (a bus id names a device on one "
                         "server)")
    if args.first and args.device is None:
        raise UsbipError("--first is for --device")
    return servers


def _attach_fn(args: argparse.Namespace, tls: TlsFiles | None,
               servers: list[tuple[str, int]], **options: Any) -> Callable[..., Any]:
    """What attaches the device once: by busid, or found by its ids."""
    common = {"tls": tls, "server_name": args.tls_server_name,
              "keepalive": Keepalive(args.dead_peer_timeout), **options}
    if args.device is None:
        host, port = servers[0]
        return functools.partial(attach, host, args.busid, port, **common)
    spec = DeviceSpec.parse(args.device)
    if servers:
        return functools.partial(attach_device, servers, spec, first=args.first, **common)

    def anywhere(**more: Any) -> Any:
        """The servers DNS-SD finds now (a server that came up since is asked too),
        the device's one chosen (several are an error, unless --first), then it."""
        from ..client.fleet import locate

        found = locate(spec, tls=client_context(tls) if tls is not None else None,
                       server_hostname=args.tls_server_name, first=args.first,
                       browse_time=args.browse_time)
        return attach_device([(found.host, found.port)], spec, first=args.first,
                             **common, **more)

    return anywhere


def _match_text(args: argparse.Namespace, servers: list[tuple[str, int]]) -> str | None:
    if args.device is None:
        return None
    if not servers:
        return (f"device {args.device} on the network (DNS-SD)"
                + (" (the first match)" if args.first else ""))
    return (f"device {args.device} on " + ", ".join(f"{h}:{p}" for h, p in servers)
            + (" (the first match)" if args.first else ""))


def _attach(args: argparse.Namespace, tls: TlsFiles | None) -> object:
    servers = _servers(args, tls)
    if args.persistent:
        return _attach_persistent(args, tls, servers)
    for option in ("retries", "background"):
        if getattr(args, option) not in (None, False):
            raise UsbipError(f"--{option} is for --persistent attachments")
    if not args.resume:
        raise UsbipError("--no-resume is for --persistent attachments (a single attach "
                         "never resumes)")
    attached = _attach_fn(args, tls, servers)()
    busid = attached.device.busid
    if args.json:
        return {"port": attached.port, "host": attached.host,
                "tcp_port": attached.tcp_port, "busid": busid,
                "device": _device_dict(attached.device),
                "tls": attached.tls.as_dict() if attached.tls else None}
    over = f" over TLS with {attached.tls.peer}" if attached.tls else ""
    print(f"usbipy: info: attached {printable(busid)} from {printable(attached.host)}:"
          f"{attached.tcp_port} on port {attached.port}{over}")
    return None


def _port(args: argparse.Namespace) -> object:
    keepers = persistent.read_states()
    try:
        imported = vhci.imported_devices()
    except vhci.VhciError:
        if not keepers:
            raise
        imported = []  # (keepers waiting while vhci-hcd is not loaded: show them)
    if args.json:
        return _ports_json(imported, keepers)
    _print_ports(imported, keepers)
    return None


def _detach(args: argparse.Namespace) -> object:
    if args.remote is not None and args.busid is None:
        raise UsbipError("detach -r HOST needs -b BUSID")
    keepers = persistent.find_keepers(port=args.port, busid=args.busid, host=args.remote)
    if args.port is not None and keepers:
        # (only a keeper whose device is on the port now: its state may be a moment old)
        on_port = {p.port: p.devid for p in vhci.read_ports() if p.in_use}
        keepers = [k for k in keepers if on_port.get(args.port) == k.devid]
    if len(keepers) > 1:
        servers = ", ".join(sorted({printable(f"{k.host}:{k.tcp_port}") for k in keepers}))
        raise UsbipError(f"{len(keepers)} persistent attachments of {printable(args.busid)} "
                         f"(from {servers}): say which with -r HOST, or detach by -p PORT")
    if keepers:
        [keeper] = keepers
        persistent.stop_keeper(keeper)  # (it detaches its port on the way out)
        what = (f"port {keeper.port}" if keeper.state == "attached"
                else printable(keeper.url))
        if args.json:
            return {"port": keeper.port if keeper.state == "attached" else None,
                    "detached": True, "persistent": keeper.as_dict()}
        print(f"usbipy: info: {what} is now detached and no longer kept attached "
              f"(pid {keeper.pid} stopped)")
        return None
    if args.port is None:
        raise UsbipError(f"no persistent attachment of {printable(args.busid)}"
                         f"{f' from {printable(args.remote)}' if args.remote else ''} "
                         "(see 'usbipy port')")
    vhci.detach(args.port)
    if args.json:
        return {"port": args.port, "detached": True}
    print(f"usbipy: info: port {args.port} is now detached")
    return None


def _attach_persistent(args: argparse.Namespace, tls: TlsFiles | None,
                       servers: list[tuple[str, int]]) -> object:
    match = _match_text(args, servers)
    host, port = servers[0] if servers else ("*", args.tcp_port)
    for running in persistent.read_states():
        same = (running.match == match if match is not None else
                running.match is None and (running.host, running.tcp_port, running.busid)
                == (host, port, args.busid))
        if same:
            raise UsbipError(f"{printable(match or running.url)} is already kept attached by "
                             f"pid {running.pid} (see 'usbipy port')")
    vhci.require_vhci()  # a usage error: before going to the background
    keeper = persistent.Keeper(
        host, port, args.busid or args.device,
        _attach_fn(args, tls, servers, watch=True, resume=args.resume), match=match,
        backoff=Backoff(maximum=max(1.0, args.max_delay), retries=args.retries))
    what = match or f"{args.busid} from {host}:{port}"
    if not args.background:
        status = _keep(keeper, logging.StreamHandler(sys.stderr), "usbipy: %(message)s")
        if status:
            raise UsbipError(f"{what}: gave up after {keeper.backoff.attempts} retries")
        return {"persistent": True, "stopped": True} if args.json else None
    pid = _background(keeper)
    log_file = persistent.run_dir() / f"{pid}.log"
    if args.json:
        return {"persistent": True, "pid": pid, "log": str(log_file)}
    print(f"usbipy: info: keeping {what} attached in the background (pid {pid}, log "
          f"{log_file})")
    return None


def _keep(keeper: persistent.Keeper, handler: logging.Handler, form: str) -> int:
    """Run ``keeper`` with its log going to ``handler``; its exit status."""
    handler.setFormatter(logging.Formatter(form))
    logger = logging.getLogger("usbipy.persistent")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    signals = [signal.SIGTERM, signal.SIGINT]
    if signal.getsignal(signal.SIGHUP) is not signal.SIG_IGN:  # (nohup: left ignored)
        signals.append(signal.SIGHUP)
    previous = {sig: signal.signal(sig, lambda _s, _f: keeper.interrupt()) for sig in signals}
    try:
        return keeper.run()
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
        logger.removeHandler(handler)
        handler.close()


def _background(keeper: persistent.Keeper) -> int:
    """Run ``keeper`` in the background; the keeper's pid, once it has started.

    The keeper is a daemon (:func:`usbipy.daemonize.daemonize`). Nothing of it
    returns into the code that called main() (a program, a test runner): it ends
    with os._exit. It says it is ready only once its log is open, so that the
    parent's success means something.
    """
    try:
        started = daemonize()
    except DaemonFailed as exc:
        where = f" (see {persistent.run_dir()}/{exc.pid}.log)" if exc.pid is not None else ""
        raise UsbipError(f"the background keeper did not start{where}") from None
    if isinstance(started, int):
        return started
    status = 1
    try:
        import logging.handlers

        log_file = persistent.run_dir() / f"{os.getpid()}.log"
        log_file.parent.mkdir(parents=True, exist_ok=True)
        handler = logging.handlers.RotatingFileHandler(log_file, maxBytes=1 << 20,
                                                       backupCount=1)
        started.ready()
        status = _keep(keeper, handler, "%(asctime)s usbipy: %(message)s")
        if status == 0:  # (its log is kept when it gave up: it says why)
            for path in (log_file, log_file.with_name(log_file.name + ".1")):
                path.unlink(missing_ok=True)
    except BaseException:
        logging.getLogger("usbipy.persistent").exception("the keeper failed")
    finally:
        os._exit(status)


def _cert(args: argparse.Namespace) -> object:
    from ..tls import certs

    base = Path(args.state_dir) if args.state_dir else None
    if args.cert_command == "init":
        made = certs.init_ca(base, name=args.name, force=args.force)
        if args.json:
            return {"ca": str(made.cert), "key": str(made.key)}
        print(f"usbipy: info: CA made: {made.cert} (its key: {made.key}; keep it private)")
        return None
    made = certs.issue(args.name, server=args.server, base=base, alt_names=tuple(args.san),
                       days=args.days, force=args.force)
    if args.json:
        return {"cert": str(made.cert), "key": str(made.key), "ca": str(made.ca)}
    option = "usbipyd" if args.server else "usbipy"
    print(f"usbipy: info: {'server' if args.server else 'client'} certificate for "
          f"{args.name}: {made.cert}")
    print(f"usbipy: info: use it with: {option} --tls-cert {made.cert} --tls-key {made.key} "
          f"--tls-ca {made.ca}")
    return None


def _os_error_text(exc: OSError) -> str:
    """An OSError as one line: the file, what went wrong, and for EACCES what to do."""
    where = f"{exc.filename}: " if exc.filename else ""
    what = exc.strerror or str(exc)
    if isinstance(exc, PermissionError):
        return f"{where}{what} (run as root)"
    return f"{where}{what}"


def main(argv: Sequence[str] | None = None) -> int:
    try:
        return _main(argv)
    except BrokenPipeError:
        # `usbipy list -r HOST | head`: the reader left; no traceback, as the C tool.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


def _logging(debug: bool, syslog: bool) -> list[logging.Handler]:
    """-d: debugging lines on stderr; -l: every line to syslog too (as usbip's -d, -l).
    The handlers added (main() removes them when the command is done)."""
    handlers: list[logging.Handler] = []
    if debug:
        stderr = logging.StreamHandler(sys.stderr)
        stderr.setFormatter(logging.Formatter("usbipy: %(levelname)s: %(message)s"))
        handlers.append(stderr)
    if syslog:
        from logging.handlers import SysLogHandler

        if not Path(SYSLOG).exists():
            raise UsbipError(f"-l: no syslog here ({SYSLOG} is missing)")
        system_log = SysLogHandler(address=SYSLOG)
        system_log.setFormatter(logging.Formatter("usbipy[%(process)d]: %(message)s"))
        handlers.append(system_log)
    logger = logging.getLogger("usbipy")
    if handlers:
        logger.setLevel(logging.DEBUG if debug else logging.INFO)
    for handler in handlers:
        logger.addHandler(handler)
    return handlers


def _main(argv: Sequence[str] | None) -> int:
    args = build_parser().parse_args(argv)
    handlers: list[logging.Handler] = []
    try:
        handlers = _logging(args.debug, args.log)
        result = _run(args)
    except BrokenPipeError:
        raise  # the reader left: main() ends quietly, this is no error to report
    except (UsbipError, OSError) as exc:
        # Every error a user can cause: one line on stderr, exit status 1, and with
        # --json the same as an object on stdout.
        text = str(exc) if isinstance(exc, UsbipError) else _os_error_text(exc)
        text = printable(text)
        print(f"usbipy: error: {text}", file=sys.stderr)
        if args.json:
            print(json.dumps({"error": text, "kind": type(exc).__name__}))
        return 1
    finally:
        for handler in handlers:
            logging.getLogger("usbipy").removeHandler(handler)
            handler.close()
    if args.json:
        print(json.dumps(result, indent=2))
    if args.command == "policy" and isinstance(result, dict) and not result["allowed"]:
        return 3  # (a decision, not an error: "denied" for scripts)
    if args.command == "doctor" and isinstance(result, dict) and not result["passed"]:
        return 1
    if args.command in ("list", "status") and isinstance(result, dict) and result.get(
            "not_answering"):
        return 1  # (some servers did not answer: named on stderr, or in the JSON)
    return 0


if __name__ == "__main__":
    sys.exit(main())
