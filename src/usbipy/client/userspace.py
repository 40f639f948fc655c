"""A userspace USB/IP client over asyncio: list and import remote devices, transfer.

For hosts with no vhci-hcd (any OS, no root), for tests and for benchmarks::

    devices = await list_devices("127.0.0.1")
    async with connect("127.0.0.1", "1-1") as dev:
        descriptor = await dev.control(0x80, 6, 0x0100, 0, 18, timeout=1)
        report = await dev.interrupt_read(0x81, 8, timeout=5)

Transfers take a ``timeout`` in seconds (None: wait for ever). A transfer that
times out, or whose task is cancelled, is unlinked (USBIP_CMD_UNLINK) so that
the device stops working on it, as the kernel's usb_kill_urb does; a status
from the device raises the :class:`UrbError` subclass for its errno
(:class:`Stalled` for -EPIPE, ...). Many transfers may be in flight at once:
start them as tasks. :mod:`usbipy.client.sync` is the blocking form.

Every connection has TCP keepalive and a user timeout (:mod:`usbipy.keepalive`):
a server that stops answering ends the connection within the dead-peer
timeout, and what waits on it raises :class:`ServerGone`. With
``reconnect=Backoff()``, an imported device connects and imports again after
a loss, with exponential backoff; URBs in flight at the loss still fail
(whether the device did them is unknown), later ones wait for the new
connection.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import logging
import socket
import ssl
import time
from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any, cast

from ..errors import UsbipError
from ..escape import printable
from ..keepalive import DEFAULT, Keepalive
from ..protocol import (
    ClientConnection,
    CmdUnlink,
    DeviceInfo,
    Direction,
    IsoPacket,
    OpRepDevlist,
    OpRepImport,
    OpReqDevlist,
    OpReqImport,
    OpStatus,
    RemoteProtocolError,
    RetSubmit,
    RetUnlink,
)
from ..protocol.constants import USBIP_PORT
from ..tls import TlsSession, handshake_failure
from ..usb.urb import UrbFlag
from . import identity
from .address import parse_address
from .backoff import Backoff
from .errors import (
    EARLY_CLOSE,
    PLAINTEXT_REFUSED,
    ClientError,
    HostUnreachable,
    ImportRefused,
    ServerGone,
    TlsRefused,
    TransferTimeout,
    lost_reason,
)
from .identity import DeviceSpec
from .relay import RelayThread, import_resumable
from .transfers import (
    CONNECT_TIMEOUT,
    IsoResult,
    after_unlink,
    checked,
    control_request,
    describe,
    iso_layout,
    iso_results,
    unlink_grace,
)

#: A reconnecting device's connection that lasted this long starts the next backoff
#: from its first delay.
STABLE = 30.0


log = logging.getLogger("usbipy.client")


class _ClientProtocol(asyncio.Protocol):
    def __init__(self, host: str, port: int) -> None:
        self.host = host
        self.port = port
        #: Set by our own close: the end of the connection is then no loss.
        self.closing = False
        self.conn = ClientConnection()
        self.transport: asyncio.Transport | None = None
        self.op_reply: asyncio.Future[OpRepDevlist | OpRepImport] = (
            asyncio.get_running_loop().create_future()
        )
        self.waiting: dict[int, asyncio.Future[RetSubmit | RetUnlink]] = {}
        self.closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.plaintext = True
        #: Why the connection ended, once it has.
        self.error: ClientError | None = None
        #: Called when an imported device's connection is lost (not closed by us).
        self.on_lost: Callable[[], None] | None = None
        #: When the OP reply came (time.monotonic()).
        self.replied_at = 0.0
        #: The TLS session of a connection a relay holds (this one is a socketpair's).
        self.session: TlsSession | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # (uvloop's transports do not derive from asyncio.Transport)
        self.transport = cast(asyncio.Transport, transport)
        self.plaintext = transport.get_extra_info("ssl_object") is None
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        self.conn.receive_data(data)
        try:
            for event in self.conn.events():
                if isinstance(event, (RetSubmit, RetUnlink)):
                    future = self.waiting.pop(event.seqnum, None)
                    if future is not None and not future.done():
                        future.set_result(event)
                elif isinstance(event, (OpRepDevlist, OpRepImport)):
                    if not self.op_reply.done():
                        self.op_reply.set_result(event)
                        self.replied_at = time.monotonic()
        except RemoteProtocolError as exc:
            self._fail(exc)
            assert self.transport is not None
            self.transport.abort()

    def eof_received(self) -> bool | None:
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        if self.op_reply.done() and not self.closing:
            # an imported device's connection (or a reply's) ended under it
            early = time.monotonic() - self.replied_at < EARLY_CLOSE
            error: ClientError = ServerGone(self.host, self.port,
                                            lost_reason(exc, early=early))
        elif isinstance(exc, ssl.SSLError):
            # TLS 1.3: a server that refuses our certificate says so after the
            # handshake, on the first read.
            error = ClientError(f"connection closed: {handshake_failure(exc)}")
        elif exc is None and not self.op_reply.done() and self.plaintext:
            error = ClientError(PLAINTEXT_REFUSED)
        elif not self.op_reply.done() and not self.plaintext:
            # TLS 1.3 ends the handshake before the server has checked our
            # certificate: its refusal comes as a close, often a reset.
            error = ClientError(
                "the server closed the TLS connection before it answered: it may not "
                f"accept our certificate (its log says why){f' ({exc})' if exc else ''}")
        else:
            error = ClientError(f"connection closed{f': {exc}' if exc else ''}")
        self.error = error
        if self.on_lost is not None and isinstance(error, ServerGone):
            # before anything that waits is woken: what it does next (another URB)
            # must find the reconnect under way
            self.on_lost()
        self._fail(error)
        if not self.closed.done():
            self.closed.set_result(None)

    def _fail(self, exc: Exception) -> None:
        if not self.op_reply.done():
            self.op_reply.set_exception(exc)
        for future in self.waiting.values():
            if not future.done():
                future.set_exception(exc)
        self.waiting.clear()


async def _connect(host: str, port: int, tls: ssl.SSLContext | None,
                   server_hostname: str | None, keepalive: Keepalive = DEFAULT
                   ) -> _ClientProtocol:
    loop = asyncio.get_running_loop()
    log.debug("connecting to %s:%d%s", printable(host), port, " over TLS" if tls else "")
    try:
        async with asyncio.timeout(CONNECT_TIMEOUT):
            sock = await _tcp(loop, host, port)
        try:
            keepalive.apply(sock)
        except OSError:
            sock.close()
            raise
    except OSError as exc:
        raise HostUnreachable(host, port, exc) from exc
    factory = functools.partial(_ClientProtocol, host, port)
    if tls is None:
        _transport, protocol = await loop.create_connection(factory, sock=sock)
        return protocol
    try:
        async with asyncio.timeout(CONNECT_TIMEOUT):
            _transport, protocol = await loop.create_connection(
                factory, sock=sock, ssl=tls, server_hostname=server_hostname or host,
                ssl_handshake_timeout=CONNECT_TIMEOUT + 5)
    except (OSError, TimeoutError) as exc:
        sock.close()
        raise TlsRefused(host, port, handshake_failure(exc)) from exc
    return protocol


async def _tcp(loop: asyncio.AbstractEventLoop, host: str, port: int) -> socket.socket:
    """A connected socket: made first, so a refused TCP connection and a refused
    TLS handshake are told apart."""
    infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    error: OSError = OSError(f"no address for {host}")
    for family, kind, proto, _name, address in infos:
        sock = socket.socket(family, kind, proto)
        sock.setblocking(False)
        try:
            await loop.sock_connect(sock, address)
        except OSError as exc:
            sock.close()
            error = exc
            continue
        except BaseException:  # cancelled (a timeout): not a socket left behind
            sock.close()
            raise
        return sock
    raise error


async def _close(protocol: _ClientProtocol) -> None:
    """Close and wait until the transport is gone (uvloop warns about one that is not)."""
    protocol.closing = True
    if protocol.transport is not None:
        protocol.transport.close()
    try:
        await asyncio.wait_for(asyncio.shield(protocol.closed), 5)
    except TimeoutError:
        pass


async def list_devices(host: str, port: int = USBIP_PORT, *, tls: ssl.SSLContext | None = None,
                       server_hostname: str | None = None,
                       keepalive: Keepalive = DEFAULT) -> tuple[DeviceInfo, ...]:
    """OP_REQ_DEVLIST: the devices ``host`` exports.

    With ``tls`` (see :func:`usbipy.tls.client_context`), over mutual TLS; the
    server's certificate must name ``server_hostname`` (default: ``host``).
    """
    protocol = await _connect(host, port, tls, server_hostname, keepalive)
    try:
        assert protocol.transport is not None
        protocol.transport.write(protocol.conn.send(OpReqDevlist()))
        log.debug("%s:%d: sent OP_REQ_DEVLIST", printable(host), port)
        reply = await protocol.op_reply
        assert isinstance(reply, OpRepDevlist)
        log.debug("%s:%d: OP_REP_DEVLIST with %d devices", printable(host), port,
                  len(reply.devices))
        return reply.devices
    finally:
        await _close(protocol)


async def import_device(host: str, busid: str | None = None, port: int = USBIP_PORT, *,
                        device: str | None = None, first: bool = False,
                        tls: ssl.SSLContext | None = None,
                        server_hostname: str | None = None,
                        keepalive: Keepalive = DEFAULT,
                        reconnect: Backoff | None = None,
                        resume: bool = False) -> RemoteDevice:
    """OP_REQ_IMPORT: hold ``busid`` and get a handle to submit URBs to it.

    Or ``device="VID:PID[:SERIAL]"`` for the device with those ids, at whatever
    busid it has (looked up again at each reconnect: see
    :mod:`usbipy.client.identity`); several that match are an error, unless
    ``first``.

    ``tls``, ``server_hostname`` and ``keepalive`` as for :func:`list_devices`.
    With ``resume``, a lost connection is resumed in place where the server
    offers it (usbipyd): what is in flight waits, and goes on (a relay thread
    stands between, see :mod:`usbipy.client.relay`). With ``reconnect``, a
    connection lost for good is made again (and the device imported again)
    after the delays ``reconnect`` gives, until it succeeds or they run out;
    see :class:`RemoteDevice`.
    """
    if (busid is None) == (device is None):
        raise ValueError("give a busid or device=VID:PID[:SERIAL], one of them")
    spec = DeviceSpec.parse(device) if device is not None else None
    target = _Target(host, busid or "", port, tls, server_hostname, keepalive, resume, spec,
                     first)
    protocol, info, relay = await _import_target(target)
    return RemoteDevice(protocol, info, target=target, reconnect=reconnect, relay=relay)


@dataclass(frozen=True)
class _Target:
    """What a reconnecting device connects to again."""

    host: str
    busid: str
    port: int
    tls: ssl.SSLContext | None
    server_hostname: str | None
    keepalive: Keepalive
    resume: bool = False
    #: By identity: the ids (and serial) found on the device list at each import.
    spec: DeviceSpec | None = None
    first: bool = False


async def _import_target(target: _Target
                         ) -> tuple[_ClientProtocol, DeviceInfo, RelayThread | None]:
    if target.spec is None:
        return await _import_busid(target)
    if target.host == "*":  # (wherever DNS-SD finds it: usbip://*/VID:PID)
        from .fleet import locate

        found = await asyncio.to_thread(locate, target.spec, tls=target.tls,
                                        server_hostname=target.server_hostname,
                                        first=target.first)
    else:
        list_devices, read_serial = identity.sync_functions(
            target.tls, target.server_hostname, CONNECT_TIMEOUT)
        found = await asyncio.to_thread(identity.find, [(target.host, target.port)],
                                        target.spec, first=target.first,
                                        list_devices=list_devices, read_serial=read_serial)
    located = dataclasses.replace(target, host=found.host, port=found.port, busid=found.busid)
    deadline = time.monotonic() + (identity.BUSY_AFTER_PROBE if target.spec.serial else 0.0)
    while True:  # (usbip-host frees a device a moment after the serial was read)
        try:
            return await _import_busid(located)
        except ImportRefused as exc:
            if exc.status not in identity.BUSY or time.monotonic() >= deadline:
                raise
            await asyncio.sleep(0.2)


async def _import_busid(target: _Target
                        ) -> tuple[_ClientProtocol, DeviceInfo, RelayThread | None]:
    if not target.resume:
        protocol, info = await _import(target.host, target.busid, target.port, target.tls,
                                       target.server_hostname, target.keepalive)
        return protocol, info, None
    conn = ClientConnection()
    sock, info, relay, session = await asyncio.to_thread(
        import_resumable, target.host, target.busid, target.port, target.tls,
        target.server_hostname, target.keepalive, CONNECT_TIMEOUT, conn)
    sock.setblocking(False)
    loop = asyncio.get_running_loop()
    try:
        _transport, protocol = await loop.create_connection(
            functools.partial(_ClientProtocol, target.host, target.port), sock=sock)
    except BaseException:
        sock.close()
        if relay is not None:
            await asyncio.to_thread(relay.stop)
        raise
    # the import was answered on the blocking socket: this protocol goes on from there
    protocol.conn = conn
    protocol.session = session
    protocol.op_reply.set_result(OpRepImport(OpStatus.OK, info))
    protocol.replied_at = time.monotonic()
    return protocol, info, relay


async def _import(host: str, busid: str, port: int, tls: ssl.SSLContext | None,
                  server_hostname: str | None, keepalive: Keepalive
                  ) -> tuple[_ClientProtocol, DeviceInfo]:
    protocol = await _connect(host, port, tls, server_hostname, keepalive)
    assert protocol.transport is not None
    protocol.transport.write(protocol.conn.send(OpReqImport(busid)))
    log.debug("%s:%d: sent OP_REQ_IMPORT of %s", printable(host), port, printable(busid))
    try:
        reply = await protocol.op_reply
    except BaseException:
        await _close(protocol)
        raise
    assert isinstance(reply, OpRepImport)
    log.debug("%s:%d: OP_REP_IMPORT %s", printable(host), port, reply.status.name)
    if reply.status != OpStatus.OK or reply.device is None:
        await _close(protocol)
        raise ImportRefused(busid, reply.status)
    return protocol, reply.device


class RemoteDevice:
    """An imported device: submit URBs, unlink them, close.

    When the connection is lost, URBs in flight and later ones raise
    :class:`ServerGone`; with ``reconnect``, later ones wait until the
    device is imported again (:attr:`reconnects` counts the times), and raise
    ServerGone only once the backoff has run out.
    """

    def __init__(self, protocol: _ClientProtocol, info: DeviceInfo, *,
                 target: _Target | None = None, reconnect: Backoff | None = None,
                 relay: RelayThread | None = None) -> None:
        self.info = info
        #: The relay of a resumable connection (import_device(resume=True)).
        self._relay = relay
        self._target = target
        self._backoff = reconnect
        self._closing = False
        #: Set while a connection is up (or once there is no hope of one).
        self._connected = asyncio.Event()
        self._reconnecting: asyncio.Task[None] | None = None
        #: Times the device was imported again after a loss.
        self.reconnects = 0
        self._since = 0.0
        self._use(protocol)

    def _use(self, protocol: _ClientProtocol) -> None:
        self._protocol = protocol
        ssl_object = protocol.transport.get_extra_info("ssl_object") if (
            protocol.transport is not None) else None
        #: The TLS session with the server, None for plaintext.
        self.tls: TlsSession | None = (
            TlsSession.of(ssl_object, kernel=False) if ssl_object is not None
            else protocol.session)
        self._connected.set()
        self._since = asyncio.get_running_loop().time()
        if self._backoff is not None:
            protocol.on_lost = self._lost
            if protocol.closed.done():  # (lost before it was ours to watch)
                self._lost()

    def _lost(self) -> None:
        if self._closing or self._reconnecting is not None or self._backoff is None:
            return
        self._connected.clear()
        if asyncio.get_running_loop().time() - self._since >= STABLE:
            self._backoff.reset()  # (a connection that held: start again from 1 s)
        error = self._protocol.error
        log.warning("%s", error)
        self._reconnecting = asyncio.ensure_future(self._reconnect())

    async def _reconnect(self) -> None:
        assert self._backoff is not None and self._target is not None
        target = self._target
        try:
            while not self._closing:
                try:
                    delay = self._backoff.next_delay()
                except StopIteration:
                    log.warning("%s: giving up after %d attempts to connect again",
                                printable(target.busid), self._backoff.attempts)
                    break
                log.info("%s: connecting again in %.1f s (attempt %d)",
                         printable(target.busid), delay, self._backoff.attempts)
                await asyncio.sleep(delay)
                relay, self._relay = self._relay, None
                if relay is not None:  # (it ended: the server no longer had the attachment)
                    await asyncio.to_thread(relay.stop)
                try:
                    protocol, info, self._relay = await _import_target(target)
                except (UsbipError, OSError) as exc:  # (a malformed reply, too)
                    log.warning("%s: %s", printable(target.busid),
                                exc if isinstance(exc, UsbipError) else exc.strerror or exc)
                    continue
                if self._closing:
                    await _close(protocol)
                    relay, self._relay = self._relay, None
                    if relay is not None:
                        await asyncio.to_thread(relay.stop)
                    break
                self.info = info
                self.reconnects += 1
                # "retries" counts failures in a row; the delays keep growing until a
                # connection holds for STABLE seconds (a server that accepts and drops
                # at once is not hammered)
                self._backoff.reset_count()
                self._reconnecting = None
                log.info("%s: imported again from %s:%d", printable(target.busid),
                         printable(target.host), target.port)
                self._use(protocol)
                return
        finally:
            if self._reconnecting is asyncio.current_task():
                self._reconnecting = None
                self._connected.set()  # (no connection: what waits raises ServerGone)

    def _gone(self) -> ClientError:
        return self._protocol.error or ClientError("the connection is closed")

    @property
    def closed(self) -> bool:
        """Whether the connection is down (while reconnecting too)."""
        return self._protocol.closed.done()

    async def wait_connected(self) -> None:
        """Until a lost connection is back; ServerGone once there is no hope of it."""
        await self._connected.wait()
        if self.closed:
            raise self._gone()

    def submit_nowait(self, ep: int, direction: Direction, length: int = 0, *,
                      data: bytes = b"", setup: bytes = bytes(8), transfer_flags: int = 0,
                      iso_packets: list[IsoPacket] | None = None,
                      interval: int = 0) -> tuple[int, asyncio.Future[RetSubmit]]:
        """Send CMD_SUBMIT; returns the seqnum and a future for its RET_SUBMIT."""
        if direction is Direction.OUT:
            length = len(data)
        protocol = self._protocol
        if protocol.transport is None or protocol.closed.done():
            raise self._gone()
        seqnum = protocol.conn.next_seqnum()
        # (may refuse: then nothing waits for a reply)
        wire = protocol.conn.send_submit(seqnum, self.info.devid, direction, ep,
                                         transfer_flags, length, setup, data, 0, 0, interval,
                                         iso_packets)
        future: asyncio.Future[RetSubmit] = asyncio.get_running_loop().create_future()
        # a future whose transfer gave up on it (a timeout, a cancellation) may still
        # get the connection's end as its exception: retrieved here, never logged
        future.add_done_callback(_retrieve)
        protocol.waiting[seqnum] = future  # type: ignore[assignment]
        protocol.transport.write(wire)
        return seqnum, future

    async def submit(self, ep: int, direction: Direction, length: int = 0, **kw: object
                     ) -> RetSubmit:
        if self._reconnecting is not None:
            await self.wait_connected()  # (raises ServerGone once there is no hope)
        _seqnum, future = self.submit_nowait(ep, direction, length, **kw)  # type: ignore[arg-type]
        return await future

    async def unlink(self, seqnum: int) -> RetUnlink:
        protocol = self._protocol
        if protocol.transport is None or protocol.closed.done():
            raise self._gone()
        unlink_seqnum = protocol.conn.next_seqnum()
        wire = protocol.conn.send(CmdUnlink(unlink_seqnum, self.info.devid, seqnum))
        future: asyncio.Future[RetUnlink] = asyncio.get_running_loop().create_future()
        protocol.waiting[unlink_seqnum] = future  # type: ignore[assignment]
        protocol.transport.write(wire)
        reply = await future
        # A RET_SUBMIT for the URB, if any, came before this reply; none comes after
        # it (even with status 0: usbip-host answers a URB it unlinked as it
        # completed with RET_UNLINK alone). What still waits, waits in vain.
        pending = protocol.waiting.pop(seqnum, None)
        if pending is not None and not pending.done():
            pending.cancel()
        return reply

    async def transfer(self, ep: int, direction: Direction, length: int = 0, *,
                       data: bytes = b"", setup: bytes = bytes(8), transfer_flags: int = 0,
                       iso_packets: list[IsoPacket] | None = None, interval: int = 0,
                       timeout: float | None = None) -> RetSubmit:
        """One URB to its end, within ``timeout`` seconds.

        Raises the :func:`urb_error` for a non-zero status, TransferTimeout
        when the time ran out; on a timeout or a cancellation the URB is
        unlinked first. A URB that completed while its unlink was on the way
        keeps its result: its data is not thrown away.
        """
        sent: tuple[int, asyncio.Future[RetSubmit]] | None = None
        try:
            async with asyncio.timeout(timeout):
                if self._reconnecting is not None:  # (the timeout covers the wait too)
                    await self.wait_connected()
                sent = seqnum, future = self.submit_nowait(
                    ep, direction, length, data=data, setup=setup,
                    transfer_flags=transfer_flags, iso_packets=iso_packets, interval=interval)
                # shielded: a timeout must not cancel the future its RET_SUBMIT completes
                ret = await asyncio.shield(future)
        except TimeoutError:
            if sent is None:  # still connecting again: nothing was sent
                raise TransferTimeout(describe(ep, direction, setup, iso_packets),
                                      cast(float, timeout)) from None
            seqnum, future = sent
            ret = await self._after_timeout(seqnum, future, describe(
                ep, direction, setup, iso_packets), cast(float, timeout))
        except asyncio.CancelledError:
            if sent is not None:
                self._unlink_nowait(sent[0])
            raise
        return checked(ret, ep, direction, setup, iso_packets)

    async def _after_timeout(self, seqnum: int, future: asyncio.Future[RetSubmit],
                             what: str, timeout: float) -> RetSubmit:
        """Unlink a URB that timed out: its RET_SUBMIT if it came first, else the
        error that says how it ended (as the blocking form's)."""
        unlinked: RetUnlink | None = None
        if not future.done():
            grace = unlink_grace(timeout)
            try:
                async with asyncio.timeout(grace):
                    unlinked = await self.unlink(seqnum)
            except TimeoutError:
                self._protocol.error = ClientError(
                    f"the server did not answer the unlink of URB {seqnum} within "
                    f"{grace:g} s; the connection was closed")
                if self._protocol.transport is not None:
                    self._protocol.transport.abort()
                raise TransferTimeout(what, timeout) from None
            except ClientError:  # (the connection went meanwhile)
                raise TransferTimeout(what, timeout) from None
        raced = (future.result() if future.done() and not future.cancelled()
                 and future.exception() is None else None)
        return after_unlink(seqnum, raced, unlinked, what, timeout)

    def _unlink_nowait(self, seqnum: int) -> None:
        """CMD_UNLINK with no one waiting for its reply (a cancelled task's URB)."""
        protocol = self._protocol
        if protocol.transport is None or protocol.closed.done():
            return
        pending = protocol.waiting.pop(seqnum, None)
        if pending is None:  # (it completed)
            return
        pending.cancel()
        protocol.transport.write(protocol.conn.send(
            CmdUnlink(protocol.conn.next_seqnum(), self.info.devid, seqnum)))

    async def control(self, bmRequestType: int, bRequest: int, wValue: int, wIndex: int,
                      wLength_or_data: int | bytes, *, timeout: float | None = None) -> bytes:
        """A control transfer on endpoint 0: IN data, or b"" for OUT.

        ``wLength_or_data``: the length to read, or the bytes to write (by the
        direction bit of ``bmRequestType``). A stall raises :class:`Stalled`.
        """
        direction, length, setup, data = control_request(bmRequestType, bRequest, wValue,
                                                          wIndex, wLength_or_data)
        ret = await self.transfer(0, direction, length, data=data, setup=setup,
                                  timeout=timeout)
        return ret.data

    async def bulk_read(self, ep: int, length: int, *, timeout: float | None = None,
                        short_not_ok: bool = False) -> bytes:
        """Read up to ``length`` bytes from bulk endpoint ``ep`` (0x81...)."""
        flags = UrbFlag.SHORT_NOT_OK if short_not_ok else 0
        ret = await self.transfer(ep & 0x7F, Direction.IN, length, transfer_flags=flags,
                                  timeout=timeout)
        return ret.data

    async def bulk_write(self, ep: int, data: bytes, *, timeout: float | None = None,
                         zero_packet: bool = False) -> int:
        """Write ``data`` to bulk endpoint ``ep``; the bytes the device took."""
        flags = UrbFlag.ZERO_PACKET if zero_packet else 0
        ret = await self.transfer(ep & 0x7F, Direction.OUT, data=bytes(data),
                                  transfer_flags=flags, timeout=timeout)
        return ret.actual_length

    async def interrupt_read(self, ep: int, length: int, *,
                             timeout: float | None = None) -> bytes:
        """Read an interrupt IN report (waits until the device has one)."""
        ret = await self.transfer(ep & 0x7F, Direction.IN, length, timeout=timeout)
        return ret.data

    async def interrupt_write(self, ep: int, data: bytes, *,
                              timeout: float | None = None) -> int:
        ret = await self.transfer(ep & 0x7F, Direction.OUT, data=bytes(data), timeout=timeout)
        return ret.actual_length

    async def iso_read(self, ep: int, packet_lengths: Sequence[int], *,
                       timeout: float | None = None, interval: int = 1) -> list[IsoResult]:
        """One isochronous IN URB of ``len(packet_lengths)`` packets, started as
        soon as possible (URB_ISO_ASAP); each packet's status and data."""
        packets = iso_layout(packet_lengths)
        total = sum(packet_lengths)
        ret = await self.transfer(ep & 0x7F, Direction.IN, total, iso_packets=packets,
                                  transfer_flags=UrbFlag.ISO_ASAP, interval=interval,
                                  timeout=timeout)
        return iso_results(ret, packets, Direction.IN)

    async def iso_write(self, ep: int, packets: Sequence[bytes], *,
                        timeout: float | None = None, interval: int = 1) -> list[IsoResult]:
        """One isochronous OUT URB, a packet per item of ``packets``."""
        layout = iso_layout([len(p) for p in packets])
        ret = await self.transfer(ep & 0x7F, Direction.OUT, data=b"".join(packets),
                                  iso_packets=layout, transfer_flags=UrbFlag.ISO_ASAP,
                                  interval=interval, timeout=timeout)
        return iso_results(ret, layout, Direction.OUT)

    async def bulk_out(self, ep: int, data: bytes) -> RetSubmit:
        """CMD_SUBMIT and its RET_SUBMIT, status unchecked (see :meth:`bulk_write`)."""
        return await self.submit(ep, Direction.OUT, data=data)

    async def bulk_in(self, ep: int, length: int) -> RetSubmit:
        """CMD_SUBMIT and its RET_SUBMIT, status unchecked (see :meth:`bulk_read`)."""
        return await self.submit(ep, Direction.IN, length)

    async def wait_closed(self) -> None:
        """Until the server closes the connection (or :meth:`close` does)."""
        await self._protocol.closed

    async def close(self) -> None:
        self._closing = True
        if self._reconnecting is not None:
            self._reconnecting.cancel()
            self._reconnecting = None
        self._connected.set()
        self._protocol.closing = True
        transport = self._protocol.transport
        relay, self._relay = self._relay, None
        if relay is not None:  # (its FIN first: the server releases the device at once)
            await asyncio.to_thread(relay.stop)
        if transport is not None:
            transport.close()
        await self._protocol.closed

    async def __aenter__(self) -> RemoteDevice:
        return self

    async def __aexit__(self, et: type[BaseException] | None, e: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.close()


def _retrieve(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()


class connect:  # noqa: N801 (used as a function: ``async with connect(...)``)
    """Import ``busid`` from ``host``: ``async with connect(...) as dev`` closes it
    at the end; ``dev = await connect(...)`` leaves that to you.

    The keyword arguments are :func:`import_device`'s: ``port``, ``device``
    (VID:PID[:SERIAL] in place of a busid), ``first``, ``tls``,
    ``server_hostname``, ``keepalive``, ``reconnect``, ``resume``. ``host`` may
    be a URL: ``usbip://HOST[:PORT]/BUSID``, ``usbip://HOST/VID:PID[:SERIAL]``, and
    ``usbip://*/VID:PID[:SERIAL]`` for the device wherever DNS-SD finds it.
    """

    def __init__(self, host: str, busid: str | None = None, port: int = USBIP_PORT,
                 **options: Any) -> None:
        if "://" in host:  # usbip://HOST[:PORT]/BUSID or /VID:PID[:SERIAL]; HOST may be *
            host, port, path = parse_address(host, busid)
            busid = None
            if path is not None and ":" in path:
                options["device"] = path
            else:
                busid = path
        self._args = (host, busid, port)
        self._options = options
        self._device: RemoteDevice | None = None

    def __await__(self) -> Generator[Any, None, RemoteDevice]:
        return import_device(*self._args, **self._options).__await__()

    async def __aenter__(self) -> RemoteDevice:
        self._device = await import_device(*self._args, **self._options)
        return self._device

    async def __aexit__(self, et: type[BaseException] | None, e: BaseException | None,
                        tb: TracebackType | None) -> None:
        assert self._device is not None
        await self._device.close()
