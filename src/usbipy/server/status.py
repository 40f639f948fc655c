"""Who holds what: every exported device with its state, for the status API and page.

Built on the loop from the server's own records (the registry's holders, the
sessions handed to the kernel); the two blocking reads, usbip-host's
usbip_status and the export rules' sysfs facts, go to a worker thread. A device
is ``available``, ``in-use`` (a client imported it through this process),
``served-by-kernel`` (usbip-host serves a client this server handed it to) or
``gone`` (unplugged lately, shown for :data:`GONE_KEPT` seconds).

The JSON is version 1 of the API (``/api/v1/status``); its shape is tested
(tests/unit/test_status_api.py) and documented in the README.
"""

from __future__ import annotations

import asyncio
import datetime
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..backends.base import AnyDevice, HandOffDevice
from ..escape import printable
from ..linux.usbids import UsbIds, system_ids
from ..policy import Client, Grant
from ..protocol import OpStatus
from ..usb.speed import Speed
from .access import facts_of

if TYPE_CHECKING:
    from .server import UsbipServer

log = logging.getLogger("usbipy.server")

#: Seconds a reading of the devices serves every page and request (the event streams
#: look twice a second: this many pages cost one reading).
SNAPSHOT_AGE = 0.4
#: Seconds a device no longer exported is still shown, as gone; and how many are kept.
GONE_KEPT = 600.0
GONE_MAX = 64


def iso(when: float) -> str:
    """A time.time() as the API writes it: UTC, to the second, "Z"."""
    return datetime.datetime.fromtimestamp(when, datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass(frozen=True)
class Viewer:
    """Who asks: the client (over TLS, its certificate), and what every device grants
    it regardless of the policy (loopback: admin; the machine's own users)."""

    client: Client
    everywhere: Grant | None = None

    def grant(self, server: UsbipServer, device: AnyDevice) -> Grant | None:
        if self.everywhere is not None:
            return self.everywhere
        return server.access.policy.grant(self.client, facts_of(device))

    def may_view(self, server: UsbipServer) -> bool:
        """Whether any rule grants this client anything (the page itself, and a server
        with no device yet; each device is decided on its own)."""
        return self.everywhere is not None or server.access.policy.grants_anything(self.client)

    def may_view_all(self, server: UsbipServer) -> bool:
        """Whether a rule grants this client every device (what the metrics show)."""
        return self.everywhere is not None or server.access.policy.grants_everything(
            self.client)


@dataclass
class _Gone:
    record: dict[str, Any]
    at: float


@dataclass
class StatusBoard:
    """The server's status, as the API shows it. One per server; kept on the loop."""

    server: UsbipServer
    #: The name the page and DNS-SD show.
    name: str
    version: str
    #: busid -> the export rule that made usbipyd export it ("usbipyd.toml line 12"),
    #: read in a worker thread (sysfs); None: no rules here.
    rule_of: Callable[[list[str]], Mapping[str, str]] | None = None
    #: The other servers DNS-SD found (name, host, port, tls, page), or nothing.
    peers: Callable[[], list[dict[str, Any]]] = list
    _gone: dict[str, _Gone] = field(default_factory=dict)
    _last: dict[str, dict[str, Any]] = field(default_factory=dict)
    _rules: tuple[frozenset[str], Mapping[str, str]] = (frozenset(), {})
    _ids: UsbIds | None = None
    _snapshot: tuple[float, list[tuple[AnyDevice, dict[str, Any]]]] | None = None
    _reading: asyncio.Future[list[tuple[AnyDevice, dict[str, Any]]]] | None = None

    def gone(self, busid: str) -> None:
        """A device left (the export engine saw it unplugged)."""
        last = self._last.pop(busid, None)
        if last is not None:
            self._keep_gone(busid, last)

    def _keep_gone(self, busid: str, last: dict[str, Any]) -> None:
        record = {**{k: v for k, v in last.items() if k != "releasable"}, "state": "gone",
                  "client": None, "can_release": False}
        self._gone[busid] = _Gone(record, time.time())
        while len(self._gone) > GONE_MAX:
            del self._gone[next(iter(self._gone))]

    async def devices(self) -> list[tuple[AnyDevice, dict[str, Any]]]:
        """Every exported device and its record (without what a viewer may do): read
        at most every :data:`SNAPSHOT_AGE` seconds, however many pages are open."""
        now = time.monotonic()
        if self._snapshot is not None and now - self._snapshot[0] < SNAPSHOT_AGE:
            return self._snapshot[1]
        if self._reading is None:
            self._reading = asyncio.ensure_future(self._read())
        reading = self._reading
        try:
            found = await asyncio.shield(reading)
        finally:
            if reading.done() and self._reading is reading:
                self._reading = None
        self._snapshot = (time.monotonic(), found)
        return found

    async def _read(self) -> list[tuple[AnyDevice, dict[str, Any]]]:
        server = self.server
        if self._ids is None:
            self._ids = await asyncio.to_thread(system_ids)
        exported = await server.registry.exported()
        busids = [d.busid for d in exported]
        hand_offs = [d for d in exported if isinstance(d, HandOffDevice)]
        kernel_busy: set[str] = set()
        if hand_offs:  # (usbip_status is a sysfs read)
            kernel_busy = set(await asyncio.to_thread(lambda: [
                d.busid for d in hand_offs if d.import_status() is OpStatus.DEV_BUSY]))
        rules = await self._rules_for(busids)
        holders = {conn.device.busid: conn for conn in server.connections
                   if conn.device is not None}
        found = []
        for device in exported:
            record = self._record(device, rules.get(device.busid))
            conn = holders.get(device.busid)
            handed = server.access.handed_off.get(device.busid)
            if conn is not None:
                record["state"] = "in-use"
                record["client"] = _holder(conn.client, conn.imported_at, conn.bytes_in,
                                           conn.bytes_out, conn.tls is not None)
            elif device.busid in kernel_busy:
                record["state"] = "served-by-kernel"
                if handed is not None and not handed.pending:
                    record["client"] = _holder(handed.client, handed.since, None, None,
                                               handed.protected)
                else:  # (a session this usbipyd did not start: it cannot release it)
                    record["client"] = _stranger()
                    record["releasable"] = False
            elif server.registry.owner(device.busid) is not None:
                # (held by an attachment whose client is away, kept for it to resume)
                record["state"] = "in-use"
                record["client"] = _stranger()
            found.append((device, record))
        now = time.time()
        present = set(busids)
        for busid, last in list(self._last.items()):
            if busid not in present:
                self._keep_gone(busid, last)
        self._last = {d.busid: r for d, r in found}
        for busid in list(self._gone):
            if busid in present or now - self._gone[busid].at > GONE_KEPT:
                del self._gone[busid]
        return found

    async def _rules_for(self, busids: list[str]) -> Mapping[str, str]:
        if self.rule_of is None:
            return {}
        key = frozenset(busids)
        if key != self._rules[0]:  # (sysfs once per change of the device set)
            rule_of = self.rule_of
            try:
                self._rules = (key, await asyncio.to_thread(rule_of, busids))
            except OSError as exc:
                log.warning("cannot read the export rules' devices: %s", exc)
                self._rules = (key, {})
        return self._rules[1]

    def _record(self, device: AnyDevice, rule: str | None) -> dict[str, Any]:
        info = device.info
        ids = self._ids
        vendor = ids.vendors.get(info.idVendor) if ids is not None else None
        product = ids.products.get((info.idVendor, info.idProduct)) if ids is not None else None
        try:
            speed = Speed(info.speed).name.lower().replace("_", "-")
        except ValueError:
            speed = "unknown"
        return {"busid": device.busid, "vid_pid": f"{info.idVendor:04x}:{info.idProduct:04x}",
                "vendor": vendor, "product": product, "serial": device.serial,
                "speed": speed, "via": device.via, "state": "available", "rule": rule,
                "client": None, "can_release": False}

    async def status(self, viewer: Viewer) -> dict[str, Any]:
        """What ``viewer`` may see: the devices some rule grants it, and the server."""
        server = self.server
        shown = []
        best: Grant | None = viewer.everywhere
        for device, record in await self.devices():
            grant = viewer.grant(server, device)
            if grant is None:
                continue
            best = grant if best is None else max(best, grant)
            releasable = record.get("releasable", True)
            shown.append({**{k: v for k, v in record.items() if k != "releasable"},
                          "can_release": grant is Grant.ADMIN and releasable
                          and record["state"] in ("in-use", "served-by-kernel")})
        for busid, gone in self._gone.items():
            if viewer.everywhere is not None or _facts_grant(server, viewer, gone.record,
                                                             busid):
                shown.append(gone.record)
        return {
            "api": 1,
            "server": {"name": self.name, "version": self.version,
                       "tls": server.tls is not None,
                       "addresses": sorted({host for host, _port in server.addresses}),
                       "port": server.port},
            "you": {"client": viewer.client.name,
                    "grant": best.word if best is not None else None},
            "devices": shown,
            "servers": self.peers(),
        }

    async def release(self, busid: str, by: str) -> str:
        """End the session that holds ``busid``: the client loses the device. Returns
        the client's name; raises LookupError when no client holds it."""
        server = self.server
        shown = printable(busid)
        for conn in list(server.connections):
            if conn.device is not None and conn.device.busid == busid:
                log.warning("%s: released from %s by %s (status page)", shown, conn.peer, by)
                conn.close()
                self._snapshot = None
                return conn.client.name
        entry = server.access.handed_off.get(busid)
        if entry is not None and not entry.pending and isinstance(entry.device, HandOffDevice):
            device = entry.device
            status = await asyncio.to_thread(device.import_status)
            if status is OpStatus.DEV_BUSY and server.access.handed_off.get(busid) is entry:
                del server.access.handed_off[busid]
                try:
                    await asyncio.to_thread(device.take_back)
                except OSError as exc:
                    server.access.handed_off.setdefault(busid, entry)
                    raise LookupError(f"{busid}: its session cannot be ended: "
                                      f"{exc.strerror or exc}") from None
                self._snapshot = None
                log.warning("%s: released from %s (served by the kernel) by %s (status "
                            "page)", shown, entry.peer, by)
                return entry.client.name
        owner = server.registry.owner(busid)
        close = getattr(owner, "close", None)
        if owner is not None and callable(close):  # (an attachment kept for its client)
            log.warning("%s: its kept attachment released by %s (status page)", shown, by)
            close()
            return "a client away"
        raise LookupError(f"{busid} is not in use")


def _facts_grant(server: UsbipServer, viewer: Viewer, record: dict[str, Any],
                 busid: str) -> bool:
    from ..policy import DeviceFacts

    vendor, product = (int(part, 16) for part in record["vid_pid"].split(":"))
    facts = DeviceFacts(busid, vendor, product, record.get("serial"))
    return server.access.policy.grant(viewer.client, facts) is not None


def _holder(client: Client, since: float | None, bytes_in: int | None,
            bytes_out: int | None, protected: bool) -> dict[str, Any]:
    when = since if since is not None else time.time()
    return {"address": str(client.address) if client.address is not None else None,
            "cn": client.cn, "since": iso(when),
            "seconds": round(max(0.0, time.time() - when), 1),
            "bytes_in": bytes_in, "bytes_out": bytes_out, "protected": protected}


def _stranger() -> dict[str, Any]:
    """A session this process did not start (before a restart, or C usbipd's)."""
    return {"address": None, "cn": None, "since": None, "seconds": None,
            "bytes_in": None, "bytes_out": None, "protected": False}
