"""TLS errors, and what a failed handshake means in words a user can act on."""

from __future__ import annotations

import ssl

from ..errors import UsbipError
from ..escape import printable


class TlsError(UsbipError):
    """TLS cannot be set up: a file, kernel TLS, or a handshake; the message says why."""


#: OpenSSL's reasons for an alert the peer sent us, as the peer's refusal.
_PEER_REFUSED = {
    "TLSV13_ALERT_CERTIFICATE_REQUIRED": "it requires a client certificate",
    "SSLV3_ALERT_BAD_CERTIFICATE": "it does not accept our certificate",
    "SSLV3_ALERT_CERTIFICATE_EXPIRED": "our certificate has expired",
    "SSLV3_ALERT_CERTIFICATE_UNKNOWN": "it does not accept our certificate",
    "TLSV1_ALERT_UNKNOWN_CA": "our certificate is not signed by a CA it trusts",
    "TLSV1_ALERT_DECRYPT_ERROR": "it could not verify our certificate",
    "TLSV1_ALERT_PROTOCOL_VERSION": "it supports no TLS version we offer",
    # (OpenSSL's TLS 1.2 server answers a missing client certificate with this one)
    "SSLV3_ALERT_HANDSHAKE_FAILURE": "it requires a client certificate, or we share no "
                                     "cipher or TLS version",
}


#: X509_V_ERR_HOSTNAME_MISMATCH, X509_V_ERR_IP_ADDRESS_MISMATCH (openssl/x509_vfy.h).
_NAME_MISMATCH = (62, 64)


def handshake_failure(exc: BaseException) -> str:
    """Why a TLS handshake failed, in one line (peer-supplied text escaped)."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        why = f"the peer's certificate is not accepted: {printable(exc.verify_message)}"
        if exc.verify_code in _NAME_MISMATCH:
            why += (" (connect by a name the certificate carries, or give one with "
                    "--tls-server-name NAME; or issue the server a certificate that names "
                    "this host: usbipy cert issue NAME --server --san HOST)")
        return why
    if isinstance(exc, ssl.SSLEOFError) or isinstance(exc, (ConnectionResetError,
                                                            BrokenPipeError, EOFError)):
        return "the peer closed the connection during the TLS handshake"
    if isinstance(exc, ssl.SSLError):
        reason = exc.reason or ""
        if reason in _PEER_REFUSED:
            return f"the peer refused the TLS handshake: {_PEER_REFUSED[reason]}"
        if reason == "PEER_DID_NOT_RETURN_A_CERTIFICATE":
            return "the peer sent no certificate"
        if reason in ("WRONG_VERSION_NUMBER", "HTTP_REQUEST", "UNKNOWN_PROTOCOL",
                      "PACKET_LENGTH_TOO_LONG", "RECORD_LAYER_FAILURE"):
            return f"the peer does not speak TLS ({reason.lower().replace('_', ' ')})"
        text = reason.lower().replace("_", " ") if reason else str(exc)
        return f"TLS handshake failed: {printable(text)}"
    if isinstance(exc, TimeoutError):
        return "the TLS handshake timed out"
    if isinstance(exc, OSError):
        return f"TLS handshake failed: {exc.strerror or exc}"
    return f"TLS handshake failed: {printable(str(exc))}"
