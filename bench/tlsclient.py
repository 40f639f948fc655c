"""A TLS client for benchmarks that costs about what the plaintext client costs.

A client that encrypts and decrypts every URB in Python is slower than the
server it measures: the server then idles between small batches, and its CPU
time per URB says more about the client than about TLS. This one seals its
requests before the clock starts (a TLS record's key stream depends only on
its sequence number, so the records can be made in advance) and, on the
timed path, counts the replies by their records' lengths without decrypting
them. The server does all of its TLS work; the client very little.
"""

from __future__ import annotations

import socket
import ssl
import time
from collections.abc import Callable

from bench.fastclient import FastClient
from usbipy.client.handshake import connect
from usbipy.protocol import NEED_DATA, ClientConnection, OpRepImport, OpReqImport
from usbipy.tls.layer import TlsLayer

#: TLS application-data record type, and what each record adds to its plaintext
#: (TLS 1.3: the inner type byte and the AES-GCM tag; TLS 1.2: explicit nonce and tag).
APPLICATION_DATA = 23
OVERHEAD = {"TLSv1.3": 17, "TLSv1.2": 24}


class SealedClient(FastClient):
    """One imported device over mutual TLS; :meth:`pipelined` runs sealed requests."""

    def __init__(self, host: str, port: int, busid: str,  # noqa: D107
                 tls: ssl.SSLContext | None = None) -> None:
        assert tls is not None
        self.sock = connect(host, port)
        self.sock.settimeout(60)
        self.layer = TlsLayer(tls, server_side=False, server_hostname=host)
        self.layer.start()
        while not self.layer.established:
            self.sock.sendall(self.layer.outgoing())
            self._plain = self.layer.receive(self._recv())
        self.sock.sendall(self.layer.outgoing())
        self.overhead = OVERHEAD[self.layer.ssl_object.version() or ""]
        conn = ClientConnection()
        self.sock.sendall(self.layer.send(conn.send(OpReqImport(busid))))
        if self._plain:  # (b"" would tell the codec the connection ended)
            conn.receive_data(self._plain)
        while True:
            event = conn.next_event()
            if isinstance(event, OpRepImport):
                break
            assert event is NEED_DATA, event
            plain = self.layer.receive(self._recv())
            if plain:
                conn.receive_data(plain)
        assert event.device is not None, event.status
        self._imported(event.device)

    def _recv(self) -> bytes:
        data = self.sock.recv(1 << 16)
        if not data:
            raise ConnectionError("the server closed the connection")
        return data

    def send(self, *requests: bytes) -> None:
        self.sock.sendall(self.layer.send(b"".join(requests)))

    def _fill(self, need: int) -> None:
        # (the set-up's replies, decrypted: only the timed path counts records)
        if self._start + need > len(self._buf):
            left = self._end - self._start
            self._buf[:left] = self._buf[self._start:self._end]
            self._start, self._end = 0, left
        while self._end - self._start < need:
            plain = self.layer.receive(self._recv())
            self._buf[self._end:self._end + len(plain)] = plain  # (b"": a record not whole)
            self._end += len(plain)

    def pipelined(self, make_op: Callable[[], list[bytes]], reply_bytes: int, depth: int,
                  duration: float, most: int) -> int:
        """Keep ``depth`` operations in flight for ``duration`` seconds; returns how many
        were done. Each operation's replies are ``reply_bytes`` of plaintext."""
        sealed = [self.layer.send(b"".join(make_op())) for _ in range(most)]
        self._directions.clear()
        return counted_pipeline(self.sock, sealed, _RecordCounter(self.overhead), reply_bytes,
                                depth, duration)

    def close(self) -> None:
        # (no close_notify, as usbipyd's own layer: the FIN ends the session)
        self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()


class _RecordCounter:
    """Plaintext bytes in a stream of TLS application-data records, not decrypted."""

    def __init__(self, overhead: int) -> None:
        self.overhead = overhead
        self.pending = b""

    def __call__(self, data: bytes) -> int:
        pending = self.pending + data
        at = plaintext = 0
        while len(pending) - at >= 5:
            length = int.from_bytes(pending[at + 3:at + 5], "big")
            if len(pending) - at < 5 + length:
                break
            if pending[at] != APPLICATION_DATA:
                raise ConnectionError(f"a TLS record of type {pending[at]}")
            plaintext += length - self.overhead
            at += 5 + length
        self.pending = pending[at:]
        return plaintext


def counted_pipeline(sock: socket.socket, requests: list[bytes], count: Callable[[bytes], int],
                     reply_bytes: int, depth: int, duration: float) -> int:
    """Send prepared ``requests`` (one operation each), ``depth`` in flight, for
    ``duration`` seconds; replies are counted by ``count`` (plaintext bytes in what
    was received), and as many new operations as finished go out in one send.

    Plaintext and TLS runs both use this loop, so the server sees the same pattern.
    """
    sent = min(depth, len(requests))
    sock.sendall(b"".join(requests[:sent]))
    plaintext = done = 0
    deadline = time.perf_counter() + duration
    while done < sent:
        data = sock.recv(1 << 18)
        if not data:
            raise ConnectionError("the server closed the connection")
        plaintext += count(data)
        now_done = plaintext // reply_bytes
        if now_done > done:
            more = now_done - done
            done = now_done
            if time.perf_counter() < deadline and sent < len(requests):
                batch = requests[sent:sent + more]
                sent += len(batch)
                sock.sendall(b"".join(batch))
    return done
