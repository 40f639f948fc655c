"""What the server counts for its metrics: plain integers, kept on the event loop.

A URB adds to a dict entry or two (tens of nanoseconds); the metrics endpoint
(:mod:`usbipy.server.metrics`) turns these into Prometheus families when it is
scraped, so nothing of the exporter runs on the URB path.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from ..escape import printable
from ..policy.rules import Client
from ..protocol.constants import LINUX_ERRNO_NAME

#: Distinct (device, client) label values kept for imports_total.
MAX_CLIENTS = 1000


def status_name(status: int) -> str:
    """A URB status as its errno name: -32 is "EPIPE"."""
    return LINUX_ERRNO_NAME.get(-status, str(status))


def client_label(client: Client) -> str:
    """How metrics name a client: its certificate's CN (escaped: a label is read on
    terminals too), else its address."""
    return f"CN={printable(client.cn)}" if client.cn is not None else (
        str(client.address) if client.address is not None else "unknown")


def refusal_kind(why: str) -> str:
    """A refused TLS handshake's reason (server/tls.py's words) as a label value."""
    if "refused the TLS handshake" in why:
        return "refused_by_client"
    if "certificate" in why:
        return "certificate"
    if "does not speak TLS" in why:
        return "not_tls"
    if "timed out" in why:
        return "timeout"
    if "closed the connection" in why:
        return "closed"
    return "other"


@dataclass
class ServerStats:
    """Counters since the server started, by label values."""

    connections: int = 0
    #: (busid, client) -> imports
    imports: Counter[tuple[str, str]] = field(default_factory=Counter)
    #: (busid, "in" or "out") -> URBs and bytes
    urbs: Counter[tuple[str, str]] = field(default_factory=Counter)
    bytes: Counter[tuple[str, str]] = field(default_factory=Counter)
    #: (busid, errno name) -> URBs completed with that status
    errors: Counter[tuple[str, str]] = field(default_factory=Counter)
    #: reason -> TLS handshakes refused
    handshakes_refused: Counter[str] = field(default_factory=Counter)
    #: Devices bound to usbip-host by an export rule, and exported devices unplugged
    #: (their sessions ended), by busid.
    rule_binds: int = 0
    unplugged: Counter[str] = field(default_factory=Counter)

    def handshake_refused(self, why: str) -> None:
        self.handshakes_refused[refusal_kind(why)] += 1

    def imported(self, busid: str, client: Client) -> None:
        """An import, by device and client: the certificate's CN over TLS, else the
        address; past MAX_CLIENTS label values, "other" (a scrape stays small however
        many addresses come and go)."""
        key = (busid, client_label(client))
        if key not in self.imports and len(self.imports) >= MAX_CLIENTS:
            key = (busid, "other")
        self.imports[key] += 1
