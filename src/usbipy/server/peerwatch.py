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
from typing import Protocol

#: What poll(2) says when the peer is gone (POLLRDHUP is Linux's; elsewhere a FIN
#: alone is not seen, but a reset and the dead-peer timeout are).
_GONE = select.POLLHUP | select.POLLERR | getattr(select, "POLLRDHUP", 0)


class _Socket(Protocol):
    def fileno(self) -> int: ...
    def getsockopt(self, level: int, optname: int) -> int: ...


def peer_gone(sock: _Socket) -> OSError | None:
    """How the peer of ``sock`` left (an :class:`OSError` naming it), or None while
    it is still there."""
    fd = sock.fileno()
    if fd < 0:
        return ConnectionAbortedError(errno.ECONNABORTED, "the socket is closed")
    poller = select.poll()
    poller.register(fd, _GONE)
    ready = poller.poll(0)
    if not ready:
        return None
    events = ready[0][1]
    if events & select.POLLERR:
        err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err:
            return OSError(err, os.strerror(err))
    if events & select.POLLHUP and not events & getattr(select, "POLLRDHUP", 0):
        return ConnectionResetError(errno.ECONNRESET, os.strerror(errno.ECONNRESET))
    return ConnectionAbortedError(errno.ECONNABORTED, "the client closed the connection")
