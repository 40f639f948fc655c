"""Browsing for usbipy servers: once, for a bounded time (``usbipy list --all``),
or all along (usbipyd's page shows the other servers it finds).

python-zeroconf runs on the caller's event loop: its browser hears the servers'
answers and announcements, and each one found is resolved (SRV, TXT and
address records) as it comes.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from zeroconf import IPVersion, ServiceStateChange, Zeroconf
from zeroconf.asyncio import AsyncServiceBrowser, AsyncServiceInfo, AsyncZeroconf

from ..escape import printable
from .records import BROWSE_TIME, SERVICE_TYPE, Found, parse_service

log = logging.getLogger("usbipy.discovery")

#: Milliseconds one resolution may take (SRV, TXT and address records).
RESOLVE_MS = 1500
#: Servers kept by one browse (a network that answers with more is not a lab).
MAX_FOUND = 256


async def _resolve(zeroconf: Zeroconf, name: str) -> Found | None:
    info = AsyncServiceInfo(SERVICE_TYPE, name)
    if not await info.async_request(zeroconf, RESOLVE_MS):
        return None
    return parse_service(name, info.parsed_scoped_addresses(), info.port, info.properties)


def _zeroconf() -> AsyncZeroconf:
    try:
        return AsyncZeroconf(ip_version=IPVersion.All)
    except OSError:  # (a host without IPv6)
        return AsyncZeroconf(ip_version=IPVersion.V4Only)


async def browse(seconds: float = BROWSE_TIME) -> list[Found]:
    """The servers that answer within ``seconds``, by name."""
    zeroconf = _zeroconf()
    resolving: dict[str, asyncio.Task[Found | None]] = {}

    def changed(zeroconf: Zeroconf, service_type: str, name: str,
                state_change: ServiceStateChange) -> None:
        if (state_change is not ServiceStateChange.Removed and name not in resolving
                and len(resolving) < MAX_FOUND):
            resolving[name] = asyncio.ensure_future(_resolve(zeroconf, name))

    browser = AsyncServiceBrowser(zeroconf.zeroconf, [SERVICE_TYPE], handlers=[changed])
    try:
        await asyncio.sleep(seconds)
        await browser.async_cancel()
        results = await asyncio.gather(*resolving.values(), return_exceptions=True)
    finally:
        for task in resolving.values():
            task.cancel()
        await zeroconf.async_close()
    found: dict[str, Found] = {}
    for name, result in zip(resolving, results, strict=True):
        if isinstance(result, Found):
            found[name] = result
        elif isinstance(result, BaseException):
            log.debug("resolving %s failed: %s", printable(name), result)
    return sorted(found.values(), key=lambda f: (f.name, f.instance))


class PeerWatcher:
    """The other servers on the network, kept up to date for usbipyd's page."""

    def __init__(self, own_instance: str) -> None:
        #: This server's own instance name (the advertiser's, after any rename).
        self.own = own_instance
        self._zeroconf: AsyncZeroconf | None = None
        self._browser: AsyncServiceBrowser | None = None
        self._found: dict[str, Found] = {}
        self._resolving: set[str] = set()
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        self._zeroconf = _zeroconf()
        self._browser = AsyncServiceBrowser(self._zeroconf.zeroconf, [SERVICE_TYPE],
                                            handlers=[self._changed])

    def _changed(self, zeroconf: Zeroconf, service_type: str, name: str,
                 state_change: ServiceStateChange) -> None:
        if name.lower() == self.own.lower():
            return
        if state_change is ServiceStateChange.Removed:
            self._found.pop(name, None)
            return
        # (one resolution a name at a time, and a bounded number: a flood of names
        # on the network is not a flood of tasks on usbipyd's loop)
        if name in self._resolving or len(self._resolving) >= MAX_FOUND or (
                len(self._found) >= MAX_FOUND and name not in self._found):
            return
        self._resolving.add(name)
        task = asyncio.ensure_future(self._resolve(zeroconf, name))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _resolve(self, zeroconf: Zeroconf, name: str) -> None:
        try:
            found = await _resolve(zeroconf, name)
        except Exception as exc:
            log.debug("resolving %s failed: %s", printable(name), exc)
            return
        finally:
            self._resolving.discard(name)
        if found is not None:
            self._found[name] = found

    def peers(self) -> list[dict[str, Any]]:
        return [{"name": f.name, "host": f.host, "port": f.port, "tls": f.tls,
                 "page": f.page} for f in sorted(self._found.values(), key=lambda f: f.name)]

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        if self._browser is not None:
            await self._browser.async_cancel()
        if self._zeroconf is not None:
            await self._zeroconf.async_close()
