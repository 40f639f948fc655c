"""`usbip attach`: import a remote device over TCP, then hand the socket to vhci-hcd.

Over TLS, the handshake is done here and the session keys go to the kernel
(kTLS) before the import: vhci-hcd then reads and writes an encrypted
connection with no process in between (see :mod:`usbipy.tls.ktls`).
"""

from __future__ import annotations

from dataclasses import dataclass

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


def attach(host: str, busid: str, tcp_port: int, *, tls: TlsFiles | None = None,
           server_name: str | None = None) -> Attached:
    """`usbip attach -r HOST -b BUSID`: import over TCP, then hand the socket to vhci-hcd.

    With ``tls``, over mutual TLS carried by kernel TLS; the server's
    certificate must name ``server_name`` (default: ``host``).
    """
    vhci.require_vhci()  # fail before the server marks the device as imported
    session = None
    context = None
    if tls is not None:
        context = client_context(tls, kernel=True)
        ktls.prepare()  # kTLS missing: say so before dialing; and warm it up
    sock = connect(host, tcp_port)
    try:
        if context is not None:
            try:
                sock, session = ktls.client_handshake(sock, context, server_name or host,
                                                      OP_TIMEOUT)
            except TlsError as exc:
                raise TlsRefused(host, tcp_port, str(exc)) from exc
        device = request_import(sock, busid, plaintext=session is None)
        port = vhci.attach_socket(sock, device)
    finally:
        sock.close()  # vhci-hcd holds its own reference now
    vhci.write_record(port, vhci.Record(host, str(tcp_port), busid), session, device.devid)
    return Attached(port, host, tcp_port, device, session)
