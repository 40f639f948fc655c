"""Accepting TLS clients: the handshake, before a connection reaches its protocol.

Two ways to serve a TLS session, chosen when the server starts:

* kernel TLS (the host has it): OpenSSL does the handshake on the socket
  itself and installs the keys in the kernel; the protocol then reads and
  writes plain USB/IP on that socket, and a device served by usbip-host can
  be handed the very same socket.
* userspace TLS: asyncio's TLS transport, records encrypted in this process.

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
from collections.abc import Callable
from dataclasses import dataclass

from ..tls import TlsSession, handshake_failure
from ..tls.ktls import take_plain

log = logging.getLogger("usbipy.server")

#: Seconds a client has to finish its TLS handshake.
HANDSHAKE_TIMEOUT = 20.0


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


def _peer(addr: object) -> str:
    if isinstance(addr, tuple) and len(addr) >= 2:
        host = str(addr[0])
        return f"[{host}]:{addr[1]}" if ":" in host else f"{host}:{addr[1]}"
    return str(addr)


async def serve_tls_client(sock: socket.socket, addr: object, tls: ServerTls,
                           protocol: Callable[[TlsSession | None], asyncio.Protocol]) -> None:
    """Handshake with one accepted client, then give it a protocol; ``sock`` is taken."""
    loop = asyncio.get_running_loop()
    try:
        async with asyncio.timeout(tls.handshake_timeout):
            if not tls.kernel:
                # the protocol reads the session from the transport's ssl_object
                await loop.connect_accepted_socket(
                    lambda: protocol(None), sock, ssl=tls.context,
                    ssl_handshake_timeout=tls.handshake_timeout + 5)
                return
            plain, session = await kernel_handshake(sock, tls.context)
    except Exception as exc:  # noqa: BLE001 (every failure is this client's alone)
        sock.close()
        why = handshake_failure(exc)
        if isinstance(exc, ConnectionAbortedError) and "taking longer" in str(exc):
            why = handshake_failure(TimeoutError())
        log.warning("%s: TLS handshake refused: %s", _peer(addr), why)
        return
    except BaseException:
        sock.close()
        raise
    try:
        await loop.connect_accepted_socket(lambda: protocol(session), plain)
    except BaseException:
        plain.close()
        raise
