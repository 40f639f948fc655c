"""`usbip attach`: import a remote device over TCP, then hand the socket to vhci-hcd.

Over TLS, the handshake is done here and the session keys go to the kernel
(kTLS) before the import: vhci-hcd then reads and writes an encrypted
connection with no process in between (see :mod:`usbipy.tls.ktls`).
"""

from __future__ import annotations

import socket
from collections.abc import Callable
from dataclasses import dataclass, field

from ..keepalive import DEFAULT, Keepalive
from ..linux import vhci
from ..protocol import DeviceInfo
from ..tls import TlsError, TlsFiles, TlsSession, client_context, ktls
from .errors import TlsRefused
from .handshake import OP_TIMEOUT, connect, request_import


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


def attach(host: str, busid: str, tcp_port: int, *, tls: TlsFiles | None = None,
           server_name: str | None = None, keepalive: Keepalive = DEFAULT,
           watch: bool = False,
           before_hand_off: Callable[[], None] | None = None) -> Attached:
    """`usbip attach -r HOST -b BUSID`: import over TCP, then hand the socket to vhci-hcd.

    With ``tls``, over mutual TLS carried by kernel TLS; the server's
    certificate must name ``server_name`` (default: ``host``). ``keepalive``
    is set on the socket before vhci-hcd takes it, so that the kernel gives up
    on a server that stopped answering (the C tool sets none).
    ``before_hand_off`` is called once the import succeeded, right before
    vhci-hcd takes the socket (a keeper stops being interruptible there).
    """
    vhci.require_vhci()  # fail before the server marks the device as imported
    session = None
    context = None
    if tls is not None:
        context = client_context(tls, kernel=True)
        ktls.prepare()  # kTLS missing: say so before dialing; and warm it up
    sock = connect(host, tcp_port)
    watcher = None
    try:
        keepalive.apply(sock)
        if context is not None:
            try:
                sock, session = ktls.client_handshake(sock, context, server_name or host,
                                                      OP_TIMEOUT)
            except TlsError as exc:
                raise TlsRefused(host, tcp_port, str(exc)) from exc
        device = request_import(sock, busid, plaintext=session is None)
        if before_hand_off is not None:
            before_hand_off()
        if watch:
            watcher = sock.dup()
        port = vhci.attach_socket(sock, device)
    except BaseException:
        if watcher is not None:
            watcher.close()
        raise
    finally:
        sock.close()  # vhci-hcd holds its own reference now
    try:
        vhci.write_record(port, vhci.Record(host, str(tcp_port), busid), session,
                          device.devid)
    except OSError:
        # Not attached half: a port with no record would look detached by someone
        # to a keeper, and no process would own it.
        if watcher is not None:
            watcher.close()
        try:
            vhci.detach(port)
        except vhci.VhciError:
            pass
        raise
    return Attached(port, host, tcp_port, device, session, watcher)
