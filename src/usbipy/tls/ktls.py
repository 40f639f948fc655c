"""Kernel TLS (kTLS): TLS records encrypted and decrypted by the Linux kernel.

vhci-hcd and usbip-host read and write the socket they are given with
sock_recvmsg/kernel_sendmsg, from kernel threads: a process cannot stand in
the middle without relaying every byte. With kTLS installed on the socket
in both directions, those calls carry application data through the kernel's
TLS layer (net/tls/tls_sw.c), so the kernel's data path stays in the
kernel and is encrypted.

The handshake is done in userspace by OpenSSL with its kTLS option on (see
:mod:`usbipy.tls.context`); OpenSSL then installs the session keys with
``setsockopt(SOL_TLS, TLS_TX/TLS_RX)`` and the record sequence numbers are
the kernel's from there on. :func:`take_plain` checks that both directions
were installed and returns the bare socket: reading and writing it is
plain USB/IP, encrypted on the wire.

Python 3.11 has none of these constants (include/uapi/linux/tls.h, tcp.h).
"""

from __future__ import annotations

import errno
import functools
import os
import socket
import ssl
import struct
import threading

from .context import OP_ENABLE_KTLS, TlsSession
from .errors import TlsError, handshake_failure

TCP_ULP = 31
SOL_TLS = 282
TLS_TX = 1
TLS_RX = 2
TLS_1_2_VERSION = 0x0303
TLS_CIPHER_AES_GCM_128 = 51
TLS_CIPHER_AES_GCM_256 = 52
AES_GCM_CIPHERS = (TLS_CIPHER_AES_GCM_128, TLS_CIPHER_AES_GCM_256)

#: struct tls_crypto_info: the version and the cipher, in host order.
CRYPTO_INFO_HEADER = struct.Struct("=HH")

#: struct tls12_crypto_info_aes_gcm_128: version and cipher in host order,
#: then iv[8], key[16], salt[4], rec_seq[8].
CRYPTO_INFO_AES_GCM_128 = struct.Struct("=HH8s16s4s8s")

#: The kernel refuses kTLS with these when the "tls" module is missing.
_NO_KTLS = (errno.ENOENT, errno.ENOPROTOOPT, errno.EOPNOTSUPP)

NOT_AVAILABLE = ("kernel TLS is not available on this host: load it with 'modprobe tls' "
                 "(as root; Linux 4.17 or newer with CONFIG_TLS)")


def _loopback_pair() -> tuple[socket.socket, socket.socket, socket.socket]:
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        client = socket.create_connection(listener.getsockname(), timeout=10)
        server, _ = listener.accept()
    except BaseException:
        listener.close()
        raise
    return listener, client, server


@functools.cache
def prepare() -> None:
    """Check that kTLS works here, and load it and its AES-GCM now.

    The first key installed costs seconds on a slow machine (the kernel loads
    and instantiates the AEAD while it holds the socket's lock): paid here,
    before any peer waits on a handshake. Raises :class:`TlsError` with what
    to do when kTLS is missing.
    """
    try:
        sockets = _loopback_pair()
    except OSError as exc:
        raise TlsError(f"cannot check kernel TLS: no loopback TCP: {exc.strerror or exc}"
                       ) from exc
    try:
        probe = sockets[1]
        try:
            probe.setsockopt(socket.IPPROTO_TCP, TCP_ULP, b"tls")
        except OSError as exc:
            if exc.errno in _NO_KTLS:
                raise TlsError(NOT_AVAILABLE) from exc
            raise TlsError(f"kernel TLS refused: {exc.strerror or exc}") from exc
        info = CRYPTO_INFO_AES_GCM_128.pack(TLS_1_2_VERSION, TLS_CIPHER_AES_GCM_128,
                                            bytes(8), bytes(16), bytes(4), bytes(8))
        try:
            probe.setsockopt(SOL_TLS, TLS_TX, info)
        except OSError as exc:
            raise TlsError(f"kernel TLS cannot use AES-GCM here ({exc.strerror or exc}): "
                           "is the gcm module available? try 'modprobe gcm'") from exc
    finally:
        for sock in sockets:
            sock.close()


def check_openssl(server: ssl.SSLContext) -> None:
    """Check that this process's OpenSSL installs kTLS keys itself: a handshake over
    loopback with ``server`` (a kernel context that asks for no client certificate).

    Upstream OpenSSL builds without kTLS by default (Debian's has it): a kernel
    with kTLS is not enough. Raises :class:`TlsError` when no keys reached the
    kernel.
    """
    client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client.check_hostname = False
    client.verify_mode = ssl.CERT_NONE  # (a probe of the mechanism, not of identities)
    client.maximum_version = ssl.TLSVersion.TLSv1_2
    client.options |= OP_ENABLE_KTLS
    listener, near, far = _loopback_pair()
    listener.close()
    result: list[BaseException | bool] = []

    def serve() -> None:
        try:
            with server.wrap_socket(far, server_side=True) as tls:
                result.append(installed(tls))
        except BaseException as exc:  # noqa: BLE001 (reported by the caller)
            result.append(exc)

    thread = threading.Thread(target=serve, name="ktls-probe")
    far.settimeout(10)
    near.settimeout(10)
    thread.start()
    try:
        with client.wrap_socket(near) as tls:
            ours = installed(tls)
    except (ssl.SSLError, OSError) as exc:
        raise TlsError(f"kernel TLS probe failed: {handshake_failure(exc)}") from exc
    finally:
        thread.join(15)
        far.close()
    if not (ours and result == [True]):
        raise TlsError("this Python's OpenSSL does not hand sessions to kernel TLS (built "
                       "without kTLS?): TLS stays in userspace")


def available() -> bool:
    """Whether :func:`prepare` succeeds (kTLS usable on this host)."""
    try:
        prepare()
    except TlsError:
        return False
    return True


def installed(sock: socket.socket) -> bool:
    """Whether the kernel holds TLS 1.2 AES-GCM keys for both directions of ``sock``."""
    for direction in (TLS_TX, TLS_RX):
        try:
            # The kernel takes exactly the header's length (version and cipher) or
            # exactly the cipher's whole struct; any other length is EINVAL
            # (net/tls/tls_main.c, do_tls_getsockopt_conf). No keys yet: EBUSY.
            info = sock.getsockopt(SOL_TLS, direction, CRYPTO_INFO_HEADER.size)
        except OSError:
            return False
        version, cipher = CRYPTO_INFO_HEADER.unpack(info)
        if version != TLS_1_2_VERSION or cipher not in AES_GCM_CIPHERS:
            return False
    return True


def take_plain(tls: ssl.SSLSocket) -> socket.socket:
    """The socket under a finished handshake, its records now the kernel's business.

    OpenSSL must have installed kTLS both ways, or nothing may carry on:
    raises :class:`TlsError` (never a quiet fallback to plaintext). ``tls``
    is closed; its close sends nothing (no close_notify, which would reach
    the kernel's side of the peer as a fatal record).
    """
    try:
        if not installed(tls):
            cipher = tls.cipher()
            raise TlsError(
                f"OpenSSL did not hand the session to kernel TLS (TLS {tls.version()}, "
                f"{cipher[0] if cipher else '?'}): an OpenSSL built without kTLS, or a "
                "cipher the kernel lacks")
        plain = socket.socket(tls.family, tls.type, tls.proto, fileno=os.dup(tls.fileno()))
    finally:
        tls.close()
    return plain


def client_handshake(sock: socket.socket, context: ssl.SSLContext, server_hostname: str,
                     timeout: float) -> tuple[socket.socket, TlsSession]:
    """A blocking client handshake with a kernel context; returns the kTLS socket.

    ``sock`` is taken (closed on failure). The returned socket has ``timeout``
    for the OP requests that follow.
    """
    sock.settimeout(timeout)
    try:
        tls = context.wrap_socket(sock, server_hostname=server_hostname,
                                  do_handshake_on_connect=False)
    except BaseException:
        sock.close()
        raise
    try:
        tls.do_handshake()
        session = TlsSession.of(tls, kernel=True)
    except (ssl.SSLError, OSError) as exc:
        tls.close()
        raise TlsError(handshake_failure(exc)) from exc
    plain = take_plain(tls)
    plain.settimeout(timeout)
    return plain, session
