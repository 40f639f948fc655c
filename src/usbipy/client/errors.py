"""Errors of the USB/IP clients.

::

    UsbipError                  (usbipy.errors)
     └── ClientError            a request to a server failed
          ├── HostUnreachable   no TCP connection to the server
          ├── ImportRefused     the server answered OP_REP_IMPORT with an error status
          ├── TlsRefused        no TLS session: a certificate, a name, or no TLS there
          ├── ServerGone        an imported device's connection was lost
          ├── TransferTimeout   a transfer did not complete in time (it was unlinked)
          └── UrbError          a URB completed with a non-zero status (-errno)
               ├── Stalled      -EPIPE: the endpoint stalled (a refused request)
               ├── Cancelled    -ENOENT, -ECONNRESET: the URB was unlinked
               ├── Overflow     -EOVERFLOW: the device sent more than asked (babble)
               └── DeviceGone   -ENODEV, -ESHUTDOWN: no such device or endpoint now

A URB error carries ``errno``, Linux's positive errno (the wire's numbers on
every OS: 32 for EPIPE), and ``errno_name``. Every error pickles (across
processes) and copies.
"""

from __future__ import annotations

import errno as _errno
import os
import ssl
from typing import Any

from ..errors import UsbipError
from ..escape import printable
from ..protocol import USBIP_PORT, OpStatus, RetSubmit
from ..protocol.constants import LINUX_ERRNO, LINUX_ERRNO_NAME


def _rebuild(cls: type[ClientError], message: str, state: dict[str, Any]) -> ClientError:
    error = cls.__new__(cls)
    Exception.__init__(error, message)
    error.__dict__.update(state)
    return error


class ClientError(UsbipError):
    """A USB/IP request failed."""

    def __reduce__(self) -> tuple[Any, ...]:
        # (subclasses take other arguments than the message: rebuilt from their state)
        return _rebuild, (type(self), str(self), dict(self.__dict__))


class HostUnreachable(ClientError):
    """The server could not be reached; ``reason``: the error of the connect, or words."""

    def __init__(self, host: str, port: int, reason: str | OSError) -> None:
        where = f"[{printable(host)}]:{port}" if ":" in host else f"{printable(host)}:{port}"
        if isinstance(reason, ConnectionRefusedError):
            doctor = where if port != USBIP_PORT else printable(host)
            text = (f"connection refused: nothing listens on {where} (is usbipyd running? "
                    f"see usbipy doctor -r {doctor})")
        else:
            if isinstance(reason, TimeoutError):
                reason = "connection timed out"
            elif isinstance(reason, OSError):
                # (asyncio's errors carry "Connect call failed (...)" as their strerror;
                # a name that does not resolve has a negative EAI_* errno, and its own)
                strerror = reason.strerror or str(reason)
                if strerror.startswith("Connect call failed") and reason.errno:
                    strerror = os.strerror(reason.errno)
                reason = strerror
            text = (f"cannot connect to {where}: {reason} (is usbipd or usbipyd running "
                    f"there, and port {port} open?)")
        super().__init__(text)
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


#: A connection that ends within this many seconds of its import was likely ended
#: by the server's decision about this client (its access policy), not by chance.
EARLY_CLOSE = 2.0

#: What a client is told of a server that closed its connection at once.
POLICY_HINT = ("right after the handshake or the import: its access policy may refuse "
               "this identity (its log says why)")


def lost_reason(exc: BaseException | None, *, early: bool = False) -> str:
    """Why a connection ended, in words: ``exc`` as connection_lost got it; ``early``:
    within :data:`EARLY_CLOSE` of the import (a close or reset then names the likely
    cause)."""
    if isinstance(exc, TimeoutError) or getattr(exc, "errno", None) == 110:
        return ("the server stopped answering (no reply within the dead-peer timeout: it "
                "or the network is gone)")
    if exc is None or isinstance(exc, (ssl.SSLEOFError, ssl.SSLZeroReturnError)):
        # (usbipyd ends a TLS session with its FIN, never close_notify: OpenSSL then
        # says "UNEXPECTED_EOF_WHILE_READING", which is no violation here)
        why = "the server closed the connection"
    elif isinstance(exc, ConnectionResetError):
        why = "the server reset the connection"
    else:
        return getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
    return f"{why} {POLICY_HINT}" if early else why


class TransferTimeout(ClientError, TimeoutError):
    """A transfer was not complete within its timeout; it was unlinked
    (USBIP_CMD_UNLINK), so the device no longer works on it.

    ``completed``: the device had finished it as the unlink came (usbip-host
    then answers with RET_UNLINK alone, and its data is lost); an OUT transfer
    did happen then.
    """

    errno = _errno.ETIMEDOUT

    def __init__(self, what: str, timeout: float, *, completed: bool = False) -> None:
        super().__init__(f"{what} timed out after {timeout:g} s" + (
            " (the device had just completed it: its data is lost)" if completed else ""))
        self.timeout = timeout
        self.completed = completed


class UrbError(ClientError):
    """A URB that completed with a non-zero status: the kernel's negative errno
    (``ret.status``), as usbip-host and usbipyd report it in RET_SUBMIT."""

    def __init__(self, ret: RetSubmit, what: str = "") -> None:
        self.ret = ret
        self.status = ret.status
        #: Linux's positive errno: 32 (EPIPE) for a stall.
        self.errno = -ret.status
        #: Its name ("EPIPE"), or "" for a number Linux does not use.
        self.errno_name = LINUX_ERRNO_NAME.get(self.errno, "")
        host = getattr(_errno, self.errno_name, None) if self.errno_name else None
        name = (f"{self.errno_name}: {os.strerror(host)}" if host is not None else
                self.errno_name or "unknown status")
        super().__init__(f"{what or f'URB {ret.seqnum}'} failed with status {ret.status} "
                         f"({name})")


class Stalled(UrbError):
    """-EPIPE: the endpoint stalled; on endpoint 0, the device refused the request."""


class Cancelled(UrbError):
    """-ENOENT or -ECONNRESET: the URB was unlinked before it completed."""


class Overflow(UrbError):
    """-EOVERFLOW: the device sent more than the transfer's length (babble)."""


class DeviceGone(UrbError):
    """-ENODEV or -ESHUTDOWN: the device (or, before SET_CONFIGURATION, the
    endpoint) is not there: unplugged, or the server let it go."""


_BY_ERRNO: dict[int, type[UrbError]] = {
    LINUX_ERRNO["EPIPE"]: Stalled,
    LINUX_ERRNO["ENOENT"]: Cancelled,
    LINUX_ERRNO["ECONNRESET"]: Cancelled,
    LINUX_ERRNO["EOVERFLOW"]: Overflow,
    LINUX_ERRNO["ENODEV"]: DeviceGone,
    LINUX_ERRNO["ESHUTDOWN"]: DeviceGone,
}


def urb_error(ret: RetSubmit, what: str = "") -> UrbError:
    """The exception for a RET_SUBMIT with a non-zero status, by its errno."""
    return _BY_ERRNO.get(-ret.status, UrbError)(ret, what)
