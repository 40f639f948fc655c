"""`usbip attach`: import a remote device over TCP, then hand the socket to vhci-hcd.

Over TLS, the handshake is done here and the session keys go to the kernel
(kTLS) before the import: vhci-hcd then reads and writes an encrypted
connection with no process in between (see :mod:`usbipy.tls.ktls`).
"""

from __future__ import annotations

import contextlib
import socket
import ssl
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from ..keepalive import DEFAULT, Keepalive
from ..linux import vhci
from ..protocol import DeviceInfo
from ..protocol.resume import ResumableStream
from ..tls import TlsError, TlsFiles, TlsSession, client_context, ktls
from . import identity
from .errors import ImportRefused, TlsRefused
from .handshake import OP_TIMEOUT, connect, import_offering_resume
from .identity import DeviceSpec, Found
from .relay import CONNECT_TIMEOUT, Relay


@dataclass(frozen=True)
class Attached:
    port: int
    host: str
    tcp_port: int
    device: DeviceInfo
    tls: TlsSession | None = None
    #: With ``watch``: a duplicate of the socket vhci-hcd now owns, never read or
    #: written, only polled: it reports POLLHUP/POLLERR the moment the kernel's
    #: side of the connection fails (vhci_shutdown_connection shuts it down).
    watch: socket.socket | None = field(default=None, compare=False)
    #: A resumable attachment: vhci-hcd holds one end of a socketpair, and this
    #: relay the other and the connection to the server (run it: see
    #: :mod:`usbipy.client.relay`).
    relay: Relay | None = field(default=None, compare=False)


def dial(host: str, tcp_port: int, context: ssl.SSLContext | None, server_name: str | None,
         keepalive: Keepalive, timeout: float = OP_TIMEOUT
         ) -> tuple[socket.socket, TlsSession | None]:
    """A connection to the server, with keepalive, and over TLS (kernel TLS) with
    ``context``; ``timeout`` bounds the connect and the handshake."""
    sock = connect(host, tcp_port, timeout)
    try:
        keepalive.apply(sock)
        if context is None:
            return sock, None
        try:
            return ktls.client_handshake(sock, context, server_name or host, timeout)
        except TlsError as exc:
            raise TlsRefused(host, tcp_port, str(exc)) from exc
    except BaseException:
        sock.close()
        raise


def attach(host: str, busid: str, tcp_port: int, *, tls: TlsFiles | None = None,
           server_name: str | None = None, keepalive: Keepalive = DEFAULT,
           watch: bool = False, resume: bool = False,
           before_hand_off: Callable[[], None] | None = None) -> Attached:
    """`usbip attach -r HOST -b BUSID`: import over TCP, then hand the socket to vhci-hcd.

    With ``tls``, over mutual TLS carried by kernel TLS; the server's
    certificate must name ``server_name`` (default: ``host``). ``keepalive``
    is set on the socket before vhci-hcd takes it, so that the kernel gives up
    on a server that stopped answering (the C tool sets none).
    ``before_hand_off`` is called once the import succeeded, right before
    vhci-hcd takes the socket (a keeper stops being interruptible there).

    With ``resume``, the import offers a resumable stream; a server that grants
    it (usbipyd) gets a relay in between (``Attached.relay``, for the caller to
    run), one that does not (usbipd) the socket itself, as without.
    """
    vhci.require_vhci()  # fail before the server marks the device as imported
    session = None
    context = None
    if tls is not None:
        context = client_context(tls, kernel=True)
        ktls.prepare()  # kTLS missing: say so before dialing; and warm it up
    sock, session = dial(host, tcp_port, context, server_name, keepalive)
    watcher = None
    relay = None
    grant = None
    try:
        device, grant = import_offering_resume(sock, busid, plaintext=session is None,
                                               resume=resume)
        if before_hand_off is not None:
            before_hand_off()
        handed = sock
        if grant is not None:
            # vhci-hcd takes any stream socket (attach_store checks only its type)
            handed, ours = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
            relay = Relay(ours, sock, grant,
                          lambda: dial(host, tcp_port, context, server_name, keepalive,
                                       CONNECT_TIMEOUT)[0],
                          what=f"{host}:{tcp_port}/{busid}")
        if watch and relay is None:
            watcher = sock.dup()
        try:
            port = vhci.attach_socket(handed, device)
        finally:
            if handed is not sock:
                handed.close()
    except BaseException:
        if watcher is not None:
            watcher.close()
        if relay is not None:
            relay.finish()  # (FIN: the server releases the device now, not after its window)
        elif grant is not None:
            with contextlib.suppress(OSError):
                sock.sendall(ResumableStream().fin())
        sock.close()
        raise
    if relay is None:
        sock.close()  # vhci-hcd holds its own reference now
    try:
        vhci.write_record(port, vhci.Record(host, str(tcp_port), busid), session,
                          device.devid)
    except OSError:
        # Not attached half: a port with no record would look detached by someone
        # to a keeper, and no process would own it.
        if watcher is not None:
            watcher.close()
        if relay is not None:
            relay.finish()
        try:
            vhci.detach(port)
        except vhci.VhciError:
            pass
        raise
    return Attached(port, host, tcp_port, device, session, watcher, relay)


def attach_device(servers: Sequence[tuple[str, int]], spec: DeviceSpec, *, first: bool = False,
                  tls: TlsFiles | None = None, server_name: str | None = None,
                  keepalive: Keepalive = DEFAULT, watch: bool = False, resume: bool = False,
                  before_hand_off: Callable[[], None] | None = None,
                  on_found: Callable[[Found], None] | None = None) -> Attached:
    """`usbipy attach --device VID:PID[:SERIAL]`: the device found on the first of
    ``servers`` that offers it (:func:`usbipy.client.identity.find`), attached as
    :func:`attach` does. ``on_found`` is told where it was found."""
    context = client_context(tls) if tls is not None else None
    list_devices, read_serial = identity.sync_functions(context, server_name, OP_TIMEOUT)
    found = identity.find(servers, spec, first=first, list_devices=list_devices,
                          read_serial=read_serial)
    if on_found is not None:
        on_found(found)
    deadline = time.monotonic() + (identity.BUSY_AFTER_PROBE if spec.serial is not None else 0.0)
    while True:
        try:
            return attach(found.host, found.busid, found.port, tls=tls,
                          server_name=server_name, keepalive=keepalive, watch=watch,
                          resume=resume, before_hand_off=before_hand_off)
        except ImportRefused as exc:
            # (usbipd says NA where usbipyd says DEV_BUSY: usbip_export_device)
            if exc.status not in identity.BUSY or time.monotonic() >= deadline:
                raise
            time.sleep(0.2)
