"""The usbipyd server: listen, accept, serve each client with its own protocol object."""

from __future__ import annotations

import asyncio
import functools
import logging
import socket
import threading
from collections.abc import Coroutine, Iterable, Sequence
from types import TracebackType
from typing import Any

from ..backends.base import ExportedDevice, HandOffDevice
from ..capture import Capture
from ..config.limits import Limits
from ..escape import printable
from ..policy import OPEN, Policy
from ..protocol import DEFAULT_MAX_TRANSFER, USBIP_PORT, OpStatus
from ..tls import TlsSession
from .access import Access, HandedOff
from .connection import UsbipServerProtocol
from .limits import Slot, client_key
from .registry import DeviceRegistry
from .stats import ServerStats
from .tls import ServerTls, address_text, serve_tls_client

log = logging.getLogger("usbipy.server")


def listen_sockets(hosts: Sequence[str], port: int,
                   family: socket.AddressFamily = socket.AF_UNSPEC) -> list[socket.socket]:
    """Bound, listening sockets for every address of ``hosts``.

    Made before the event loop (and before ``-D`` forks), so that a port in
    use is reported to the user rather than to /dev/null.
    """
    sockets: list[socket.socket] = []
    try:
        for host in hosts:
            infos = socket.getaddrinfo(host or None, port, family, socket.SOCK_STREAM,
                                       flags=socket.AI_PASSIVE)
            for fam, kind, proto, _name, addr in dict.fromkeys(infos):
                sock = socket.socket(fam, kind, proto)
                sockets.append(sock)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                if fam == socket.AF_INET6:
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                sock.bind(addr)
                sock.listen(128)
                sock.setblocking(False)
                if port == 0:
                    port = sock.getsockname()[1]  # every address on the same port
    except BaseException:
        for sock in sockets:
            sock.close()
        raise
    return sockets


class UsbipServer:
    """A USB/IP server exporting the devices of a :class:`DeviceRegistry`.

    With ``tls``, every client of ``hosts``/``sockets`` must complete a mutual
    TLS handshake first; ``plain_sockets`` (loopback listeners, say) serve
    plaintext beside them.

    Loop-only: create, start and close it on the event loop that serves it.
    """

    def __init__(self, registry: DeviceRegistry | None = None, *,
                 hosts: Sequence[str] = ("127.0.0.1",), port: int = USBIP_PORT,
                 family: socket.AddressFamily = socket.AF_UNSPEC,
                 max_transfer_length: int = DEFAULT_MAX_TRANSFER,
                 sockets: Sequence[socket.socket] = (),
                 tls: ServerTls | None = None,
                 plain_sockets: Sequence[socket.socket] = (),
                 policy: Policy = OPEN, limits: Limits | None = None,
                 capture: Capture | None = None, stats: ServerStats | None = None) -> None:
        self.registry = registry if registry is not None else DeviceRegistry()
        #: Counters for the metrics endpoint (usbipyd --metrics); None: nothing counted.
        self.stats = stats
        #: Where the URBs of Python-served devices are recorded (usbipyd --capture);
        #: closed by :meth:`close`.
        self.capture = capture
        self.access = Access(policy, limits if limits is not None else Limits())
        #: Listening sockets made beforehand (see :func:`listen_sockets`); when
        #: empty, :meth:`start` binds ``hosts`` and ``port`` itself.
        self._sockets = list(sockets)
        self._plain_sockets = list(plain_sockets)
        self.tls = tls
        self.hosts = list(hosts)
        self.port = port
        self.family = family
        self.max_transfer_length = max_transfer_length
        self.connections: set[UsbipServerProtocol] = set()
        #: Listening sockets, each with the TLS its clients must speak (None: plaintext).
        self._listeners: list[tuple[socket.socket, ServerTls | None]] = []
        self._tasks: set[asyncio.Task[None]] = set()
        #: Resolved by close(): serve_forever() returns.
        self._stopped: asyncio.Future[None] | None = None

    def add(self, device: ExportedDevice) -> ExportedDevice:
        return self.registry.add(device)

    async def start(self) -> None:
        sockets = self._sockets or listen_sockets(self.hosts, self.port, self.family)
        self._sockets = []
        plain, self._plain_sockets = self._plain_sockets, []
        for sock, tls in [*((s, self.tls) for s in sockets), *((s, None) for s in plain)]:
            self._listeners.append((sock, tls))
            self._spawn(self._accept(sock, tls))
        if not self.access.policy.open:
            self._spawn(self._unknown_sessions())
        # With port 0 the system picks one: report the real port.
        self.port = sockets[0].getsockname()[1] if sockets else plain[0].getsockname()[1]
        for address, tls in self._addresses():
            where = address_text(address)
            if tls is None:
                log.info("listening on %s", where)
            else:
                log.info("listening on %s (mutual TLS, %s)", where,
                         "kernel TLS" if tls.kernel else "userspace TLS")

    def _protocol(self, tls: TlsSession | None = None) -> UsbipServerProtocol:
        return UsbipServerProtocol(self.registry, max_transfer_length=self.max_transfer_length,
                                   connections=self.connections, tls=tls, access=self.access,
                                   capture=self.capture, stats=self.stats)

    def _counted_protocol(self, slot: Slot, tls: TlsSession | None = None
                          ) -> UsbipServerProtocol:
        """A protocol whose connection holds ``slot`` until it is gone."""
        protocol = self._protocol(tls)
        protocol.slot = slot
        protocol.finished.add_done_callback(lambda _f: slot.release())
        return protocol

    def _spawn(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.ensure_future(work)
        self._tasks.add(task)  # (the loop keeps only a weak reference to a task)
        task.add_done_callback(self._tasks.discard)

    async def _accept(self, listener: socket.socket, tls: ServerTls | None) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                sock, addr = await loop.sock_accept(listener)
            except OSError as exc:
                # Out of file descriptors, say: not fatal, and not a busy loop.
                log.error("accepting a client failed: %s", exc.strerror or exc)
                await asyncio.sleep(0.5)
                continue
            # Before anything else: the socket may end up in usbip-host, and from
            # then on only these options notice that its client is gone.
            try:
                self.access.limits.keepalive.apply(sock)
            except OSError as exc:  # (the client reset it already, say)
                sock.close()
                log.debug("%s: %s", printable(address_text(addr)), exc.strerror or exc)
                continue
            admission = self.access.admission
            slot = admission.accept(client_key(addr), printable(address_text(addr)),
                                    handshake=tls is not None)
            if slot is None:
                sock.close()
                continue
            if tls is None:
                try:
                    await loop.connect_accepted_socket(
                        functools.partial(self._counted_protocol, slot), sock)
                except Exception as exc:  # noqa: BLE001 (this client's alone)
                    sock.close()
                    slot.release()
                    log.warning("%s: cannot serve the connection: %s",
                                printable(address_text(addr)), exc)
                continue
            made: list[UsbipServerProtocol] = []

            def protocol(session: TlsSession | None, slot: Slot = slot,
                         made: list[UsbipServerProtocol] = made) -> UsbipServerProtocol:
                made.append(self._counted_protocol(slot, session))
                return made[-1]

            task = asyncio.ensure_future(serve_tls_client(sock, addr, tls, protocol,
                                                          self._handshake_warning))
            self._tasks.add(task)
            admission.handshaking(slot, task.cancel)  # (counted until it is over)
            admission.waiting(slot, task.cancel)  # (until its protocol waits in its place)
            # Owned here, not inside the coroutine: a task cancelled before it ever
            # ran (close() right after an accept) still frees its slot and socket.
            task.add_done_callback(functools.partial(self._handshake_done, sock, slot, made))

    def _handshake_warning(self, kind: str, text: str) -> None:
        """A refused TLS handshake: counted, and logged (at most once per 10 s per kind)."""
        if self.stats is not None and kind.startswith("handshake refused"):
            self.stats.handshake_refused(text)
        self.access.log.warning(kind, text)

    def _handshake_done(self, sock: socket.socket, slot: Slot,
                        made: list[UsbipServerProtocol], task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        self.access.admission.handshake_over(slot)
        if not made:  # (no protocol to count the connection until it goes)
            slot.release()
        if task.cancelled():
            sock.close()  # (taken over by then on every other path: closing is harmless)

    def _addresses(self) -> list[tuple[tuple[str, int], ServerTls | None]]:
        return [(s.getsockname()[:2], tls) for s, tls in self._listeners]

    async def reconfigure(self, policy: Policy, limits: Limits) -> None:
        """Put ``policy`` and ``limits`` in force: new requests see them at once, and
        every session whose client the policy no longer allows is ended."""
        self.access.reconfigure(policy, limits)
        for conn in list(self.connections):
            device = conn.device
            if device is None:
                continue
            decision = self.access.decide(conn.client, device)
            if not decision.allowed:
                log.warning("%s: dropped from %s: no longer allowed by %s", conn.peer,
                            printable(device.busid), decision.reason)
                conn.close()
        for busid, entry in list(self.access.handed_off.items()):
            await self._take_back(busid, entry)
        if not policy.open:
            await self._unknown_sessions()

    async def _unknown_sessions(self) -> None:
        """Name the kernel sessions no policy can judge: those this process did not
        start (begun before a restart, or by C usbipd)."""
        strangers = [d for d in await self.registry.hand_offs()
                     if d.busid not in self.access.handed_off]
        if not strangers:
            return
        statuses = await asyncio.to_thread(lambda: [d.import_status() for d in strangers])
        for device, status in zip(strangers, statuses, strict=True):
            if status is OpStatus.DEV_BUSY:
                log.warning("%s: in use by a session this usbipyd did not start (before a "
                            "restart, or by another server): the policy cannot tell whose; "
                            "'usbipy unbind -b %s' ends it", printable(device.busid),
                            printable(device.busid))

    async def _take_back(self, busid: str, entry: HandedOff) -> None:
        """End a kernel session whose client the policy no longer allows."""
        handed = self.access.handed_off
        device = entry.device
        if not isinstance(device, HandOffDevice) or entry.pending:
            return
        status = await asyncio.to_thread(device.import_status)
        if handed.get(busid) is not entry:
            return  # (handed off anew meanwhile: that session is another client's)
        if status is not OpStatus.DEV_BUSY:
            del handed[busid]  # (that session is over)
            return
        decision = self.access.decide(entry.client, device)
        if decision.allowed:
            return
        del handed[busid]
        try:
            await asyncio.to_thread(device.take_back)
        except OSError as exc:
            handed.setdefault(busid, entry)  # (tried again on the next reload)
            log.error("%s: cannot end its session on %s: %s", entry.peer,
                      printable(busid), exc.strerror or exc)
            return
        log.warning("%s: dropped from %s (served by the kernel): no longer allowed by %s",
                    entry.peer, printable(busid), decision.reason)

    @property
    def addresses(self) -> list[tuple[str, int]]:
        return [address for address, _tls in self._addresses()]

    async def serve_forever(self) -> None:
        """Serve until :meth:`close`."""
        assert self._listeners
        self._stopped = asyncio.get_running_loop().create_future()
        try:
            await self._stopped
        finally:
            self._stopped = None

    async def close(self) -> None:
        """Stop listening, drop every client, and make every device durable."""
        tasks, self._tasks = list(self._tasks), set()
        for task in tasks:
            task.cancel()
        if tasks:  # (the accept loops stop watching their sockets before these close)
            await asyncio.wait(tasks)
        listeners, self._listeners = self._listeners, []
        for sock, _tls in listeners:
            sock.close()
        for sock in [*self._sockets, *self._plain_sockets]:  # (given, never listened on)
            sock.close()
        if self._stopped is not None and not self._stopped.done():
            self._stopped.set_result(None)
        connections = list(self.connections)
        for conn in connections:
            conn.close()
        # Every client's device released (detach may take a worker thread's time).
        if connections:
            await asyncio.wait([c.finished for c in connections], timeout=10)
        for device in self.registry:
            device.close()
        for source in self.registry.sources:
            source.close()
        if self.capture is not None:  # (its last records written: off the loop)
            await asyncio.to_thread(self.capture.close)

    async def __aenter__(self) -> UsbipServer:
        await self.start()
        return self

    async def __aexit__(self, et: type[BaseException] | None, e: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.close()


class ServerThread:
    """Run a :class:`UsbipServer` on its own event loop in a background thread.

    For programs (and tests) whose main thread does something else, such as
    typing on an emulated keyboard::

        with ServerThread([HidKeyboard()], port=0) as srv:
            print(srv.port)
    """

    def __init__(self, devices: Iterable[ExportedDevice], **server_args: object) -> None:
        self._devices = list(devices)
        self._args = server_args
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="usbipyd",
                                        daemon=True)
        self.server: UsbipServer | None = None

    @property
    def port(self) -> int:
        assert self.server is not None
        return self.server.port

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        """The event loop the server runs on (its own thread's)."""
        return self._loop

    def call(self, fn: object, *args: object) -> object:
        """Run ``fn(*args)`` on the server's loop and return its result."""
        async def run() -> object:
            return fn(*args)  # type: ignore[operator]

        return asyncio.run_coroutine_threadsafe(run(), self._loop).result(timeout=30)

    def start(self) -> ServerThread:
        self._thread.start()

        async def start() -> UsbipServer:
            server = UsbipServer(**self._args)  # type: ignore[arg-type]
            for device in self._devices:
                server.add(device)
            await server.start()
            return server

        self.server = asyncio.run_coroutine_threadsafe(start(), self._loop).result(timeout=30)
        return self

    def stop(self) -> None:
        """Close the server and end its thread; a second call does nothing."""
        if self._loop.is_closed():
            return
        if self.server is not None:
            asyncio.run_coroutine_threadsafe(self.server.close(), self._loop).result(timeout=30)
            self.server = None
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=30)
        self._loop.close()

    def __enter__(self) -> ServerThread:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
