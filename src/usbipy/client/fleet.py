"""Many servers in one view: the servers DNS-SD finds (and those found lately),
each asked for its devices, in parallel, each within a bound.

A server found before but silent now (stopped, unplugged, its network down)
answers no DNS-SD query either; so the servers found are remembered for a
day (:data:`REMEMBERED_FOR`) in ``$XDG_CACHE_HOME/usbipy/servers.json``, and
such a server is asked too and named as not answering, rather than left out
without a word.
"""

from __future__ import annotations

import asyncio
import json
import os
import ssl
import tempfile
import threading
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..discovery.records import BROWSE_TIME, Found
from ..errors import UsbipError
from ..escape import printable
from ..protocol import DeviceInfo
from ..tls import TlsFiles, client_context
from . import identity
from .errors import HostUnreachable
from .identity import DeviceSpec
from .userspace import list_devices

#: Seconds one server has to send its device list.
LIST_TIMEOUT = 5.0
#: Seconds a server found once is remembered, and asked, after it was last found.
REMEMBERED_FOR = 24 * 3600.0
#: Servers remembered at most.
MAX_REMEMBERED = 256


@dataclass
class ServerDevices:
    """One server's answer: its devices, or why there are none."""

    server: Found
    #: "dns-sd" (found now) or "remembered" (found before, not now).
    found_by: str
    devices: list[DeviceInfo] | None = None
    error: str | None = None
    #: When it was last found by DNS-SD (time.time()).
    last_seen: float | None = None
    #: It was not asked: it requires TLS, and no TLS files were given.
    needs_tls: bool = False

    @property
    def failed(self) -> bool:
        """A server found now that did not answer (what makes the exit status 1: one
        only remembered is named, and one that needs TLS files is not the server's
        fault)."""
        return self.error is not None and self.found_by == "dns-sd" and not self.needs_tls


def cache_path() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "usbipy" / "servers.json"


def _recall(path: Path) -> dict[str, tuple[Found, float]]:
    try:
        data = json.loads(path.read_text())
        return {entry["server"]["instance"]: (Found.from_dict(entry["server"]),
                                              float(entry["seen"]))
                for entry in data.get("servers", [])}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return {}  # (a cache that cannot be read is a cache that is empty)


def _remember(path: Path, known: dict[str, tuple[Found, float]]) -> None:
    entries = sorted(known.values(), key=lambda pair: -pair[1])[:MAX_REMEMBERED]
    text = json.dumps({"servers": [{"server": found.as_dict(), "seen": seen}
                                   for found, seen in entries]}, indent=1)
    try:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        # (a file of its own, renamed into place: two listings at once never leave
        # half a file; 0600: which servers a user works with is theirs)
        fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=".servers-", suffix=".json")
        try:
            with os.fdopen(fd, "w") as out:
                out.write(text)
            os.replace(temporary, path)
        except BaseException:
            os.unlink(temporary)
            raise
    except OSError:
        pass  # (a read-only home: the listing still works, it remembers nothing)


async def discover(browse_time: float, *, remember: bool = True
                   ) -> list[tuple[Found, str, float]]:
    """The servers DNS-SD finds now, then those found within a day but not now:
    each with "dns-sd" or "remembered" and when it was last found."""
    try:
        from ..discovery.browse import browse
    except ImportError:
        raise UsbipError("finding servers needs python-zeroconf: pip install "
                         "'usbipy[fleet]' (or give -r HOST)") from None
    found = await browse(browse_time)
    now = time.time()
    path = cache_path()
    known = _recall(path) if remember else {}
    servers = [(f, "dns-sd", now) for f in found]
    seen_now = {f.instance for f in found}
    for instance, (old, seen) in sorted(known.items(), key=lambda item: item[1][0].name):
        if instance not in seen_now and now - seen < REMEMBERED_FOR:
            servers.append((old, "remembered", seen))
    if remember:
        for f in found:
            known[f.instance] = (f, now)
        _remember(path, {k: v for k, v in known.items() if now - v[1] < REMEMBERED_FOR})
    return servers


def contexts(tls: TlsFiles | None) -> ssl.SSLContext | None:
    return client_context(tls) if tls is not None else None


async def list_fleet(browse_time: float, *, tls: TlsFiles | None = None,
                     server_hostname: str | None = None, per_server: float = LIST_TIMEOUT,
                     remember: bool = True) -> list[ServerDevices]:
    """Every server's devices, asked in parallel; each server within ``per_server``
    seconds."""
    servers = await discover(browse_time, remember=remember)
    context = contexts(tls)

    async def ask(found: Found, how: str, seen: float) -> ServerDevices:
        answer = ServerDevices(found, how, last_seen=seen)
        if found.tls and context is None:
            answer.error = ("requires TLS: give --tls-cert, --tls-key and --tls-ca")
            answer.needs_tls = True
            return answer
        try:
            async with asyncio.timeout(per_server):
                answer.devices = list(await _first_address(
                    found, lambda host: list_devices(host, found.port,
                                                     tls=context if found.tls else None,
                                                     server_hostname=server_hostname)))
        except TimeoutError:
            answer.error = f"not answering: no device list in {per_server:g} s"
        except UsbipError as exc:
            answer.error = f"not answering: {exc}"
        except (OSError, ssl.SSLError) as exc:
            answer.error = f"not answering: {getattr(exc, 'strerror', None) or exc}"
        if answer.error is not None and how == "remembered":
            answer.error += f" (last found {_ago(time.time() - seen)} ago)"
        return answer

    return list(await asyncio.gather(*(ask(*server) for server in servers)))


async def _first_address(found: Found,
                         ask: Callable[[str], Awaitable[Sequence[DeviceInfo]]]
                         ) -> Sequence[DeviceInfo]:
    """``ask`` of the server's addresses in turn (IPv4 first) until one takes the
    connection: a host advertises every address it has, and not every one is on
    this client's network."""
    ordered = sorted(found.addresses, key=lambda a: ":" in a)
    for address in ordered[:-1]:
        try:
            return await ask(address)
        except HostUnreachable:
            continue
    return await ask(ordered[-1])


def _ago(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.0f} h"


async def servers_for(browse_time: float, *, tls: bool) -> list[Found]:
    """The servers an attach by identity asks, found by DNS-SD now: with TLS
    credentials, those that require TLS; without, the others (a match on a server of
    the other kind is not taken: no quiet change of what protects the session)."""
    try:
        from ..discovery.browse import browse
    except ImportError:
        raise UsbipError("finding servers needs python-zeroconf: pip install "
                         "'usbipy[fleet]' (or give -r HOST)") from None
    found = await browse(browse_time)
    usable = [f for f in found if f.tls == tls]
    if not usable:
        kind = "that require TLS" if tls else "without TLS"
        others = len(found) - len(usable)
        more = (f" ({others} other{'s' if others != 1 else ''} found: "
                + ("give --tls-cert, --tls-key and --tls-ca" if not tls else
                   "those do not take TLS") + ")") if others else ""
        raise UsbipError(f"no usbipy server {kind} found on the network by DNS-SD{more}")
    return usable


def find_anywhere(servers: Sequence[Found], spec: DeviceSpec, *, first: bool,
                  list_devices: identity.ListFn, read_serial: identity.SerialFn
                  ) -> identity.Found:
    """The device ``spec`` names on the servers DNS-SD found. Unlike -r's list, which
    the user wrote and ordered, anyone on the network can answer DNS-SD: a device
    offered by two servers is an error naming both (unless ``first``), so a host that
    copies a device's ids cannot quietly take its place."""
    matches: list[tuple[Found, identity.Found]] = []
    failures: list[str] = []
    for server in servers:
        try:
            matches.append((server, identity.find(
                [(server.host, server.port)], spec, first=first, list_devices=list_devices,
                read_serial=read_serial)))
        except identity.NoMatch as exc:
            failures.append(str(exc))
            continue
        if first:
            break
    if not matches:
        why = f" ({'; '.join(failures)})" if failures else ""
        raise identity.NoMatch(f"no device {printable(str(spec))} on the {len(servers)} "
                               f"server{'s' if len(servers) != 1 else ''} DNS-SD found{why}")
    if len(matches) > 1:
        listed = ", ".join(f"{server.shown_name} ({server.target}) {printable(f.busid)}"
                           for server, f in matches)
        raise identity.SeveralMatches(
            f"{len(matches)} servers offer {printable(str(spec))}: {listed} (give -r HOST, "
            "or --first)")
    return matches[0][1]


#: The host that means "wherever DNS-SD finds it": usbip://*/VID:PID[:SERIAL].
ANYWHERE = "*"


def locate(spec: DeviceSpec, *, tls: ssl.SSLContext | None, server_hostname: str | None,
           first: bool = False, browse_time: float = BROWSE_TIME) -> identity.Found:
    """The server DNS-SD finds that offers the device ``spec`` names (blocking: a
    browse on a loop of its own, then the device lists, as :func:`find_anywhere`)."""
    result: list[list[Found]] = []
    failure: list[BaseException] = []

    def run() -> None:
        try:
            result.append(asyncio.run(servers_for(browse_time, tls=tls is not None)))
        except BaseException as exc:  # (handed to the caller's thread)
            failure.append(exc)

    worker = threading.Thread(target=run, name="usbipy-browse")  # (whatever loop runs here)
    worker.start()
    worker.join()
    if failure:
        raise failure[0]
    list_fn, serial_fn = identity.sync_functions(tls, server_hostname, LIST_TIMEOUT)
    return find_anywhere(result[0], spec, first=first, list_devices=list_fn,
                         read_serial=serial_fn)


def as_json(answers: Sequence[ServerDevices], device: Any) -> list[dict[str, Any]]:
    """The fleet listing's JSON (stable: tests/unit/test_discovery.py checks its shape)."""
    return [{**a.server.as_dict(), "found_by": a.found_by, "error": a.error,
             "devices": [device(d) for d in a.devices] if a.devices is not None else None}
            for a in answers]
