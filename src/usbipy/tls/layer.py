"""TLS as a sans-IO layer: ciphertext in, plaintext out; plaintext in, ciphertext out.

OpenSSL over two memory BIOs, with no I/O of its own (the way the codec in
:mod:`usbipy.protocol` works): the server feeds it what the socket gave and
writes what it hands back. Compared with asyncio's TLS transport it does
less per record (no flow-control state machine of its own, one record
stream per batch of replies), and it never sends a record on its own
account: no close_notify at close, so a peer whose socket the kernel owns
is never sent a record that would fail it.
"""

from __future__ import annotations

import ssl

#: Plaintext taken out of OpenSSL per call; a record holds at most 16 KiB.
_READ_SIZE = 1 << 14


class TlsLayer:
    """One TLS session on memory BIOs.

    :meth:`receive` returns the plaintext the bytes complete (b"" during the
    handshake) and raises :class:`ssl.SSLError` when the peer breaks TLS or
    fails the handshake; :meth:`outgoing` is what must be sent next
    (handshake messages, alerts, records).
    """

    def __init__(self, context: ssl.SSLContext, *, server_side: bool,
                 server_hostname: str | None = None) -> None:
        self._incoming = ssl.MemoryBIO()
        self._outgoing = ssl.MemoryBIO()
        self.ssl_object = context.wrap_bio(self._incoming, self._outgoing,
                                           server_side=server_side,
                                           server_hostname=server_hostname)
        self.established = False
        #: The peer sent close_notify: no more plaintext comes.
        self.closed_by_peer = False

    def start(self) -> None:
        """The first handshake step (a client's ClientHello goes to :meth:`outgoing`)."""
        self._handshake()

    def _handshake(self) -> None:
        try:
            self.ssl_object.do_handshake()
        except ssl.SSLWantReadError:
            return
        self.established = True

    def receive(self, data: bytes) -> bytes:
        self._incoming.write(data)
        if not self.established:
            self._handshake()
            if not self.established:
                return b""
        read = self.ssl_object.read
        incoming = self._incoming
        first = b""
        chunks: list[bytes] | None = None
        # Each read returns a whole record's plaintext (OpenSSL reads no further
        # ahead than one record): the loop ends when the BIO is empty, and raises
        # (costly: OpenSSL formats an error) only for a record not all here yet.
        while incoming.pending:
            try:
                chunk = read(_READ_SIZE)
            except ssl.SSLWantReadError:
                break
            if not chunk:  # close_notify
                self.closed_by_peer = True
                break
            if not first:
                first = chunk
            elif chunks is None:
                chunks = [first, chunk]
            else:
                chunks.append(chunk)
        return b"".join(chunks) if chunks is not None else first

    def send(self, data: bytes | bytearray | memoryview) -> bytes:
        """Encrypt ``data``; returns the records to send (with anything else pending)."""
        self.encrypt(data)
        return self._outgoing.read()

    def encrypt(self, data: bytes | bytearray | memoryview) -> None:
        """Encrypt ``data`` into records that :meth:`outgoing` returns."""
        if data:
            self.ssl_object.write(data)

    def outgoing(self) -> bytes:
        return self._outgoing.read()
