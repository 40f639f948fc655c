"""Mutual TLS for USB/IP: contexts, kernel TLS for sockets the kernel owns, and a small CA.

Importing this package loads no asyncio; :mod:`usbipy.tls.certs` needs the
optional ``cryptography`` package, the rest only the standard library.
"""

from .context import TlsFiles, TlsSession, client_context, peer_identity, server_context
from .errors import TlsError, handshake_failure

__all__ = [
    "TlsError",
    "TlsFiles",
    "TlsSession",
    "client_context",
    "handshake_failure",
    "peer_identity",
    "server_context",
]
