"""Whether a socket's peer is gone, asked without reading from the socket.

A connection whose reading is paused (flow control: too many URBs in flight,
too much OUT data held, replies its client does not take) is no longer
watched by the event loop, so neither the client's FIN nor its reset, nor
keepalive giving up on it, reaches the protocol: the socket would sit in
CLOSE-WAIT holding its device for ever. The server therefore looks at such a
socket itself, on a timer, with poll(2) and a zero timeout:

- POLLRDHUP (Linux): the peer's FIN, even with unread URBs queued before it;
- POLLHUP and POLLERR: a reset, or TCP keepalive / TCP_USER_TIMEOUT giving up
  (:mod:`usbipy.keepalive`), with the reason in SO_ERROR.

Nothing is read, so flow control keeps its meaning. Why a timer rather than
a watch on the descriptor: the descriptor is readable (the unread URBs wait
in it), so a level-triggered watch would fire at once and for ever.
"""

from __future__ import annotations

import errno
import os
import select
import socket
import struct
from typing import Any, Protocol

#: What poll(2) says when the peer is gone (POLLRDHUP is Linux's; elsewhere a FIN
#: alone is not seen, but a reset and the dead-peer timeout are).
_RDHUP: int = getattr(select, "POLLRDHUP", 0)
_GONE = select.POLLHUP | select.POLLERR | _RDHUP


class _Socket(Protocol):
    def fileno(self) -> int: ...
    def getsockopt(self, level: int, optname: int, buflen: int = ..., /) -> Any: ...


def peer_gone(sock: _Socket) -> OSError | None:
    """How the peer of ``sock`` left (an :class:`OSError` naming it), or None while
    it is still there (or when nothing certain is seen)."""
    fd = sock.fileno()
    if fd < 0:
        return None
    poller = select.poll()
    poller.register(fd, _GONE)
    ready = poller.poll(0)
    if not ready:
        return None
    events = ready[0][1]
    if events & select.POLLNVAL:
        return None  # (not a socket of ours any more: the transport is closing)
    if events & select.POLLERR:
        err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err:
            return OSError(err, os.strerror(err))
    if events & _RDHUP:
        return ConnectionAbortedError(errno.ECONNABORTED, "the client closed the connection")
    if events & select.POLLHUP:
        return ConnectionResetError(errno.ECONNRESET, os.strerror(errno.ECONNRESET))
    return None


#: struct tcp_info's tcpi_bytes_acked (include/uapi/linux/tcp.h, Linux 4.1): a u64 at
#: this offset, which the kernel fills in for getsockopt(TCP_INFO) of at least
#: _TCP_INFO_SIZE bytes.
_BYTES_ACKED = struct.Struct("=Q")
_BYTES_ACKED_OFFSET = 120
_TCP_INFO_SIZE = 128


def bytes_acked(sock: _Socket) -> int | None:
    """Bytes of ours the peer's TCP has acknowledged so far: it grows while the peer
    takes what the server sends (into its receive buffer, at least), and stops
    when the peer reads nothing. None where TCP_INFO does not tell (not Linux,
    not TCP)."""
    tcp_info = getattr(socket, "TCP_INFO", None)
    if tcp_info is None:
        return None
    try:
        info = sock.getsockopt(socket.IPPROTO_TCP, tcp_info, _TCP_INFO_SIZE)
    except OSError:
        return None
    if not isinstance(info, bytes) or len(info) < _TCP_INFO_SIZE:
        return None
    return int(_BYTES_ACKED.unpack_from(info, _BYTES_ACKED_OFFSET)[0])
