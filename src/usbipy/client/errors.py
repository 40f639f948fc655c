"""Errors of the USB/IP clients.

::

    UsbipError                  (usbipy.errors)
     └── ClientError            a request to a server failed
          ├── HostUnreachable   no TCP connection to the server
          ├── ImportRefused     the server answered OP_REP_IMPORT with an error status
          ├── TlsRefused        no TLS session: a certificate, a name, or no TLS there
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


class UrbError(ClientError):
    def __init__(self, ret: RetSubmit) -> None:
        super().__init__(f"URB {ret.seqnum} failed with status {ret.status}")
        self.ret = ret
