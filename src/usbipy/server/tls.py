"""Accepting TLS clients: the handshake, before a connection reaches its protocol.

Two ways to serve a TLS session, chosen when the server starts:

* kernel TLS (the host has it): OpenSSL does the handshake on the socket
  itself and installs the keys in the kernel; the protocol then reads and
  writes plain USB/IP on that socket, and a device served by usbip-host can
  be handed the very same socket.
* userspace TLS: a sans-IO TLS layer (:mod:`usbipy.tls.layer`) under the
  protocol, records encrypted in this process.

Every handshake runs on the event loop (no thread per client, so a client
that stalls mid-handshake holds nothing but its own socket) and has a time
limit. A refused handshake is logged with the reason, and only that
connection closes.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
import weakref
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, cast

from ..escape import printable
from ..tls import TlsSession, handshake_failure
from ..tls.ktls import take_plain
from ..tls.layer import TlsLayer
from .limits import client_key

log = logging.getLogger("usbipy.server")

#: A TLS record's most plaintext.
_RECORD_SIZE = 1 << 14

#: Seconds a client has to finish its TLS handshake.
HANDSHAKE_TIMEOUT = 20.0

#: Where a refused handshake is told: (kind, line). The server passes one that
#: writes a kind at most once per 10 s, so a flood of broken handshakes is a line
#: per address, not a line per connection.
Warn = Callable[[str, str], None]


def _log_warning(kind: str, text: str) -> None:
    log.warning("%s", text)


def _refused(warn: Warn, addr: object, why: str) -> None:
    # (one kind per client as the limits count it: an IPv6 host by its /64)
    warn(f"handshake refused {client_key(addr)}",
         f"{printable(address_text(addr))}: TLS handshake refused: {why}")


@dataclass(frozen=True)
class ServerTls:
    """How a listener's clients are authenticated and their records encrypted."""

    context: ssl.SSLContext
    #: Sessions handed to kernel TLS (needed to export through usbip-host).
    kernel: bool
    handshake_timeout: float = HANDSHAKE_TIMEOUT


async def _wait(loop: asyncio.AbstractEventLoop, fd: int, write: bool) -> None:
    waiter = loop.create_future()
    add, remove = (loop.add_writer, loop.remove_writer) if write else (
        loop.add_reader, loop.remove_reader)

    def ready() -> None:
        if not waiter.done():
            waiter.set_result(None)

    add(fd, ready)
    try:
        await waiter
    finally:
        remove(fd)


async def kernel_handshake(sock: socket.socket, context: ssl.SSLContext
                           ) -> tuple[socket.socket, TlsSession]:
    """A server handshake that leaves the session in kernel TLS; ``sock`` is taken.

    Driven without blocking: OpenSSL reads and writes the non-blocking
    socket, and the loop says when it may go on. Returns the bare socket.
    """
    loop = asyncio.get_running_loop()
    sock.setblocking(False)
    try:
        tls = context.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
    except BaseException:
        sock.close()
        raise
    try:
        while True:
            try:
                tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                await _wait(loop, tls.fileno(), write=False)
            except ssl.SSLWantWriteError:
                await _wait(loop, tls.fileno(), write=True)
        session = TlsSession.of(tls, kernel=True)
    except BaseException:
        tls.close()
        raise
    plain = take_plain(tls)
    plain.setblocking(False)
    return plain, session


def address_text(addr: object) -> str:
    """A socket address as "host:port", "[v6]:port" for IPv6."""
    if isinstance(addr, tuple) and len(addr) >= 2:
        host = str(addr[0])
        return f"[{host}]:{addr[1]}" if ":" in host else f"{host}:{addr[1]}"
    return str(addr)


class _TlsTransport(asyncio.Transport):
    """What the USB/IP protocol writes to: plaintext in, records out to the socket."""

    def __init__(self, raw: asyncio.Transport, layer: TlsLayer,
                 owner: TlsServerProtocol) -> None:
        super().__init__()
        self._raw = raw
        self._layer = layer
        # (weak: the owner holds the protocol, which holds this; a cycle would keep a
        # connection's buffers until the cycle collector ran, not until it ended)
        self._owner = weakref.ref(owner)

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        """What the plaintext goes to from now on (a resumable attachment takes a
        resumed connection over)."""
        owner = self._owner()
        if owner is not None:
            owner._inner = cast(asyncio.Protocol, protocol)

    def get_protocol(self) -> asyncio.BaseProtocol:
        owner = self._owner()
        assert owner is not None and owner._inner is not None
        return owner._inner

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self._raw.is_closing():
            return  # (as asyncio's transports: what is written after close is dropped)
        records = self._layer.send(data)
        if records:
            self._raw.write(records)

    def writelines(self, list_of_data: Iterable[bytes | bytearray | memoryview]) -> None:
        # Small pieces (headers, short replies) are joined into one record rather
        # than a record each; a large one goes in as it is, not copied into a join.
        if self._raw.is_closing():
            return
        layer = self._layer
        small: list[bytes | bytearray | memoryview] = []
        gathered = 0
        for piece in list_of_data:
            if len(piece) >= _RECORD_SIZE:
                if small:
                    layer.encrypt(b"".join(small))
                    small, gathered = [], 0
                layer.encrypt(piece)
                continue
            small.append(piece)
            gathered += len(piece)
            if gathered >= _RECORD_SIZE:  # (a join no bigger than about a record)
                layer.encrypt(b"".join(small))
                small, gathered = [], 0
        records = layer.send(b"".join(small))
        if records:
            self._raw.write(records)

    def pause_reading(self) -> None:
        self._raw.pause_reading()

    def resume_reading(self) -> None:
        self._raw.resume_reading()

    def is_reading(self) -> bool:
        return self._raw.is_reading()

    def close(self) -> None:
        # No close_notify: a peer whose socket the kernel owns (vhci-hcd over kTLS)
        # fails on any record that is not data; the FIN says as much.
        self._raw.close()

    def abort(self) -> None:
        self._raw.abort()

    def is_closing(self) -> bool:
        return self._raw.is_closing()

    def get_write_buffer_size(self) -> int:
        return self._raw.get_write_buffer_size()

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None
                                ) -> None:
        self._raw.set_write_buffer_limits(high, low)

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        if name == "ssl_object":
            return self._layer.ssl_object
        return self._raw.get_extra_info(name, default)


class TlsServerProtocol(asyncio.Protocol):
    """A TLS server session in userspace, around the protocol it carries.

    The handshake is fed from data_received (nothing blocks), with a time
    limit; once it is done, ``inner`` is made and sees plaintext only, over a
    transport that encrypts what it writes.
    """

    def __init__(self, tls: ServerTls, inner: Callable[[], asyncio.Protocol],
                 warn: Warn = _log_warning) -> None:
        self._tls = tls
        self._warn = warn
        self._make_inner = inner
        self._layer = TlsLayer(tls.context, server_side=True)
        self._raw: asyncio.Transport | None = None
        self._inner: asyncio.Protocol | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._peer = "?"
        self._addr: object = None
        #: Resolved when the handshake is over, whichever way it went.
        self.settled: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._raw = cast(asyncio.Transport, transport)
        self._addr = transport.get_extra_info("peername")
        self._peer = address_text(self._addr)
        self._timer = asyncio.get_running_loop().call_later(
            self._tls.handshake_timeout, self._refuse, TimeoutError())

    def data_received(self, data: bytes) -> None:
        layer = self._layer
        try:
            plain = layer.receive(data)
        except (ssl.SSLError, ValueError) as exc:
            if self._inner is None:
                self._refuse(exc)
            else:  # a broken record in the session: this client's connection ends
                log.warning("%s: closing the connection: %s", self._peer,
                            printable(str(getattr(exc, "reason", None) or exc)))
                assert self._raw is not None
                self._raw.abort()
            return
        if self._inner is None:
            out = layer.outgoing()
            if out:
                assert self._raw is not None
                self._raw.write(out)
            if not layer.established:
                return
            self._established()
        if plain and self._inner is not None:
            self._inner.data_received(plain)
        if layer.closed_by_peer and self._raw is not None:
            self._raw.close()

    def _settle(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        if not self.settled.done():
            self.settled.set_result(None)

    def _established(self) -> None:
        assert self._raw is not None
        self._settle()
        self._inner = self._make_inner()
        self._inner.connection_made(_TlsTransport(self._raw, self._layer, self))

    def _refuse(self, exc: BaseException) -> None:
        if self._inner is not None or self._raw is None or self._raw.is_closing():
            return
        _refused(self._warn, self._addr, handshake_failure(exc))
        self._settle()  # (told once: connection_lost has nothing more to say)
        out = self._layer.outgoing()  # the alert that tells the client why, if any
        if out:
            self._raw.write(out)
            self._raw.close()
        else:  # (nothing to say: a peer that never reads cannot hold the slot)
            self._raw.abort()

    def eof_received(self) -> bool | None:
        if self._inner is not None:
            return self._inner.eof_received()
        self._refuse(ssl.SSLEOFError())
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        if self._inner is None and exc is not None and not self.settled.done():
            _refused(self._warn, self._addr, handshake_failure(exc))
        self._settle()
        if self._inner is not None:
            self._inner.connection_lost(exc)

    def pause_writing(self) -> None:
        if self._inner is not None:
            self._inner.pause_writing()

    def resume_writing(self) -> None:
        if self._inner is not None:
            self._inner.resume_writing()


async def serve_tls_client(sock: socket.socket, addr: object, tls: ServerTls,
                           protocol: Callable[[TlsSession | None], asyncio.Protocol],
                           warn: Warn = _log_warning) -> None:
    """Handshake with one accepted client, then give it a protocol; ``sock`` is taken."""
    loop = asyncio.get_running_loop()
    if not tls.kernel:
        try:
            transport, handshake = await loop.connect_accepted_socket(
                lambda: TlsServerProtocol(tls, lambda: protocol(None), warn), sock)
        except BaseException:
            sock.close()
            raise
        try:
            await handshake.settled  # (the caller counts this handshake until then)
        except BaseException:
            transport.abort()
            raise
        return
    try:
        async with asyncio.timeout(tls.handshake_timeout):
            plain, session = await kernel_handshake(sock, tls.context)
    except Exception as exc:  # noqa: BLE001 (every failure is this client's alone)
        sock.close()
        why = handshake_failure(exc)
        if isinstance(exc, ConnectionAbortedError) and "taking longer" in str(exc):
            why = handshake_failure(TimeoutError())
        _refused(warn, addr, why)
        return
    except BaseException:
        sock.close()
        raise
    try:
        await loop.connect_accepted_socket(lambda: protocol(session), plain)
    except BaseException:
        plain.close()
        raise
