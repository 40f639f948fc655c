"""A small certificate authority for usbipy: `usbipy cert init` and `usbipy cert issue`.

For users with no PKI of their own: one CA in the state directory, and a
key and certificate per server and per client, signed by it. Keys are
ECDSA P-256 (fast handshakes, supported by every TLS peer) and are written
with mode 0600; nothing here is hand-written X.509 (the ``cryptography``
package builds and signs every certificate).
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import re
import secrets
import socket
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ..statedir import state_dir
from .errors import TlsError

if TYPE_CHECKING:
    from cryptography import x509
    from cryptography.hazmat.primitives.asymmetric import ec

CA_DAYS = 3650
LEAF_DAYS = 825
MAX_DAYS = 36500
#: A name becomes a file name and a certificate's CN: keep it plain.
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
#: A subjectAltName that is not an IP address: an ASCII host name (a leading "*." allowed).
_LABEL = r"[A-Za-z0-9][A-Za-z0-9-]{0,62}"
_DNS_NAME = re.compile(rf"^(\*\.)?{_LABEL}(\.{_LABEL})*$")


def tls_dir(base: Path | None = None) -> Path:
    """Where the CA and the issued files live: STATE_DIR/tls."""
    return (base if base is not None else state_dir()) / "tls"


@dataclass(frozen=True)
class Issued:
    cert: Path
    key: Path
    ca: Path


def _crypto() -> None:
    try:
        import cryptography  # noqa: F401
    except ImportError:
        raise TlsError("making certificates needs the cryptography package: "
                       "pip install 'usbipy[tls]' (or bring your own PKI)") from None


def _write(path: Path, data: bytes, mode: int) -> None:
    """Write a file whole, with ``mode`` from its first byte (a key is never readable by
    others, not even for a moment), then put it in place: a crash leaves the old file or
    the new one, never half of one."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")  # O_EXCL, 0600
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


def _check_days(days: int) -> None:
    if not 1 <= days <= MAX_DAYS:
        raise TlsError(f"bad validity {days} days: from 1 to {MAX_DAYS}")


def _new_key() -> ec.EllipticCurvePrivateKey:
    from cryptography.hazmat.primitives.asymmetric import ec
    return ec.generate_private_key(ec.SECP256R1())


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    from cryptography.hazmat.primitives import serialization
    return key.private_bytes(serialization.Encoding.PEM,
                             serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _cert_pem(cert: x509.Certificate) -> bytes:
    from cryptography.hazmat.primitives import serialization
    return cert.public_bytes(serialization.Encoding.PEM)


def default_ca_name() -> str:
    """A CA name of its own: "usbipy CA on HOST 3f9a1c2e". Two CAs of one name are
    told apart by their keys alone, which tools and people rarely look at."""
    return f"usbipy CA on {socket.gethostname()} {secrets.token_hex(4)}"


def init_ca(base: Path | None = None, *, name: str | None = None, days: int = CA_DAYS,
            force: bool = False) -> Issued:
    """Make the CA: ca.pem and ca-key.pem (0600) in STATE_DIR/tls, named ``name``
    (by default :func:`default_ca_name`)."""
    _crypto()
    if name is None:
        name = default_ca_name()
    elif not name or not name.isprintable():
        raise TlsError(f"a CA name must be printable text, not {name!r}")
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.x509.oid import NameOID

    _check_days(days)
    where = tls_dir(base)
    cert_path, key_path = where / "ca.pem", where / "ca-key.pem"
    if (cert_path.exists() or key_path.exists()) and not force:
        raise TlsError(f"{cert_path} exists already: a new CA would invalidate every "
                       "certificate it signed (use --force to replace it)")
    key = _new_key()
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject).issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False,
                                     key_encipherment=False, data_encipherment=False,
                                     key_agreement=False, key_cert_sign=True, crl_sign=True,
                                     encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                       critical=False)
        .sign(key, hashes.SHA256())
    )
    _write(key_path, _key_pem(key), 0o600)
    _write(cert_path, _cert_pem(cert), 0o644)
    return Issued(cert_path, key_path, cert_path)


def _alt_name(text: str) -> x509.GeneralName:
    from cryptography import x509
    try:
        return x509.IPAddress(ipaddress.ip_address(text))
    except ValueError:
        pass
    if len(text) > 253 or not _DNS_NAME.match(text):
        raise TlsError(f"bad host name {text!r} for the certificate: an IP address or an "
                       "ASCII host name")
    return x509.DNSName(text)


def issue(name: str, *, server: bool, base: Path | None = None,
          alt_names: tuple[str, ...] = (), days: int = LEAF_DAYS,
          not_before: datetime.datetime | None = None, force: bool = False) -> Issued:
    """A key and certificate for ``name``, signed by the CA of :func:`init_ca`.

    A server certificate names ``name`` and ``alt_names`` (DNS names or IP
    addresses) as subjectAltNames, which clients check against the host
    they dial; a client certificate carries ``name`` as its CN, the identity
    the server logs and shows.
    """
    _crypto()
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    if not _NAME.match(name):
        raise TlsError(f"bad certificate name {name!r}: letters, digits, '.', '-' and '_' "
                       "only, at most 64")
    if name == "ca" or name.endswith("-key"):
        # NAME.pem and NAME-key.pem share the folder with ca.pem and every other key
        raise TlsError(f"bad certificate name {name!r}: 'ca' and names ending in '-key' "
                       "are the files' own")
    _check_days(days)
    where = tls_dir(base)
    cert_path, key_path = where / f"{name}.pem", where / f"{name}-key.pem"
    if (cert_path.exists() or key_path.exists()) and not force:
        raise TlsError(f"{cert_path} exists already (use --force to replace it and its key)")
    ca_cert_path, ca_key_path = where / "ca.pem", where / "ca-key.pem"
    try:
        ca_cert = x509.load_pem_x509_certificate(ca_cert_path.read_bytes())
        ca_key = serialization.load_pem_private_key(ca_key_path.read_bytes(), None)
    except FileNotFoundError:
        raise TlsError(f"no CA in {where}: run 'usbipy cert init' first") from None
    except (OSError, ValueError, TypeError) as exc:  # (TypeError: a passphrase-protected key)
        raise TlsError(f"cannot read the CA in {where}: {exc}") from exc
    key = _new_key()
    start = not_before or datetime.datetime.now(datetime.UTC) - datetime.timedelta(
        minutes=5)
    usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(start + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False,
                                     key_encipherment=False, data_encipherment=False,
                                     key_agreement=False, key_cert_sign=False, crl_sign=False,
                                     encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                       critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
            ca_key.public_key()), critical=False)  # type: ignore[arg-type]
    )
    names = dict.fromkeys((name, *alt_names) if server else alt_names)
    if names:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([_alt_name(n) for n in names]), critical=False)
    cert = builder.sign(ca_key, hashes.SHA256())  # type: ignore[arg-type]
    _write(key_path, _key_pem(key), 0o600)
    _write(cert_path, _cert_pem(cert), 0o644)
    return Issued(cert_path, key_path, ca_cert_path)
