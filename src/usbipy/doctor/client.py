"""`usbipy doctor -r HOST [-b BUSID] [--attach]` on a client.

Name resolution; TCP reachability and its time (refused, timed out and reset
each explained); the TLS handshake; the device list; vhci-hcd and its free
ports; with a busid, an import released at once; with ``--attach``, a full
attach that checks the kernel enumerated the device (a driver bound, a
node created) and shows what vhci-hcd logged, then a detach.
"""

from __future__ import annotations

import errno
import re
import socket
import ssl
import time

from ..client.errors import ClientError
from ..client.handshake import import_offering_resume, request_devlist
from ..errors import UsbipError
from ..escape import printable
from ..linux import sysfs, vhci
from ..protocol import DeviceInfo, Speed
from ..protocol.resume import ResumableStream
from ..tls import TlsFiles, client_context, handshake_failure
from ..tls.context import peer_identity
from . import system
from .report import Report, Status

#: Seconds to connect, and for the kernel to enumerate an attached device.
CONNECT_TIMEOUT = 5.0
ENUMERATE_TIMEOUT = 45.0


def check_client(host: str, port: int = 3240, busid: str | None = None, *,
                 tls: TlsFiles | None = None, server_name: str | None = None,
                 attach: bool = False) -> Report:
    """The checks of a client of ``host``; ``server_name``: the name the server's
    certificate must carry (--tls-server-name), by default ``host``."""
    report = Report()
    name = server_name or host
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        report.add("name", Status.FAIL, f"{printable(host)} does not resolve: {exc.strerror}",
                   "check the name, or give the address")
        return report
    addresses = sorted({str(info[4][0]) for info in infos})
    report.add("name", Status.OK, f"{printable(host)} is {', '.join(addresses)}")
    sock = _connect(report, infos, host, port)
    if sock is None:
        _vhci(report, None)
        return report
    devices = _list(report, sock, name, tls)
    device = None
    if devices is not None and busid is not None:
        device = next((d for d in devices if d.busid == busid), None)
        if device is None:
            report.add("device", Status.FAIL,
                       f"{printable(host)} does not offer {printable(busid)} (in use by another "
                       "client, not bound, "
                       "or no such busid)",
                       f"on the server: usbipy list -l; usbipy bind -b {printable(busid)}")
    _vhci(report, device)
    if device is not None and busid is not None:
        if attach:
            _attach(report, host, port, busid, tls, server_name)
        else:
            _import(report, host, port, busid, tls, name)
    return report


def _open(host: str, port: int, tls: TlsFiles | None, server_name: str,
          timeout: float = CONNECT_TIMEOUT) -> socket.socket:
    sock = socket.create_connection((host, port), timeout=timeout)
    if tls is not None:
        sock = client_context(tls).wrap_socket(sock, server_hostname=server_name)
    return sock


def _connect(report: Report, infos: list[tuple], host: str, port: int  # type: ignore[type-arg]
             ) -> socket.socket | None:
    started = time.monotonic()
    last: OSError | None = None
    for family, kind, proto, _name, address in infos:
        sock = socket.socket(family, kind, proto)
        sock.settimeout(CONNECT_TIMEOUT)
        try:
            sock.connect(address)
        except OSError as exc:
            sock.close()
            last = exc
            continue
        took = (time.monotonic() - started) * 1000
        report.add("TCP", Status.OK, f"connected to {address[0]} port {port} in {took:.1f} ms")
        return sock
    where = f"{printable(host)} port {port}"
    if isinstance(last, ConnectionRefusedError):
        report.add("TCP", Status.FAIL, f"{where}: connection refused: nothing listens there "
                   "(or a firewall rejects it)",
                   "start usbipyd (or usbipd) on the server, on an address this host "
                   "reaches (usbipyd -a 0.0.0.0; it listens on 127.0.0.1 only by default); "
                   "on the server, usbipy doctor reads the firewall")
    elif getattr(last, "errno", None) in (errno.EHOSTUNREACH, errno.EACCES, errno.EPERM):
        report.add("TCP", Status.FAIL,
                   f"{where}: {last.strerror if last else ''}: a firewall rejects it "
                   "(admin-prohibited), or there is no route",
                   f"allow TCP port {port} on the server (usbipy doctor there says which "
                   "rule); check the route (ip route get)")
    elif isinstance(last, TimeoutError) or getattr(last, "errno", None) == errno.ETIMEDOUT:
        report.add("TCP", Status.FAIL,
                   f"{where}: no answer in {CONNECT_TIMEOUT:g} s: a firewall drops the "
                   "packets, or the host is down",
                   f"on the server: usbipy doctor (it reads the firewall rules); allow TCP "
                   f"port {port}")
    elif isinstance(last, ConnectionResetError):
        report.add("TCP", Status.FAIL, f"{where}: reset: the server refused us")
    else:
        text = last.strerror if last is not None and last.strerror else str(last)
        report.add("TCP", Status.FAIL, f"{where}: {text}",
                   "check the route to the host (ping it)")
    return None


def _list(report: Report, sock: socket.socket, server_name: str,
          tls: TlsFiles | None) -> list[DeviceInfo] | None:
    try:
        if tls is not None:
            try:
                sock = client_context(tls).wrap_socket(sock, server_hostname=server_name)
            except (ssl.SSLError, OSError) as exc:
                report.add("TLS", Status.FAIL, handshake_failure(exc),
                           "check the CA (--tls-ca), the name the server's certificate "
                           "gives, and the dates")
                return None
            report.add("TLS", Status.OK, f"{sock.version()} with "
                       f"{_peer(sock)}")
        try:
            devices = list(request_devlist(sock))
        except ClientError as exc:
            report.add("device list", Status.FAIL, str(exc),
                       "a server that closes at once wants TLS: --tls-cert, --tls-key, "
                       "--tls-ca" if tls is None else "")
            return None
    finally:
        sock.close()
    shown = ", ".join(printable(d.busid) for d in devices)
    report.add("device list", Status.OK if devices else Status.WARN,
               f"{len(devices)} offered: {shown}" if devices else "no device offered",
               "" if devices else "on the server: usbipy bind -b BUSID (or usbipyd --demo)")
    return devices


def _peer(sock: socket.socket) -> str:
    return peer_identity(sock.getpeercert())  # type: ignore[attr-defined]


def _vhci(report: Report, device: DeviceInfo | None) -> None:
    if not vhci.controller_dir().exists():
        installed = system.module_installed("vhci-hcd")
        report.add("vhci-hcd", Status.WARN if device is None else Status.FAIL,
                   "not loaded: the kernel cannot attach a remote device here" + (
                       "" if installed else " (and not installed for this kernel)"),
                   "modprobe vhci-hcd" if installed else
                   "install the kernel's extra modules; or use the userspace client "
                   "(usbipy.connect, usbipy.pyusb), which needs no module")
        return
    ports = vhci.read_ports()
    high = sum(1 for p in ports if p.hub == "hs" and p.status == vhci.PortStatus.NULL)
    superspeed = sum(1 for p in ports if p.hub == "ss" and p.status == vhci.PortStatus.NULL)
    needs_ss = device is not None and device.speed >= Speed.SUPER
    free = superspeed if needs_ss else high
    if device is not None and free == 0:
        report.add("vhci-hcd", Status.FAIL,
                   f"no free {'SuperSpeed' if needs_ss else 'USB 2'} port for "
                   f"{printable(device.busid)}",
                   "detach one: usbipy port; usbipy detach -p N")
    else:
        report.add("vhci-hcd", Status.OK, f"loaded: {high} USB 2 and {superspeed} SuperSpeed "
                   "ports free")


def _why(exc: Exception) -> str:
    """An error as a check shows it: its strerror, else its text; escaped."""
    return printable(str(getattr(exc, "strerror", None) or exc))


def _import(report: Report, host: str, port: int, busid: str, tls: TlsFiles | None,
            server_name: str) -> None:
    try:
        with _open(host, port, tls, server_name) as sock:
            device, grant = import_offering_resume(sock, busid, plaintext=tls is None)
            if grant is not None:
                # (said so, the server lets the device go at once, not after its window)
                sock.sendall(ResumableStream().fin())
    except (UsbipError, OSError) as exc:
        report.add("import", Status.FAIL, f"{printable(busid)}: {_why(exc)}")
        return
    report.add("import", Status.OK, f"{printable(busid)} imported and released at once "
               f"({device.idVendor:04x}:{device.idProduct:04x})")
    if grant is not None:
        report.add("resumption", Status.OK,
                   f"the server resumes a lost connection within {grant.window} s "
                   "('usbipy attach --persistent' does, in place)")
    else:
        report.add("resumption", Status.INFO,
                   "the server does not resume lost connections (usbipd, or usbipyd with "
                   "resume_window 0): 'usbipy attach --persistent' attaches again after a "
                   "loss")


def _attach(report: Report, host: str, port: int, busid: str, tls: TlsFiles | None,
            server_name: str | None) -> None:
    from ..client.attach import attach

    marker = system.kernel_log_length()
    try:
        attached = attach(host, busid, port, tls=tls, server_name=server_name)
    except (UsbipError, OSError) as exc:
        report.add("attach", Status.FAIL, f"{printable(busid)}: {_why(exc)}")
        return
    try:
        local = _enumerated(attached.port)
        if local is None:
            report.add("attach", Status.FAIL,
                       f"{printable(busid)} on port {attached.port}: the kernel did not "
                       "enumerate it in "
                       f"{ENUMERATE_TIMEOUT:g} s", "see the kernel log: dmesg | tail")
        else:
            drivers, nodes = _bound(local)
            status = Status.OK if drivers else Status.WARN
            report.add("attach", status,
                       f"{printable(busid)} on port {attached.port} is {local.busid} here: drivers "
                       f"{', '.join(drivers) or 'none'}; nodes {', '.join(nodes) or 'none'}",
                       "" if drivers else "no driver took it: is its class driver installed?")
        mine = re.compile(rf"\busb {re.escape(local.busid)}:" if local is not None else "$^")
        lines = [line for line in system.kernel_log_since(marker)
                 if "vhci_hcd" in line or mine.search(line)]
        if lines:
            report.add("kernel log", Status.INFO, "\n".join(lines[-12:]))
    finally:
        try:
            vhci.detach(attached.port)
            vhci.remove_record(attached.port)
            report.add("detach", Status.OK, f"port {attached.port} detached")
        except (UsbipError, OSError) as exc:
            report.add("detach", Status.FAIL, f"port {attached.port}: {exc}",
                       f"usbipy detach -p {attached.port}")


def _enumerated(port: int) -> sysfs.UsbDevice | None:
    deadline = time.monotonic() + ENUMERATE_TIMEOUT
    while time.monotonic() < deadline:  # (bounded: a kernel that never enumerates it)
        for imported in vhci.imported_devices():
            if imported.port.port == port and imported.local is not None:
                return imported.local
        time.sleep(0.2)
    return None


def _bound(device: sysfs.UsbDevice) -> tuple[list[str], list[str]]:
    """The drivers bound to the device's interfaces, and the device nodes made
    under it (block, tty, input), after a short wait for them to appear."""
    deadline = time.monotonic() + ENUMERATE_TIMEOUT
    drivers: list[str] = []
    nodes: list[str] = []
    while time.monotonic() < deadline:
        drivers = sorted({d for i in device.sys_path.glob(f"{device.busid}:*")
                          if (d := sysfs.driver_of(i)) is not None})
        nodes = sorted({p.name for kind in ("block", "tty", "input")
                        for p in device.sys_path.glob(f"**/{kind}/*")})
        if drivers and (nodes or time.monotonic() > deadline - ENUMERATE_TIMEOUT + 10):
            break  # (a driver bound; nodes of these kinds within 10 s, or none to make)
        time.sleep(0.2)
    return drivers, nodes
