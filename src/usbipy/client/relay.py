"""The client's end of a resumable attachment: a relay between a local stream
socket and the server, which outlives the TCP connection.

vhci-hcd (or the userspace client) holds one end of a socketpair, and sees one
unbroken USB/IP stream; the relay holds the other end and the connection to
usbipyd, and speaks the framed stream of :mod:`usbipy.protocol.resume`. When
the connection is lost (an error, or the dead-peer timeout of its keepalive),
the relay stops forwarding (vhci-hcd sees a stall, which it waits out), dials
again with backoff, and resumes with the token: each side sends what the
other missed. Only when the server's window has passed, or the server
refuses, does it end, and the attachment ends as it would have without it.

It copies every byte once each way, in large reads, and never parses a URB.
Blocking: it runs in the keeper's process (or a thread of the userspace
client), woken by a file descriptor to stop.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import select
import socket
import ssl
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from ..errors import UsbipError
from ..escape import printable
from ..keepalive import Keepalive
from ..protocol import ClientConnection, DeviceInfo, RemoteProtocolError
from ..protocol.messages import ResumeGrant
from ..protocol.resume import ResumableStream
from ..tls import TlsSession, handshake_failure
from .errors import ClientError, TlsRefused
from .handshake import ResumeRefused, connect, import_offering_resume, request_resume

log = logging.getLogger("usbipy.persistent.relay")

#: Bytes read at once from either side. Below glibc's mmap threshold (128 KiB), a
#: read's buffer comes from the heap; a larger one is mapped, faulted in and
#: unmapped for every read that returns less: 30 µs a read, against 5 µs here.
READ_SIZE = 64 << 10
#: Bytes this end keeps for a resend, at most: beyond it, the local side waits.
BUFFER = 8 << 20
#: Bytes queued for a side that does not take them, before the other side waits.
QUEUED = 1 << 20
#: Seconds between ACKs of a trickle (below ACK_EVERY).
ACK_INTERVAL = 0.5
#: Seconds the server's last replies have to reach the local side after its FIN.
DRAIN_TIMEOUT = 5.0
#: Seconds an attempt to reconnect may take (then the next one, with backoff).
CONNECT_TIMEOUT = 5.0
#: Connections in a row that close with no answer to OP_REQ_RESUME before the relay
#: gives up: what a port forward (ssh -L, a container's) does once the server
#: behind it is gone, where no connection is refused.
UNANSWERED = 3
#: Seconds between attempts to reconnect: the first, and the longest.
RETRY_FIRST = 0.5
RETRY_MAX = 5.0
#: The window is counted from our side's loss; the server's started later (it
#: noticed later, if at all), so a last attempt just after ours ends is worth it.
WINDOW_SLACK = 2.0

_LOST = select.POLLHUP | select.POLLERR
_WOULD_BLOCK = (BlockingIOError, InterruptedError, ssl.SSLWantReadError, ssl.SSLWantWriteError)


@dataclass
class RelayState:
    """What `usbipy port` shows: since when the connection is down (wall clock),
    and how often it was resumed."""

    down_since: float | None = None
    resumed: int = 0


class Relay:
    """Carries one resumable attachment between ``local`` and the server.

    ``connect()`` dials the server again (TCP, TLS, keepalive: as the first
    connection) and returns the socket, or raises OSError/UsbipError.

    With no ``grant`` (a server that does not resume) it copies the bytes as they
    are, and ends with the connection: for a userspace TLS connection, which
    the other end cannot read itself.
    """

    def __init__(self, local: socket.socket, remote: socket.socket, grant: ResumeGrant | None,
                 connect: Callable[[], socket.socket], *, what: str = "the device",
                 buffer: int = BUFFER,
                 on_change: Callable[[RelayState], None] | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.local = local
        self.remote: socket.socket | None = remote
        self.grant = grant
        self._connect = connect
        self._what = what
        self._buffer = buffer
        self.on_change = on_change
        self._clock = clock
        self.stream = ResumableStream()
        self.state = RelayState()
        self._to_remote: deque[memoryview] = deque()
        self._to_remote_size = 0
        self._to_local: deque[memoryview] = deque()
        self._to_local_size = 0
        self._down_at: float | None = None
        self._finished_at: float | None = None
        self._unanswered = 0
        self._retry_at = 0.0
        self._retry_delay = RETRY_FIRST
        self._last_ack = clock()
        local.setblocking(False)
        remote.setblocking(False)

    # --- the loop --------------------------------------------------------------------

    def run(self, wake: int) -> str | None:
        """Relay until the attachment ends (the reason) or ``wake`` is readable (None:
        stopped; then :meth:`finish`)."""
        poller = select.poll()
        poller.register(wake, select.POLLIN)
        #: fd -> the events it is registered for (changed only when they change)
        masks: dict[int, int] = {}

        def want(fd: int, mask: int) -> None:
            if masks.get(fd) != mask:
                poller.register(fd, mask)  # (registers, or modifies)
                masks[fd] = mask

        while True:
            local_fd = self.local.fileno()
            want(local_fd, (select.POLLIN if self._may_read_local() else 0)
                 | (select.POLLOUT if self._to_local else 0) | _LOST)
            remote = self.remote
            remote_fd = -1
            if remote is not None and not self.stream.finished:
                remote_fd = remote.fileno()
                want(remote_fd, (select.POLLIN if self._to_local_size < QUEUED else 0)
                     | (select.POLLOUT if self._to_remote else 0))
            for fd in [fd for fd in masks if fd not in (local_fd, remote_fd)]:
                poller.unregister(fd)  # (a connection lost: its fd may be closed)
                del masks[fd]
            events = dict(poller.poll(self._timeout() * 1000))
            if wake in events:
                return None
            try:
                ended = self._service(events)
            except ResumeRefused as exc:
                return str(exc)
            if ended is not None:
                return ended

    def _timeout(self) -> float:
        now = self._clock()
        if self.remote is None:
            return max(0.0, min(self._retry_at, self._deadline()) - now)
        if self.grant is None:
            return 60.0
        if self.stream.ack_pending:
            return max(0.0, self._last_ack + ACK_INTERVAL - now)
        return 60.0

    def _deadline(self) -> float:
        assert self._down_at is not None and self.grant is not None
        return self._down_at + self.grant.window + WINDOW_SLACK

    def _may_read_local(self) -> bool:
        return (self.stream.unacked < self._buffer and self._to_remote_size < QUEUED)

    def _service(self, events: dict[int, int]) -> str | None:
        # What is read is written on at once, in the same round (the other side can
        # almost always take it): a round of poll() per hop would be the relay's cost.
        local = events.get(self.local.fileno(), 0)
        if self.remote is not None:
            remote = events.get(self.remote.fileno(), 0)
            failed = self._remote_io(remote) if remote else None
            if failed is not None:
                if self.grant is None:
                    return failed
                self._lost(failed)
        if self._to_local:
            ended = self._write_local()
            if ended is not None:
                return ended
        if local & (select.POLLIN | _LOST):
            ended = self._read_local()
            if ended is not None:
                return ended
            failed = (self._remote_io(select.POLLOUT)
                      if self._to_remote and self.remote is not None else None)
            if failed is not None:
                if self.grant is None:
                    return failed
                self._lost(failed)
        now = self._clock()
        if self.grant is None:
            return None
        if self.remote is None:
            if now >= self._deadline():
                return (f"not resumed within the server's {self.grant.window} s "
                        "(its resume window)")
            if now >= self._retry_at:
                self._reconnect()
        elif self.stream.ack_pending and now - self._last_ack >= ACK_INTERVAL:
            self._queue_remote([self.stream.ack()])
            self._last_ack = now
        if self.stream.finished:
            # its last replies (a device gone: -ENODEV) go to vhci-hcd first
            if self._finished_at is None:
                self._finished_at = now
            if not self._to_local or now - self._finished_at > DRAIN_TIMEOUT:
                return "the server ended the attachment"
        return None

    # --- the local side (vhci-hcd) ---------------------------------------------------

    def _read_local(self) -> str | None:
        try:
            data = self.local.recv(READ_SIZE)
        except _WOULD_BLOCK:
            return None
        except OSError as exc:
            return f"vhci-hcd's side failed: {exc.strerror or exc}"
        if not data:
            return "vhci-hcd closed the connection"
        frames: list[bytes | memoryview] = (
            [data] if self.grant is None else self.stream.send((data,)))
        if self.remote is not None:  # (while down, the resume sends them)
            if self.grant is not None and self.stream.ack_pending:
                frames.append(self.stream.ack())  # (with the data: no wake-up of its own)
                self._last_ack = self._clock()
            self._queue_remote(frames)
        return None

    def _write_local(self) -> str | None:
        try:
            sent = self.local.sendmsg(list(self._to_local)[:64])
        except _WOULD_BLOCK:
            return None
        except OSError as exc:
            return f"vhci-hcd's side failed: {exc.strerror or exc}"
        self._to_local_size -= sent
        _consume(self._to_local, sent)
        return None

    # --- the server's side ------------------------------------------------------------

    def _queue_remote(self, pieces: list[bytes | memoryview]) -> None:
        for piece in pieces:
            view = memoryview(piece)
            self._to_remote.append(view)
            self._to_remote_size += len(view)

    def _remote_io(self, events: int) -> str | None:
        """Reads and writes what it can; the reason if the connection failed."""
        remote = self.remote
        assert remote is not None
        if events & select.POLLOUT and self._to_remote:
            try:
                if isinstance(remote, ssl.SSLSocket):
                    sent = remote.send(self._to_remote[0])
                else:
                    sent = remote.sendmsg(list(self._to_remote)[:64])
            except _WOULD_BLOCK:
                sent = 0
            except OSError as exc:
                return self._failed(exc)
            self._to_remote_size -= sent
            _consume(self._to_remote, sent)
        if events & (select.POLLIN | _LOST):
            while True:
                try:
                    data = remote.recv(READ_SIZE)
                except _WOULD_BLOCK:
                    break
                except OSError as exc:
                    return self._failed(exc)
                if not data:
                    return self._failed(None)
                if self.grant is None:
                    self._to_local.append(memoryview(data))
                    self._to_local_size += len(data)
                    if not self._more(remote, data):
                        break
                    continue
                try:
                    payload = self.stream.receive(data)
                except RemoteProtocolError as exc:
                    # (not a loss to resume from: a stream that cannot be trusted)
                    raise ResumeRefused(f"the server sent a bad frame: {exc}") from exc
                for piece in payload:
                    self._to_local.append(piece)
                    self._to_local_size += len(piece)
                if self.stream.ack_due:
                    self._queue_remote([self.stream.ack()])
                    self._last_ack = self._clock()
                if not self._more(remote, data):
                    break
        return None

    def _more(self, remote: socket.socket, data: bytes) -> bool:
        """Whether to read again now: a full read (more is likely there; a poll()
        round would cost more than a read that finds nothing), or TLS's own buffer."""
        if self._to_local_size >= QUEUED:
            return False
        return len(data) == READ_SIZE or (isinstance(remote, ssl.SSLSocket)
                                          and remote.pending() > 0)

    def _failed(self, exc: BaseException | None) -> str:
        if exc is None:
            why = "the server closed the connection"
        elif isinstance(exc, RemoteProtocolError):
            why = f"the server sent a bad frame: {exc}"
        elif isinstance(exc, OSError) and exc.errno == errno.ETIMEDOUT:
            why = "the server stopped answering (dead-peer timeout)"
        else:
            why = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
        return why

    def _lost(self, why: str) -> None:
        remote, self.remote = self.remote, None
        if remote is not None:
            with contextlib.suppress(OSError):
                remote.close()
        self._to_remote.clear()
        self._to_remote_size = 0
        self._down_at = self._clock()
        self._retry_at = self._down_at  # (at once: a reset is often over already)
        self._retry_delay = RETRY_FIRST
        self.state.down_since = time.time()
        assert self.grant is not None
        log.warning("%s: connection lost (%s); resuming (the server keeps it %d s)",
                    printable(self._what), printable(why), self.grant.window)
        self._changed()

    def _reconnect(self) -> None:
        try:
            sock = self._connect()
        except (OSError, UsbipError) as exc:
            cause = exc.__cause__ if isinstance(exc, UsbipError) else exc
            if isinstance(cause, ConnectionRefusedError):
                # A network that drops packets does not refuse: this is a host that
                # answers, with nothing on the port. The server stopped or restarted,
                # and its attachments (in its memory) went with it.
                raise ResumeRefused("nothing listens on the server's port any more: it "
                                    "stopped or restarted, and the attachment with it"
                                    ) from exc
            self._schedule_retry(printable(str(exc)))
            return
        assert self.grant is not None
        try:
            peer_has = request_resume(sock, self.grant.token, self.stream.received)
            frames = self.stream.resend_from(peer_has)
        except ResumeRefused:
            sock.close()
            raise
        except RemoteProtocolError as exc:
            sock.close()
            raise ResumeRefused(f"the server's resume point cannot be: {exc}") from exc
        except ClientError as exc:
            sock.close()
            if isinstance(exc.__cause__, RemoteProtocolError):
                raise ResumeRefused(f"what answers on the server's port is not the server "
                                    f"that granted the attachment: {exc}") from exc
            # closed, or reset, with no answer: counted; a time-out is not (a network
            # still half down), and starts the count again
            closed = exc.__cause__ is None or isinstance(exc.__cause__, ConnectionError)
            self._unanswered = self._unanswered + 1 if closed else 0
            if self._unanswered >= UNANSWERED:
                raise ResumeRefused(f"{self._unanswered} connections in a row closed with no "
                                    f"answer to the resume ({exc}): the server is gone"
                                    ) from exc
            self._schedule_retry(printable(str(exc)))
            return
        except (OSError, UsbipError) as exc:
            sock.close()
            self._schedule_retry(printable(str(exc)))
            return
        self._unanswered = 0
        sock.setblocking(False)
        self.remote = sock
        self.stream.restart()
        self._queue_remote([*frames, self.stream.ack()])
        self._last_ack = self._clock()
        down = self._clock() - (self._down_at or 0.0)
        self._down_at = None
        self.state.down_since = None
        self.state.resumed += 1
        log.info("%s: resumed after %.1f s down (%d bytes sent again)", printable(self._what),
                 down, self.stream.sent - peer_has)
        self._changed()

    def _schedule_retry(self, why: str) -> None:
        log.info("%s: resuming failed: %s; again in %.1f s", printable(self._what), why,
                 self._retry_delay)
        self._retry_at = self._clock() + self._retry_delay
        self._retry_delay = min(RETRY_MAX, self._retry_delay * 2)

    def _changed(self) -> None:
        if self.on_change is not None:
            self.on_change(self.state)

    # --- the end -----------------------------------------------------------------------

    def finish(self) -> None:
        """Tell the server we are done (FIN: it releases the device now, not after its
        window), and close both sides."""
        remote, self.remote = self.remote, None
        if remote is not None:
            with contextlib.suppress(OSError, ValueError):
                remote.setblocking(True)
                remote.settimeout(2.0)
                for piece in self._to_remote:
                    remote.sendall(piece)
                if self.grant is not None:
                    remote.sendall(self.stream.fin())
            with contextlib.suppress(OSError):
                remote.close()
        with contextlib.suppress(OSError):
            self.local.close()


def _consume(queue: deque[memoryview], count: int) -> None:
    while count:
        head = queue[0]
        if len(head) <= count:
            queue.popleft()
            count -= len(head)
        else:
            queue[0] = head[count:]
            count = 0


# --- the userspace clients' relay: a thread, over a blocking connection -----------------


def dial(host: str, port: int, tls: ssl.SSLContext | None, server_hostname: str | None,
         keepalive: Keepalive, timeout: float) -> socket.socket:
    """A connection for a relay: TCP with keepalive, and TLS as an SSLSocket."""
    sock = connect(host, port, timeout)
    try:
        keepalive.apply(sock)
        if tls is not None:
            try:
                sock = tls.wrap_socket(sock, server_hostname=server_hostname or host)
            except OSError as exc:
                raise TlsRefused(host, port, handshake_failure(exc)) from exc
    except BaseException:
        sock.close()
        raise
    return sock


class RelayThread:
    """A relay run by a thread of its own, until :meth:`stop`."""

    def __init__(self, relay: Relay) -> None:
        self.relay = relay
        self._wake_r, self._wake_w = os.pipe()
        self._thread = threading.Thread(target=self._run, name="usbipy-relay", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        reason = self.relay.run(self._wake_r)
        if reason is not None:
            log.warning("%s", printable(reason))
            self.relay.finish()  # (the client sees its connection end: ServerGone)

    def stop(self) -> None:
        """FIN to the server (it releases the device at once), and both sides closed."""
        if self._wake_w < 0:
            return
        os.write(self._wake_w, b"x")
        self._thread.join(10)
        self.relay.finish()
        os.close(self._wake_r)
        os.close(self._wake_w)
        self._wake_r = self._wake_w = -1


def import_resumable(host: str, busid: str, port: int, tls: ssl.SSLContext | None,
                     server_hostname: str | None, keepalive: Keepalive, timeout: float,
                     conn: ClientConnection
                     ) -> tuple[socket.socket, DeviceInfo, RelayThread | None, TlsSession | None]:
    """Import ``busid`` offering resumption (blocking), for a userspace client whose
    codec ``conn`` goes on with the URBs: the socket it is to use (one end of a
    socketpair, with a relay thread at the other, or the connection itself from a
    plaintext server that does not resume), the device, the relay and the TLS
    session."""
    sock = dial(host, port, tls, server_hostname, keepalive, timeout)
    try:
        info, grant = import_offering_resume(sock, busid, plaintext=tls is None, conn=conn)
    except BaseException:
        sock.close()
        raise
    session = TlsSession.of(sock, kernel=False) if isinstance(sock, ssl.SSLSocket) else None
    if grant is None and tls is None:  # (usbipd: the socket as it is)
        return sock, info, None, None
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    relay = Relay(ours, sock, grant,
                  lambda: dial(host, port, tls, server_hostname, keepalive,
                               min(timeout, CONNECT_TIMEOUT)),
                  what=f"{host}:{port}/{busid}")
    return theirs, info, RelayThread(relay), session
