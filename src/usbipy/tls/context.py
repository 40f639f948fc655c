"""SSL contexts for usbipy's mutual TLS, and the identity a peer proved.

Both ends present a certificate signed by a CA the other trusts (mutual
TLS). Two kinds of context:

* **kernel** contexts, for a connection whose socket the Linux kernel will
  own (vhci-hcd on the client, usbip-host on the server). TLS 1.2 only, with
  OpenSSL's kernel TLS switched on: Debian's OpenSSL 3.0 installs the session
  keys into the socket for both directions in TLS 1.2, but for TLS 1.3 only
  for sending. After the handshake, the kernel encrypts and decrypts every
  record, and the socket carries plain USB/IP for whoever holds it.
* **userspace** contexts, for a connection Python serves to the end: TLS 1.2
  or 1.3, records encrypted by OpenSSL in this process.

In both, the cipher suites are ECDHE with AES-GCM (what kTLS implements),
renegotiation is off, and no session tickets are sent: a ticket, like any
record that is not application data, makes a kernel-owned socket fail
(net/tls/tls_sw.c returns -EIO to vhci-hcd's or usbip-host's receive).
"""

from __future__ import annotations

import ipaddress
import ssl
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..escape import printable
from .errors import TlsError

#: SSL_OP_ENABLE_KTLS (ssl.OP_ENABLE_KTLS from Python 3.12).
OP_ENABLE_KTLS = getattr(ssl, "OP_ENABLE_KTLS", 0x8)

#: TLS 1.2 suites kTLS can take (AES-GCM), with forward secrecy (ECDHE).
TLS12_CIPHERS = "ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-RSA-AES128-GCM-SHA256:" \
                "ECDHE-ECDSA-AES256-GCM-SHA384:ECDHE-RSA-AES256-GCM-SHA384"


@dataclass(frozen=True)
class TlsFiles:
    """A certificate, its key, and the CA that signs the peers we accept."""

    cert: Path
    key: Path
    ca: Path

    @classmethod
    def from_options(cls, cert: str | None, key: str | None, ca: str | None,
                     ) -> TlsFiles | None:
        """All three or none: the options ``--tls-cert/--tls-key/--tls-ca``."""
        given = {"--tls-cert": cert, "--tls-key": key, "--tls-ca": ca}
        if all(value is None for value in given.values()):
            return None
        # (an empty value is an unset variable in a script: never taken as "no TLS")
        empty = [name for name, value in given.items() if value == ""]
        if empty:
            raise TlsError(f"{', '.join(empty)} given empty: name the file")
        missing = [name for name, value in given.items() if value is None]
        if missing:
            raise TlsError(f"mutual TLS needs {', '.join(missing)} too (a certificate, its "
                           "key and the CA of the peers; 'usbipy cert' makes them)")
        assert cert and key and ca
        return cls(Path(cert), Path(key), Path(ca))


def _load(context: ssl.SSLContext, files: TlsFiles) -> None:
    for path in (files.cert, files.key, files.ca):
        try:
            with open(path, "rb"):
                pass
        except OSError as exc:
            raise TlsError(f"{path}: {exc.strerror or exc}") from exc
    try:
        context.load_cert_chain(files.cert, files.key)
    except ssl.SSLError as exc:
        raise TlsError(f"{files.cert}, {files.key}: not a certificate and its key "
                       f"({exc.reason or exc})") from exc
    try:
        context.load_verify_locations(cafile=files.ca)
    except ssl.SSLError as exc:
        raise TlsError(f"{files.ca}: not a CA certificate ({exc.reason or exc})") from exc


def _harden(context: ssl.SSLContext, *, kernel: bool) -> ssl.SSLContext:
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if kernel:
        context.maximum_version = ssl.TLSVersion.TLSv1_2
        context.options |= OP_ENABLE_KTLS
    context.set_ciphers(TLS12_CIPHERS)
    context.options |= ssl.OP_NO_RENEGOTIATION | ssl.OP_NO_TICKET
    context.verify_mode = ssl.CERT_REQUIRED
    return context


def server_context(files: TlsFiles, *, kernel: bool) -> ssl.SSLContext:
    """A server context that requires a client certificate signed by ``files.ca``."""
    context = _harden(ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER), kernel=kernel)
    context.num_tickets = 0  # TLS 1.3 tickets come after the handshake: fatal to kTLS
    _load(context, files)
    return context


def client_context(files: TlsFiles, *, kernel: bool = False) -> ssl.SSLContext:
    """A client context that checks the server's certificate and name against ``files.ca``."""
    context = _harden(ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT), kernel=kernel)
    context.check_hostname = True
    _load(context, files)
    return context


@dataclass(frozen=True)
class TlsSession:
    """What a finished handshake established; shown in logs and by `usbipy port`."""

    version: str
    cipher: str
    #: The peer's verified identity, as "CN=name" (escaped: it comes from the peer).
    peer: str
    #: True when the kernel encrypts the records (kTLS), False when this process does.
    kernel: bool
    #: For access rules: the subject's commonName and the subjectAltName values,
    #: raw (never print them unescaped), and the certificate itself (DER).
    cn: str | None = field(default=None, repr=False)
    sans: tuple[str, ...] = field(default=(), repr=False)
    certificate: bytes | None = field(default=None, repr=False)

    @classmethod
    def of(cls, ssl_object: ssl.SSLObject | ssl.SSLSocket, *, kernel: bool) -> TlsSession:
        cipher = ssl_object.cipher()
        cert: dict[str, Any] = ssl_object.getpeercert() or {}
        cn = next((str(value) for rdn in cert.get("subject", ()) for key, value in rdn
                   if key == "commonName"), None)
        return cls(version=ssl_object.version() or "?",
                   cipher=cipher[0] if cipher else "?",
                   peer=peer_identity(cert),
                   kernel=kernel, cn=cn,
                   sans=tuple(_san(kind, value) for kind, value in
                              cert.get("subjectAltName", ())),
                   certificate=ssl_object.getpeercert(binary_form=True))

    def as_dict(self) -> dict[str, object]:
        return {"version": self.version, "cipher": self.cipher, "peer": self.peer,
                "kernel": self.kernel}

    @property
    def protection(self) -> str:
        """How the records are protected: "kernel TLS, TLSv1.2, <cipher>"."""
        return f"{'kernel TLS' if self.kernel else 'TLS'}, {self.version}, {self.cipher}"

    def __str__(self) -> str:
        return f"{self.peer} ({self.protection})"


def _san(kind: str, value: object) -> str:
    """A subjectAltName value as rules compare it: an address in its short form
    (OpenSSL writes IPv6 ones in full: 2001:DB8:0:0:0:0:0:1)."""
    if kind == "IP Address":
        try:
            return str(ipaddress.ip_address(str(value).strip()))
        except ValueError:
            pass
    return str(value)


def peer_identity(cert: dict[str, Any] | None) -> str:
    """The subject's common name, else its first subjectAltName; escaped."""
    if not cert:
        return "no certificate"
    for rdn in cert.get("subject", ()):
        for key, value in rdn:
            if key == "commonName":
                return f"CN={printable(str(value))}"
    for kind, value in cert.get("subjectAltName", ()):
        return f"{kind}={printable(str(value))}"
    return "unnamed certificate"
