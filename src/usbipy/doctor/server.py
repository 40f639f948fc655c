"""`usbipy doctor` on a server: the walk a person does by hand, in order.

Kernel modules; the USB devices the host sees; what is bound to usbip-host
(and whether one is stuck "in use" with no connection); libusb export rules;
usbipyd or usbipd running, and where it listens; firewall rules that drop
the port; the TLS files; and where to capture what the kernel serves.
"""

from __future__ import annotations

import datetime
import os
import ssl
from pathlib import Path

from ..config.limits import Limits
from ..escape import printable
from ..linux import sysfs, usbip_host
from ..linux.modules import EXTRA_MODULES
from ..netaddr import is_loopback
from ..tls import TlsFiles
from . import system
from .report import Report, Status

#: A certificate this close to its end is warned about.
EXPIRY_WARNING = datetime.timedelta(days=30)


def check_server(port: int = 3240, tls: TlsFiles | None = None,
                 libusb_rules: list[str] | None = None,
                 resume_window: float = Limits().resume_window) -> Report:
    """Every server-side check; ``libusb_rules``: the export rules through libusb
    (as `usbipy list -l` names them), if any; ``resume_window``: as the
    configuration sets it."""
    report = Report()
    _modules(report, tls is not None)
    devices = sysfs.usb_devices()
    shown = ", ".join(f"{d.busid} ({d.info.idVendor:04x}:{d.info.idProduct:04x})"
                      for d in devices[:8])
    more = f" and {len(devices) - 8} more" if len(devices) > 8 else ""
    # (none is no fault: a server of emulated devices needs no hardware)
    report.add("USB devices", Status.INFO,
               f"{len(devices)} seen: {shown}{more}" if devices else
               "none seen: only emulated devices can be exported from here")
    bound = usbip_host.bound_devices()
    sockets = system.tcp_sockets()
    _bindings(report, bound, system.kernel_held(sockets))
    if libusb_rules:
        report.add("libusb export rules", Status.INFO, ", ".join(libusb_rules))
    _daemon(report, sockets, port, exported=bool(bound or libusb_rules))
    if resume_window > 0:
        report.add("resumption", Status.INFO,
                   f"a usbipy client's lost connection is kept {resume_window:g} s for it to "
                   "resume (limits.resume_window); devices usbip-host serves are attached "
                   "again instead")
    else:
        report.add("resumption", Status.INFO,
                   "off (limits.resume_window = 0): clients attach again after a loss")
    _firewall(report, port)
    if tls is not None:
        _tls(report, tls)
    if bound:
        buses = sorted({d.info.busnum for d in bound})
        report.add("capture", Status.INFO,
                   "the kernel serves these devices: capture their URBs with "
                   + " or ".join(f"dumpcap -i usbmon{b}" for b in buses)
                   + " (modprobe usbmon first)")
    return report


def _modules(report: Report, tls: bool) -> None:
    wanted = [("usbip-host", "exports devices through the kernel (usbip bind)"),
              ("vhci-hcd", "attaches remote devices (usbip attach)")]
    if tls:
        # (TLS is served in userspace without it: only what kernel TLS adds is missing)
        wanted.append(("tls", "kernel TLS: without it TLS is served in userspace, but "
                              "devices bound to usbip-host cannot be exported over TLS"))
    for name, why in wanted:
        if system.module_loaded(name):
            report.add(f"module {name}", Status.OK, "loaded")
        elif system.module_installed(name):
            report.add(f"module {name}", Status.INFO if name == "vhci-hcd" else Status.WARN,
                       f"not loaded ({why})", f"modprobe {name}")
        else:
            report.add(f"module {name}", Status.INFO if name == "vhci-hcd" else Status.WARN,
                       f"not installed for this kernel ({why})",
                       EXTRA_MODULES)


def _bindings(report: Report, bound: list[sysfs.UsbDevice],
              held: list[system.TcpSocket]) -> None:
    """usbip-host's devices; one "in use" needs a connection the kernel holds (usbipd
    and usbipyd give theirs to usbip-host and keep no copy). Fewer such
    connections than devices in use: some are stuck (which ones, the kernel does
    not say)."""
    if not bound:
        report.add("usbip-host bindings", Status.INFO, "no device is bound to usbip-host")
        return
    in_use = [d for d in bound if usbip_host.stub_status(d) is usbip_host.StubStatus.USED]
    stuck = len(in_use) > len(held)
    peers = ", ".join(sorted({f"{s.remote}:{s.remote_port}" for s in held}))
    for device in bound:
        status = usbip_host.stub_status(device)
        name = f"{device.busid} ({device.info.idVendor:04x}:{device.info.idProduct:04x})"
        if status is usbip_host.StubStatus.AVAILABLE:
            report.add(f"binding {device.busid}", Status.OK, f"{name}: available")
        elif status is usbip_host.StubStatus.USED and not stuck:
            report.add(f"binding {device.busid}", Status.OK, f"{name}: in use ({peers})")
        elif status is usbip_host.StubStatus.USED:
            which = ("no connection the kernel holds is open" if not held else
                     f"{len(in_use)} devices in use, {len(held)} connections: this one "
                     "may be stuck")
            report.add(f"binding {device.busid}", Status.FAIL,
                       f"{name}: stuck in use: {which}",
                       f"its client went without a word; free it: usbip unbind -b "
                       f"{device.busid} && usbip bind -b {device.busid} (usbipyd's "
                       "dead-peer timeout prevents this)")
        else:
            report.add(f"binding {device.busid}", Status.FAIL,
                       f"{name}: usbip-host reports an error state",
                       f"usbip unbind -b {device.busid}, replug it, bind it again")


def _daemon(report: Report, sockets: list[system.TcpSocket], port: int,
            exported: bool) -> None:
    daemons = [p for p in system.processes() if _server_name(p)]
    listening = [s for s in sockets if s.state == system.TCP_LISTEN and s.local_port == port]
    names = ", ".join(f"{_server_name(p)} (pid {p.pid})" for p in daemons)
    if not listening:
        report.add("server", Status.FAIL,
                   f"nothing listens on port {port}" + (f" ({names} runs)" if names else ""),
                   "start it: usbipyd -a 0.0.0.0 (or usbipd -D); usbipyd -t PORT for another "
                   "port")
        return
    # The listener is the process that holds the listening socket (its inode among
    # the process's fds), not every usbipyd that runs (a second one may serve another
    # port, or be starting)
    owners = system.socket_owners()
    by_pid = {p.pid: p for p in system.processes()}
    holders = sorted({owners[s.inode] for s in listening if s.inode in owners})
    names = ", ".join(f"{_server_name(by_pid[pid]) or printable(by_pid[pid].name)} "
                      f"(pid {pid})" for pid in holders if pid in by_pid)
    addresses = sorted({s.local for s in listening})
    shown = ", ".join(f"[{a}]" if ":" in a else a for a in addresses)
    everywhere = any(a in ("0.0.0.0", "::") for a in addresses)
    local_only = not everywhere and all(is_loopback(a) for a in addresses)
    if local_only and exported:
        report.add("server", Status.WARN,
                   f"{names or 'a server'} listens on {shown} port {port} only: no other "
                   "host can import the devices bound here",
                   "listen on the network too: usbipyd -a 0.0.0.0 (with TLS: see "
                   "'usbipy cert')")
    else:
        report.add("server", Status.OK,
                   f"{names or 'a server'} listens on {shown} port {port}")


def _server_name(process: system.Process) -> str:
    """"usbipd" or "usbipyd" for a USB/IP server's process, else ""."""
    if process.name in ("usbipd", "usbipyd"):
        return process.name
    args = process.cmdline.split()[:3]  # (python -m usbipy.cli.usbipyd, python usbipyd)
    if args and os.path.basename(args[0]).startswith("python") and any(
            a == "usbipy.cli.usbipyd" or os.path.basename(a) == "usbipyd" for a in args[1:]):
        return "usbipyd"
    return ""


def _firewall(report: Report, port: int) -> None:
    rules = system.firewall_rules()
    if rules is None:
        report.add("firewall", Status.INFO, "no nft or iptables here to ask (or no root)")
        return
    verdict = system.firewall_verdict(rules, port)
    allow = (f"allow it, e.g. nft insert rule inet filter input tcp dport {port} accept "
             f"(or iptables -I INPUT -p tcp --dport {port} -j ACCEPT)")
    if verdict.drops:
        report.add("firewall", Status.FAIL,
                   f"rules drop TCP port {port}: " + "; ".join(verdict.drops), allow)
    elif verdict.accepts:
        report.add("firewall", Status.OK, f"TCP port {port} is accepted: "
                   + "; ".join(verdict.accepts))
    elif verdict.default_drops:
        report.add("firewall", Status.WARN,
                   f"no rule accepts TCP port {port}, and these drop what is not accepted: "
                   + "; ".join(verdict.default_drops), allow)
    else:
        report.add("firewall", Status.OK, f"no rule drops TCP port {port}")


def _tls(report: Report, files: TlsFiles) -> None:
    for what, path in (("certificate", files.cert), ("key", files.key), ("CA", files.ca)):
        try:
            Path(path).read_bytes()
        except OSError as exc:
            report.add("TLS files", Status.FAIL, f"the {what} {path}: {exc.strerror or exc}",
                       "check the path and that this user may read it")
            return
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        context.load_verify_locations(files.cert)  # (the certificate alone: is it one?)
    except ssl.SSLError as exc:
        report.add("TLS files", Status.FAIL, f"{files.cert} is not a PEM certificate "
                   f"({exc.reason or exc})", "give the certificate 'usbipy cert' wrote")
        return
    try:
        context.load_cert_chain(files.cert, files.key, password=lambda: b"")
    except ssl.SSLError as exc:
        report.add("TLS files", Status.FAIL,
                   f"the key {files.key} does not match the certificate {files.cert} "
                   f"({exc.reason or exc})", "issue them again together: usbipy cert issue")
        return
    try:
        context.load_verify_locations(files.ca)
    except ssl.SSLError as exc:
        report.add("TLS files", Status.FAIL, f"the CA {files.ca} does not load: {exc}")
        return
    now = datetime.datetime.now(datetime.UTC)
    for what, path in (("certificate", files.cert), ("CA", files.ca)):
        ends = _not_after(Path(path))
        if ends is None:
            continue
        when = ends.strftime("%Y-%m-%d")
        if ends <= now:
            report.add(f"TLS {what}", Status.FAIL, f"{path} expired on {when}",
                       "issue a new one: usbipy cert issue NAME --server (or init for a CA)")
        elif ends - now < EXPIRY_WARNING:
            report.add(f"TLS {what}", Status.WARN,
                       f"{path} expires on {when}, in {(ends - now).days} days",
                       "issue a new one soon: usbipy cert issue")
        else:
            report.add(f"TLS {what}", Status.OK, f"{path} valid until {when}")


def _not_after(path: Path) -> datetime.datetime | None:
    """When a PEM certificate ends (the first in the file)."""
    try:
        decoded = ssl._ssl._test_decode_cert(str(path))  # type: ignore[attr-defined]
    except (ssl.SSLError, OSError, AttributeError):
        return None
    text = decoded.get("notAfter")
    if not text:
        return None
    return datetime.datetime.fromtimestamp(ssl.cert_time_to_seconds(text), datetime.UTC)
