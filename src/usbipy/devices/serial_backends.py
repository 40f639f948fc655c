"""Where the bytes of an emulated serial port go: an echo, or a pseudo-terminal."""

from __future__ import annotations

import asyncio
import os
import tty
from collections.abc import Callable
from typing import Protocol


class SerialBackend(Protocol):
    """The far end of a CDC-ACM port.

    :meth:`start` hands the backend a callback for the bytes it produces;
    :meth:`write` takes bytes from the USB host and returns None when they are
    taken, or a future that completes when there is room again (backpressure).
    """

    def start(self, receive: Callable[[bytes], None]) -> None: ...

    def write(self, data: bytes) -> asyncio.Future[None] | None: ...

    def stop(self) -> None: ...


class EchoBackend:
    """Everything written comes back, as on a loopback plug."""

    def __init__(self) -> None:
        self._receive: Callable[[bytes], None] | None = None

    def start(self, receive: Callable[[bytes], None]) -> None:
        self._receive = receive

    def write(self, data: bytes) -> asyncio.Future[None] | None:
        if self._receive is not None:
            self._receive(data)
        return None

    def stop(self) -> None:
        self._receive = None


class PtyBackend:
    """A pseudo-terminal on the server: programs open :attr:`path` to talk to the client.

    The slave side is put in raw mode, so bytes pass unchanged and nothing is
    echoed back to the USB host. The pty lives as long as the backend, across
    imports, so a program may keep it open while clients come and go.
    """

    #: Bytes from the USB host buffered when the program does not read.
    MAX_BACKLOG = 1 << 20

    def __init__(self) -> None:
        self._master, self._slave = os.openpty()
        tty.setraw(self._slave)
        os.set_blocking(self._master, False)
        self.path = os.ttyname(self._slave)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._receive: Callable[[bytes], None] | None = None
        self._backlog = bytearray()
        self._room: asyncio.Future[None] | None = None

    def start(self, receive: Callable[[bytes], None]) -> None:
        self._loop = asyncio.get_running_loop()
        self._receive = receive
        self._loop.add_reader(self._master, self._on_readable)

    def _on_readable(self) -> None:
        try:
            data = os.read(self._master, 65536)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            return  # EIO: no program holds the slave open (we keep it open; defensive)
        if data and self._receive is not None:
            self._receive(data)

    def write(self, data: bytes) -> asyncio.Future[None] | None:
        assert self._loop is not None
        if not self._backlog:
            try:
                written = os.write(self._master, data)
            except BlockingIOError:
                written = 0
            data = data[written:]
            if not data:
                return None
            self._loop.add_writer(self._master, self._on_writable)
        self._backlog += data
        if len(self._backlog) < self.MAX_BACKLOG:
            return None
        if self._room is None or self._room.done():
            self._room = self._loop.create_future()
        return self._room

    def _on_writable(self) -> None:
        assert self._loop is not None
        try:
            written = os.write(self._master, self._backlog)
        except BlockingIOError:
            return
        del self._backlog[:written]
        if not self._backlog:
            self._loop.remove_writer(self._master)
        if len(self._backlog) < self.MAX_BACKLOG and self._room and not self._room.done():
            self._room.set_result(None)

    def stop(self) -> None:
        if self._loop is not None:
            self._loop.remove_reader(self._master)
            self._loop.remove_writer(self._master)
        self._receive = None
        self._backlog.clear()
        if self._room is not None and not self._room.done():
            self._room.cancel()

    def close(self) -> None:
        self.stop()
        os.close(self._master)
        os.close(self._slave)
