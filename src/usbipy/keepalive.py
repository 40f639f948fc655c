"""How a dead peer is noticed: TCP keepalive and TCP_USER_TIMEOUT on every socket.

USB/IP sends nothing while a device is idle, so a peer that vanished without
a FIN (a cable pulled, a laptop asleep, a firewall that forgot the flow) is
noticed by nobody: the C tools set no keepalive, and usbip-host then keeps
the device "in use" for as long as the socket lives. These options are set
on every socket usbipy accepts or connects *before* it is handed to
vhci-hcd or usbip-host; they stay in force once the kernel owns the socket
(sockfd_lookup() takes the socket as it is), so the kernel's own data path
gives up on a silent peer within the same bound.

Two mechanisms together, because each covers what the other cannot:

- keepalive probes an idle connection (nothing in flight): after ``idle``
  seconds of silence, a probe every ``interval`` seconds;
- TCP_USER_TIMEOUT (RFC 5482, tcp(7)) bounds how long sent data may stay
  unacknowledged: a URB sent into a dead network fails instead of being
  retransmitted for the default 15 minutes. On Linux it also decides when
  unanswered keepalive probes end the connection.
"""

from __future__ import annotations

import math
import socket
from dataclasses import dataclass

#: Seconds after which a silent peer is given up, unless configured otherwise.
DEFAULT_TIMEOUT = 15.0


@dataclass(frozen=True)
class Keepalive:
    """Dead-peer detection that ends a connection after about ``timeout`` seconds
    of silence from the peer (``timeout`` to ``timeout + interval`` when idle)."""

    timeout: float = DEFAULT_TIMEOUT

    def __post_init__(self) -> None:
        if not 0 < self.timeout <= 3600:
            raise ValueError(f"a dead-peer timeout of {self.timeout:g} s is out of range "
                             "(more than 0, at most 3600)")

    @property
    def idle(self) -> int:
        """Seconds of silence before the first probe (TCP_KEEPIDLE)."""
        return max(1, int(self.timeout // 3))

    @property
    def interval(self) -> int:
        """Seconds between probes (TCP_KEEPINTVL)."""
        return max(1, int(self.timeout // 6))

    @property
    def count(self) -> int:
        """Probes unanswered before the end (TCP_KEEPCNT); with a user timeout set,
        Linux ends the connection at that timeout instead, whichever the count."""
        return max(1, math.ceil((self.timeout - self.idle) / self.interval))

    @property
    def user_timeout_ms(self) -> int:
        return max(1, int(self.timeout * 1000))

    def apply(self, sock: socket.socket) -> None:
        """Set the options on a TCP socket (others, a Unix socket in a test, are left)."""
        if sock.family not in (socket.AF_INET, socket.AF_INET6) or (
                sock.type != socket.SOCK_STREAM):
            return
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        # (macOS names the idle time TCP_KEEPALIVE and has no user timeout; the
        # userspace client runs there too)
        idle = getattr(socket, "TCP_KEEPIDLE", getattr(socket, "TCP_KEEPALIVE", None))
        for option, value in ((idle, self.idle),
                              (getattr(socket, "TCP_KEEPINTVL", None), self.interval),
                              (getattr(socket, "TCP_KEEPCNT", None), self.count),
                              (getattr(socket, "TCP_USER_TIMEOUT", None),
                               self.user_timeout_ms)):
            if option is not None:
                sock.setsockopt(socket.IPPROTO_TCP, option, value)

    def __str__(self) -> str:
        return (f"a silent peer is given up after {self.timeout:g} s (keepalive "
                f"{self.idle}/{self.interval}/{self.count}, TCP_USER_TIMEOUT "
                f"{self.user_timeout_ms} ms)")


DEFAULT = Keepalive()
