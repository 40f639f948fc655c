"""What a server exposed to a network holds back: the numbers (the server's
:mod:`usbipy.server.limits` enforces them)."""

from __future__ import annotations

from dataclasses import dataclass

from ..keepalive import DEFAULT_TIMEOUT, Keepalive


@dataclass(frozen=True)
class Limits:
    #: Connections at once, all clients together (TLS handshakes included).
    max_connections: int = 1000
    #: Connections at once from one client address (an IPv6 /64).
    max_connections_per_address: int = 64
    #: New connections per second one client address may open, on average...
    accept_rate: float = 20.0
    #: ...and in a burst.
    accept_burst: int = 100
    #: Seconds a connection has to send its first complete OP request.
    request_timeout: float = 30.0
    #: Seconds a connection in the OP phase may send nothing.
    idle_timeout: float = 10.0
    #: Seconds of silence after which a peer is taken for dead, on every connection
    #: (those handed to usbip-host too): TCP keepalive and TCP_USER_TIMEOUT, see
    #: :mod:`usbipy.keepalive`.
    dead_peer_timeout: float = DEFAULT_TIMEOUT
    #: Seconds a resumable attachment (usbipy's client) outlives its lost
    #: connection, its device held, waiting for the client to resume; 0: none is
    #: offered.
    resume_window: float = 60.0
    #: Bytes one resumable attachment keeps until its client has them (what a
    #: resume sends again): while connected, more waits; while away, more ends it.
    resume_buffer: int = 8 << 20
    #: ...and all of them together.
    resume_buffers: int = 256 << 20

    def __post_init__(self) -> None:
        self.keepalive  # noqa: B018 (checked here, not in the accept loop: ValueError)

    @property
    def keepalive(self) -> Keepalive:
        """The socket options for ``dead_peer_timeout``."""
        return Keepalive(self.dead_peer_timeout)
