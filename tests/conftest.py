from __future__ import annotations

import asyncio
import collections.abc
import logging
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import pytest
from hypothesis import settings

from usbipy.backends.base import ExportedDevice
from usbipy.devices.demo import demo_devices
from usbipy.server import UsbipServer

T = TypeVar("T")


def run(coro: Awaitable[T], timeout: float = 60) -> T:
    async def main() -> T:
        return await asyncio.wait_for(coro, timeout)

    return asyncio.run(main())


ServeFn = Callable[[Callable[[UsbipServer], Awaitable[Any]]], Any]


@pytest.fixture(autouse=True)
def _no_system_config(monkeypatch: pytest.MonkeyPatch) -> None:
    """No test reads this machine's /etc/usbipy/usbipyd.toml."""
    from usbipy.config import file

    monkeypatch.setattr(file, "DEFAULT_PATH", Path("/nonexistent/usbipy/usbipyd.toml"))


@pytest.fixture(autouse=True)
def _private_run_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Persistent attachments describe themselves in a directory of the test's own."""
    monkeypatch.setenv("USBIPY_RUN_DIR", str(tmp_path / "run/usbipy/attach"))


@pytest.fixture
def serve() -> collections.abc.Iterator[Callable[..., Any]]:
    """serve(test, devices=None, **server_args): run ``await test(server)`` against a
    live server on port 0."""

    def go(test: Callable[[UsbipServer], Awaitable[T]],
           devices: list[ExportedDevice] | None = None, **server_args: Any) -> T:
        async def main() -> T:
            # asyncio's debug mode reports any callback that holds the loop too long:
            # a blocking call there stalls every client.
            asyncio.get_running_loop().slow_callback_duration = BLOCKED_LOOP_S
            server = UsbipServer(port=0, **server_args)
            for device in devices if devices is not None else demo_devices(disk_size=1 << 20):
                server.add(device)
            async with server:
                return await asyncio.wait_for(test(server), 60)

        with BlockedLoopLog() as blocked:
            result = asyncio.run(main(), debug=True)
        assert not blocked.messages, f"the event loop was blocked: {blocked.messages}"
        return result

    yield go


#: A callback holding the loop this long is a blocking call in the wrong place
#: (generous: loaded CI machines are slow, a real blocking call is slower still).
BLOCKED_LOOP_S = 0.5


class BlockedLoopLog(logging.Handler):
    """Collects asyncio's debug-mode reports of slow callbacks."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if "took" in message and "seconds" in message:
            self.messages.append(message)

    def __enter__(self) -> BlockedLoopLog:
        logging.getLogger("asyncio").addHandler(self)
        return self

    def __exit__(self, *exc: object) -> None:
        logging.getLogger("asyncio").removeHandler(self)


# Shared CI machines are noisy and the kernel tests load them: no per-example deadline.
settings.register_profile("usbipy", deadline=None)
settings.load_profile("usbipy")
