"""The usbipyd server: listen, accept, serve each client with its own protocol object."""

from __future__ import annotations

import asyncio
import logging
import socket
import threading
from collections.abc import Iterable, Sequence
from types import TracebackType

from ..devices.base import ExportedDevice
from ..protocol import DEFAULT_MAX_TRANSFER
from .connection import UsbipServerProtocol
from .registry import DeviceRegistry

log = logging.getLogger("usbipy.server")

USBIP_PORT = 3240


class UsbipServer:
    """A USB/IP server exporting the devices of a :class:`DeviceRegistry`.

    Loop-only: create, start and close it on the event loop that serves it.
    """

    def __init__(self, registry: DeviceRegistry | None = None, *,
                 hosts: Sequence[str] = ("127.0.0.1",), port: int = USBIP_PORT,
                 family: socket.AddressFamily = socket.AF_UNSPEC,
                 max_transfer_length: int = DEFAULT_MAX_TRANSFER) -> None:
        self.registry = registry if registry is not None else DeviceRegistry()
        self.hosts = list(hosts)
        self.port = port
        self.family = family
        self.max_transfer_length = max_transfer_length
        self.connections: set[UsbipServerProtocol] = set()
        self._server: asyncio.Server | None = None

    def add(self, device: ExportedDevice) -> ExportedDevice:
        return self.registry.add(device)

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: UsbipServerProtocol(
                self.registry, max_transfer_length=self.max_transfer_length,
                connections=self.connections,
            ),
            host=self.hosts or None, port=self.port, family=self.family,
            reuse_address=True,
        )
        # With port 0 the system picks one: report the real port.
        self.port = self._server.sockets[0].getsockname()[1]
        for sock in self._server.sockets:
            log.info("listening on %s", sock.getsockname()[:2])

    @property
    def addresses(self) -> list[tuple[str, int]]:
        if self._server is None:
            return []
        return [s.getsockname()[:2] for s in self._server.sockets]

    async def serve_forever(self) -> None:
        assert self._server is not None
        await self._server.serve_forever()

    async def close(self) -> None:
        """Stop listening, drop every client, and make every device durable."""
        if self._server is not None:
            self._server.close()
        for conn in list(self.connections):
            conn.close()
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None
        await asyncio.sleep(0)  # let connection_lost run
        for device in self.registry:
            device.close()

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
