"""What a server exposed to a network holds back: connection caps, an accept
rate, and time limits on the OP phase.

Every accepted connection is admitted or closed at once by
:class:`Admission`, counted against its client (an IPv4 address, an IPv6
/64) from accept until it is gone. The defaults are far above what a lab
does and far below what exhausts the server's descriptors or loop.
"""

from __future__ import annotations

import ipaddress
import logging
import time
from collections import Counter
from collections.abc import Callable

from ..config.limits import Limits
from ..escape import printable

log = logging.getLogger("usbipy.server")


def client_key(addr: object) -> str:
    """Whom a connection counts against: its IPv4 address, or its IPv6 /64 (one
    host commonly holds a whole /64, so per-address counts would not hold it)."""
    host = str(addr[0]) if isinstance(addr, tuple) else str(addr)
    try:
        ip = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return host
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return host


class _Bucket:
    """A token bucket: ``burst`` tokens, refilled at ``rate`` per second."""

    __slots__ = ("tokens", "stamp")

    def __init__(self, burst: int, now: float) -> None:
        self.tokens = float(burst)
        self.stamp = now


class RateLimitedLog:
    """Warnings of one kind at most once per 10 s: a flood writes a line, not a line
    per connection."""

    def __init__(self) -> None:
        self._reported: dict[str, float] = {}
        self._suppressed: Counter[str] = Counter()

    #: Kinds remembered at most (a kind may name a client address).
    MAX_KINDS = 4096

    def warning(self, kind: str, text: str) -> None:
        now = time.monotonic()
        if now - self._reported.get(kind, -10.0) < 10:
            self._suppressed[kind] += 1
            return
        if len(self._reported) >= self.MAX_KINDS:
            self._reported.clear()
            self._suppressed.clear()
        self._reported[kind] = now
        more = self._suppressed.pop(kind, 0)
        log.warning("%s%s", text, f" (and {more} more like it)" if more else "")


class Slot:
    """One admitted connection, counted against its client until released."""

    __slots__ = ("_admission", "client", "_released")

    def __init__(self, admission: Admission, client: str) -> None:
        self._admission = admission
        self.client = client
        self._released = False

    def release(self) -> None:
        """The connection is gone (idempotent)."""
        if not self._released:
            self._released = True
            self._admission._leave(self)


#: TLS handshakes in progress at most, in all and from one address (an IPv6 /64):
#: each holds a socket for up to the handshake timeout.
MAX_HANDSHAKES = 256
MAX_HANDSHAKES_PER_ADDRESS = 16


class Admission:
    """Which new connections are taken, and how many each client holds: every
    decision on a new connection is made here (:meth:`accept`).

    At the total cap, a new connection takes the place of the one that has
    waited longest without sending its request: connections that send
    nothing can fill the table, but never keep a real client out. TLS
    handshakes in progress are capped per address (beyond, refused) and in all
    (beyond, the oldest makes room: stalled handshakes never keep a real
    client out).
    """

    #: Buckets kept at most (a flood from many addresses must not grow them
    #: without bound); full buckets of idle clients are dropped first.
    MAX_BUCKETS = 65536

    def __init__(self, limits: Limits, log: RateLimitedLog | None = None) -> None:
        self.limits = limits
        #: Where refusals and evictions are told, at most once per 10 s per kind.
        self.log = log if log is not None else RateLimitedLog()
        self.connections = 0
        #: Connections closed to make room for new ones, since the start.
        self.evicted = 0
        self._per_client: Counter[str] = Counter()
        self._buckets: dict[str, _Bucket] = {}
        #: Connections still waiting for their request, oldest first, and how to
        #: close each.
        self._waiting: dict[Slot, Callable[[], object]] = {}
        #: Connections in their TLS handshake, oldest first, and how to end each.
        self._handshakes: dict[Slot, Callable[[], object]] = {}

    def accept(self, client: str, shown: str, *, handshake: bool = False) -> Slot | None:
        """The decision on a new connection from ``client`` (its :func:`client_key`;
        ``shown``: its address for the log): its slot, or None when it is refused
        (the log says why). ``handshake``: it begins with a TLS handshake."""
        if handshake and self.handshakes_from(client) >= MAX_HANDSHAKES_PER_ADDRESS:
            # (before admission: a refused newcomer must not make anyone room)
            self.log.warning(
                "handshakes", f"{printable(client)}: too many TLS handshakes in progress from "
                              f"this address (at most {MAX_HANDSHAKES_PER_ADDRESS}): "
                              "connection closed")
            return None
        evicted = self.evicted
        slot = self.admit(client)
        if isinstance(slot, str):
            self.log.warning("admission", f"{shown}: connection refused: {slot}")
            return None
        if self.evicted != evicted:
            self.log.warning("eviction", f"{self.connections} connections in all "
                                         "(max_connections): the one that waited longest "
                                         "for its request was closed to make room")
        return slot

    def handshaking(self, slot: Slot, end: Callable[[], object]) -> None:
        """``slot``'s connection is in its TLS handshake; ``end`` ends it. At the cap,
        the oldest handshake is ended to make room."""
        if len(self._handshakes) >= MAX_HANDSHAKES:
            oldest = next(iter(self._handshakes))
            self._handshakes.pop(oldest)()
            self.log.warning("handshake eviction", f"{MAX_HANDSHAKES} TLS handshakes in "
                                                   "progress: the oldest was closed to make "
                                                   "room")
        self._handshakes[slot] = end

    def handshake_over(self, slot: Slot) -> None:
        """``slot``'s handshake ended, whichever way."""
        self._handshakes.pop(slot, None)

    @property
    def handshakes(self) -> int:
        """TLS handshakes in progress."""
        return len(self._handshakes)

    def handshakes_from(self, client: str) -> int:
        return sum(slot.client == client for slot in self._handshakes)

    def admit(self, client: str) -> Slot | str:
        """Count a new connection from ``client``; or say why it is refused."""
        limits = self.limits
        now = time.monotonic()
        bucket = self._buckets.get(client)
        if bucket is None:
            if len(self._buckets) >= self.MAX_BUCKETS:
                self._prune(now)
            bucket = self._buckets[client] = _Bucket(limits.accept_burst, now)
        else:
            bucket.tokens = min(float(limits.accept_burst),
                                bucket.tokens + (now - bucket.stamp) * limits.accept_rate)
            bucket.stamp = now
        if bucket.tokens < 1:
            return (f"more than {limits.accept_rate:g} new connections a second "
                    "(accept_rate)")
        bucket.tokens -= 1
        if self._per_client[client] >= limits.max_connections_per_address:
            return (f"{self._per_client[client]} connections from this address "
                    "(max_connections_per_address)")
        if self.connections >= limits.max_connections:
            if not self._waiting:
                return f"{self.connections} connections in all (max_connections)"
            oldest, close = next(iter(self._waiting.items()))
            self.evicted += 1
            oldest.release()
            close()
        self.connections += 1
        self._per_client[client] += 1
        return Slot(self, client)

    def waiting(self, slot: Slot, close: Callable[[], object]) -> None:
        """``slot``'s connection waits for its request; ``close`` ends it."""
        self._waiting[slot] = close

    def served(self, slot: Slot) -> None:
        """``slot``'s connection sent its request (or is gone)."""
        self._waiting.pop(slot, None)

    def _leave(self, slot: Slot) -> None:
        self._waiting.pop(slot, None)
        self._handshakes.pop(slot, None)
        client = slot.client
        self.connections -= 1
        self._per_client[client] -= 1
        if not self._per_client[client]:
            del self._per_client[client]

    def held(self, client: str) -> int:
        return self._per_client[client]

    def _prune(self, now: float) -> None:
        limits = self.limits
        for client, bucket in list(self._buckets.items()):
            refilled = bucket.tokens + (now - bucket.stamp) * limits.accept_rate
            if refilled >= limits.accept_burst and client not in self._per_client:
                del self._buckets[client]
        if len(self._buckets) >= self.MAX_BUCKETS:  # all busy: forget the oldest half
            for client in list(self._buckets)[:self.MAX_BUCKETS // 2]:
                del self._buckets[client]
