"""Errors of the USB/IP clients.

::

    UsbipError                  (usbipy.errors)
     └── ClientError            a request to a server failed
          ├── HostUnreachable   no TCP connection to the server
          ├── ImportRefused     the server answered OP_REP_IMPORT with an error status
          ├── TlsRefused        no TLS session: a certificate, a name, or no TLS there
          ├── ServerGone        an imported device's connection was lost
          └── UrbError          a URB completed with a non-zero status
"""

from __future__ import annotations

from ..errors import UsbipError
from ..escape import printable
from ..protocol import OpStatus, RetSubmit


class ClientError(UsbipError):
    """A USB/IP request failed."""


class HostUnreachable(ClientError):
    def __init__(self, host: str, port: int, reason: str) -> None:
        super().__init__(f"cannot connect to {printable(host)}:{port}: {reason} (is usbipd or "
                         f"usbipyd running there, and port {port} open?)")
        self.host = host
        self.port = port


#: Why a server may close a plaintext connection at once.
PLAINTEXT_REFUSED = ("the server closed the connection before it answered (a server that "
                     "requires TLS does this to a plaintext client: use --tls-cert, --tls-key "
                     "and --tls-ca)")


class ImportRefused(ClientError):
    def __init__(self, busid: str, status: OpStatus) -> None:
        explain = {
            OpStatus.DEV_BUSY: "the device is already imported by another client",
            OpStatus.NODEV: "no such device",
            OpStatus.NA: "the device is not available",
            OpStatus.DEV_ERR: "the device is in an error state",
        }.get(status, "the server refused the import")
        super().__init__(f"import of {printable(busid)} refused: {explain} ({status.name})")
        self.busid = busid
        self.status = status


class TlsRefused(ClientError):
    """The TLS handshake with the server failed; the message says why."""

    def __init__(self, host: str, port: int, reason: str) -> None:
        super().__init__(f"TLS with {printable(host)}:{port} failed: {reason}")
        self.host = host
        self.port = port
        self.reason = reason


class ServerGone(ClientError):
    """The connection of an imported device was lost: the server closed it, reset
    it, or stopped answering for the dead-peer timeout. URBs in flight then
    have no outcome: whether the device did them is unknown."""

    def __init__(self, host: str, port: int, reason: str) -> None:
        super().__init__(f"the connection to {printable(host)}:{port} was lost: {reason}")
        self.host = host
        self.port = port
        self.reason = reason


def lost_reason(exc: BaseException | None) -> str:
    """Why a connection ended, in words: ``exc`` as connection_lost got it."""
    if exc is None:
        return "the server closed it"
    if isinstance(exc, TimeoutError) or getattr(exc, "errno", None) == 110:
        return ("the server stopped answering (no reply within the dead-peer timeout: it "
                "or the network is gone)")
    if isinstance(exc, ConnectionResetError):
        return "the server reset it"
    text = getattr(exc, "strerror", None) or str(exc)
    return text or type(exc).__name__


class UrbError(ClientError):
    def __init__(self, ret: RetSubmit) -> None:
        super().__init__(f"URB {ret.seqnum} failed with status {ret.status}")
        self.ret = ret
