"""The OP phase over a blocking socket: what `usbip attach` does before vhci-hcd.

The codec is the same sans-IO :class:`ClientConnection` the asyncio client uses;
only the I/O differs. After a successful import the socket carries URBs, and
whoever gets it (vhci-hcd) must be handed it untouched: nothing past
OP_REP_IMPORT is read here, because the server sends nothing more until a URB.
"""

from __future__ import annotations

import socket
import ssl
from collections.abc import Callable

from ..escape import printable
from ..protocol import (
    EOF,
    NEED_DATA,
    ClientConnection,
    DeviceInfo,
    OpRepDevlist,
    OpRepImport,
    OpReqDevlist,
    OpReqImport,
    OpStatus,
    RemoteProtocolError,
    wire,
)
from ..protocol.messages import OpRepResume, OpReqResume, ResumeGrant
from ..tls.errors import handshake_failure
from .errors import PLAINTEXT_REFUSED, ClientError, HostUnreachable, ImportRefused

#: Seconds to wait for the server to connect and to answer an OP request.
OP_TIMEOUT = 30.0


def connect(host: str, port: int, timeout: float = OP_TIMEOUT) -> socket.socket:
    try:
        sock = socket.create_connection((host, port), timeout=timeout)
    except OSError as exc:
        raise HostUnreachable(host, port, exc) from exc
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def _exchange(sock: socket.socket, conn: ClientConnection, request: bytes,
              plaintext: bool) -> OpRepDevlist | OpRepImport | OpRepResume:
    # Small reads: an OP reply is short, and no byte after it may be taken.
    return exchange(conn, request, sock.sendall, lambda: sock.recv(_recv_size(conn)),
                    plaintext)


def exchange(conn: ClientConnection, request: bytes, send: Callable[[bytes], object],
             recv: Callable[[], bytes], plaintext: bool
             ) -> OpRepDevlist | OpRepImport | OpRepResume:
    """One OP request and its reply, whatever carries them (a socket, a TLS channel):
    ClientError saying what went wrong."""
    try:
        send(request)
        while True:
            try:
                event = conn.next_event()
            except RemoteProtocolError as exc:
                raise ClientError(f"the server sent a malformed reply: {exc}") from exc
            if isinstance(event, (OpRepDevlist, OpRepImport, OpRepResume)):
                return event
            if event is EOF:
                raise ClientError(PLAINTEXT_REFUSED if plaintext else
                                  "the server closed the connection without a reply")
            assert event is NEED_DATA
            conn.receive_data(recv())
    except TimeoutError as exc:
        raise ClientError("the server did not answer in time") from exc
    except (ssl.SSLEOFError, ssl.SSLZeroReturnError) as exc:
        # (TLS 1.3: the handshake is done on our side before the server has judged
        # our certificate; it refuses by closing)
        raise ClientError("the server closed the connection before it answered: it may "
                          "not accept our certificate, or its access policy may refuse this "
                          "identity (its log says why)") from exc
    except ssl.SSLError as exc:
        raise ClientError(f"connection closed: {handshake_failure(exc)}") from exc
    except OSError as exc:
        raise ClientError(f"connection failed: {exc.strerror or exc}") from exc


def _recv_size(conn: ClientConnection) -> int:
    # Never read beyond the end of OP_REP_IMPORT: what follows it is the kernel's
    # (a socket handed to vhci-hcd) or the URB phase's.
    if conn.buffered < wire.OP_REP_IMPORT_OK_SIZE:
        return max(1, wire.OP_REP_IMPORT_OK_SIZE - conn.buffered)
    return 4096


def request_import(sock: socket.socket, busid: str, *, plaintext: bool = True) -> DeviceInfo:
    """OP_REQ_IMPORT on a connected socket; ImportRefused unless the server says OK.

    ``plaintext``: whether the connection is (then an immediate close is
    explained as a server that requires TLS).
    """
    return import_offering_resume(sock, busid, plaintext=plaintext, resume=False)[0]


def can_offer_resume(busid: str) -> bool:
    """Whether the busid leaves room in its field for the offer (up to 23 bytes)."""
    return len(busid.encode()) < wire.RESUME_OFFER_AT


def import_offering_resume(sock: socket.socket, busid: str, *, plaintext: bool = True,
                           resume: bool = True, conn: ClientConnection | None = None
                           ) -> tuple[DeviceInfo, ResumeGrant | None]:
    """OP_REQ_IMPORT, offering a resumable stream (:mod:`usbipy.protocol.resume`);
    the device and the server's grant, None from a server that does not resume
    (usbipd, usbipd-win: the offer is invisible to them, and the connection is
    plain USB/IP as ever). ``conn``: the codec that goes on with the URBs."""
    conn = conn if conn is not None else ClientConnection()
    offer = resume and can_offer_resume(busid)
    reply = _exchange(sock, conn, conn.send(OpReqImport(busid, offer)), plaintext)
    assert isinstance(reply, OpRepImport)
    if reply.status is not OpStatus.OK or reply.device is None:
        raise ImportRefused(busid, reply.status)
    if reply.device.busid != busid:
        raise ClientError(f"asked for {printable(busid)}, the server sent "
                          f"{printable(reply.device.busid)}")
    return reply.device, reply.resume if offer else None


class ResumeRefused(ClientError):
    """The server no longer has the attachment (restarted, the window passed, or not
    ours): attach again."""


def request_resume(sock: socket.socket, token: bytes, received: int) -> int:
    """OP_REQ_RESUME on a new connection: the bytes of our stream the server has.
    Nothing past the reply is read: the frames that follow are the relay's."""
    conn = ClientConnection()
    size = wire.OP_REP_RESUME.size

    def recv() -> bytes:
        return sock.recv(max(1, size - conn.buffered))

    reply = exchange(conn, conn.send(OpReqResume(token, received)), sock.sendall, recv, False)
    assert isinstance(reply, OpRepResume)
    if reply.status is not OpStatus.OK:
        raise ResumeRefused(f"the server refused to resume ({reply.status.name}): it no "
                            "longer has the attachment")
    return reply.received


def request_devlist(sock: socket.socket) -> tuple[DeviceInfo, ...]:
    conn = ClientConnection()
    reply = _exchange(sock, conn, conn.send(OpReqDevlist()), True)
    assert isinstance(reply, OpRepDevlist)
    return reply.devices
