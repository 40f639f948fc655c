from __future__ import annotations

import asyncio
import collections.abc
from collections.abc import Awaitable, Callable
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


@pytest.fixture
def serve() -> collections.abc.Iterator[Callable[..., Any]]:
    """serve(test, devices=None): run ``await test(server)`` against a live server on port 0."""

    def go(test: Callable[[UsbipServer], Awaitable[T]],
           devices: list[ExportedDevice] | None = None) -> T:
        async def main() -> T:
            server = UsbipServer(port=0)
            for device in devices if devices is not None else demo_devices(disk_size=1 << 20):
                server.add(device)
            async with server:
                return await asyncio.wait_for(test(server), 60)

        return asyncio.run(main())

    yield go


# Shared CI machines are noisy and the kernel tests load them: no per-example deadline.
settings.register_profile("usbipy", deadline=None)
settings.load_profile("usbipy")
