"""The Prometheus metrics (``/metrics`` on usbipyd --http ADDR:PORT), with prometheus_client.

The server counts in plain integers on its loop (:class:`ServerStats`); a
scrape, in the endpoint's HTTP thread, asks the loop for a snapshot and turns
it into metric families. prometheus_client writes the text format, and its
WSGI app answers ``/metrics`` (and compressed, when asked) on the HTTP listener.

Exposed (all prefixed ``usbipy_``): ``devices_exported``, ``devices_imported``
{busid, client}, ``imports_total`` {busid, client}, ``connections_open`` and
``connections_total``, ``urbs_total`` and ``urb_bytes_total`` {busid,
direction}, ``urb_errors_total`` {busid, status}, ``urbs_in_flight`` {busid},
``tls_handshakes_refused_total`` {reason}, and ``capture_dropped_total`` with
a capture.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, make_wsgi_app
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from .resume import DOWN_BUCKETS
from .stats import client_label

if TYPE_CHECKING:
    from .server import UsbipServer

#: Seconds a scrape waits for the event loop's snapshot, and how old one may be.
SNAPSHOT_TIMEOUT = 5.0
SNAPSHOT_MAX_AGE = 1.0


@dataclass(frozen=True)
class Snapshot:
    """What a scrape shows, read on the loop in one go."""

    exported: int
    #: (busid, client) of every device imported now
    imported: list[tuple[str, str]]
    connections: int
    connections_total: int
    in_flight: dict[str, int]
    imports: dict[tuple[str, str], int]
    urbs: dict[tuple[str, str], int]
    bytes: dict[tuple[str, str], int]
    errors: dict[tuple[str, str], int]
    handshakes_refused: dict[str, int]
    capture_dropped: int | None
    #: Resumable attachments: whose client is away now, the bytes they keep, the
    #: resumptions (and how long each was down), and the windows that passed.
    resume_waiting: int = 0
    resume_buffered: int = 0
    resumed: int = 0
    resume_down_buckets: tuple[int, ...] = ()
    resume_down_sum: float = 0.0
    resume_expired: int = 0
    rule_binds: int = 0
    unplugged: dict[str, int] = field(default_factory=dict)


async def snapshot(server: UsbipServer) -> Snapshot:
    stats = server.stats
    assert stats is not None
    resumables = server.access.resumables
    exported = await server.registry.exported()
    imported: list[tuple[str, str]] = []
    in_flight: dict[str, int] = {}
    for conn in list(server.connections):
        if conn.device is not None:
            busid = conn.device.busid
            imported.append((busid, client_label(conn.client)))
            in_flight[busid] = conn.in_flight
    for busid, entry in server.access.handed_off.items():
        if not entry.pending:
            imported.append((busid, client_label(entry.client)))
    return Snapshot(
        len(exported), imported, len(server.connections), stats.connections, in_flight,
        dict(stats.imports), dict(stats.urbs), dict(stats.bytes), dict(stats.errors),
        dict(stats.handshakes_refused),
        server.capture.dropped if server.capture is not None else None,
        resumables.waiting, resumables.buffered, resumables.resumed,
        tuple(resumables.down_buckets), resumables.down_sum, resumables.expired,
        stats.rule_binds, dict(stats.unplugged))


class _ServerCollector(Collector):
    """Reads a snapshot on the loop, at most once a second (a flood of scrapes
    does not become a flood of device listings on the loop)."""

    def __init__(self, server: UsbipServer, loop: asyncio.AbstractEventLoop) -> None:
        self._server = server
        self._loop = loop
        self._lock = threading.Lock()
        self._cached: tuple[float, Snapshot] | None = None

    def _snapshot(self) -> Snapshot:
        with self._lock:
            now = time.monotonic()
            if self._cached is None or now - self._cached[0] >= SNAPSHOT_MAX_AGE:
                self._cached = (now, asyncio.run_coroutine_threadsafe(
                    snapshot(self._server), self._loop).result(SNAPSHOT_TIMEOUT))
            return self._cached[1]

    def collect(self) -> Iterator[Metric]:
        s = self._snapshot()
        yield GaugeMetricFamily("usbipy_devices_exported",
                                "Devices this server exports, held or not", s.exported)
        imported = GaugeMetricFamily("usbipy_devices_imported",
                                     "Devices imported now, by device and client",
                                     labels=["busid", "client"])
        for busid, client in s.imported:
            imported.add_metric([busid, client], 1)
        yield imported
        yield _counter("usbipy_imports", "Imports since the start, by device and client",
                       ["busid", "client"], s.imports)
        yield GaugeMetricFamily("usbipy_connections_open", "Client connections open now",
                                s.connections)
        yield CounterMetricFamily("usbipy_connections", "Client connections accepted",
                                  s.connections_total)
        yield _counter("usbipy_urbs", "URBs submitted, by device and direction",
                       ["busid", "direction"], s.urbs)
        yield _counter("usbipy_urb_bytes", "Bytes moved by URBs, by device and direction",
                       ["busid", "direction"], s.bytes)
        yield _counter("usbipy_urb_errors", "URBs that ended with an error status",
                       ["busid", "status"], s.errors)
        in_flight = GaugeMetricFamily("usbipy_urbs_in_flight", "URBs the device has not "
                                      "finished", labels=["busid"])
        for busid, count in s.in_flight.items():
            in_flight.add_metric([busid], count)
        yield in_flight
        yield _counter("usbipy_tls_handshakes_refused", "TLS handshakes refused, by reason",
                       ["reason"], {(k,): v for k, v in s.handshakes_refused.items()})
        yield GaugeMetricFamily("usbipy_resume_waiting", "Resumable attachments whose client "
                                "is away now, kept for their resume window", s.resume_waiting)
        yield GaugeMetricFamily("usbipy_resume_buffer_bytes", "Bytes the resumable "
                                "attachments keep until their clients have them",
                                s.resume_buffered)
        yield CounterMetricFamily("usbipy_resume_expired", "Resumable attachments released "
                                  "because their window passed", s.resume_expired)
        down = HistogramMetricFamily(
            "usbipy_resumed_down_seconds", "Connections resumed, by how long they were down",
            buckets=[(("+Inf" if bound == float("inf") else f"{bound:g}"), count)
                     for bound, count in zip(DOWN_BUCKETS, s.resume_down_buckets,
                                             strict=True)] or [("+Inf", 0)],
            sum_value=s.resume_down_sum)
        yield down
        yield CounterMetricFamily("usbipy_rule_binds", "Devices bound to usbip-host by an "
                                  "export rule as they appeared", s.rule_binds)
        yield _counter("usbipy_devices_unplugged", "Exported devices unplugged (their "
                       "sessions ended), by device", ["busid"],
                       {(k,): v for k, v in s.unplugged.items()})
        if s.capture_dropped is not None:
            yield CounterMetricFamily("usbipy_capture_dropped",
                                      "Capture records dropped (the disk was behind)",
                                      s.capture_dropped)


def _counter(name: str, documentation: str, labels: list[str],
             values: dict[Any, int]) -> CounterMetricFamily:
    family = CounterMetricFamily(name, documentation, labels=labels)
    for key, value in values.items():
        family.add_metric(list(key), value)
    return family


def metrics_app(server: UsbipServer, loop: asyncio.AbstractEventLoop
                ) -> Callable[..., Iterable[bytes]]:
    """The WSGI app of ``/metrics`` (the HTTP listener, :mod:`.http`, routes to it)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_ServerCollector(server, loop))
    app: Callable[..., Iterable[bytes]] = make_wsgi_app(registry)
    return app
