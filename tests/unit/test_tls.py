"""Mutual TLS between usbipyd and the userspace client, and every way a handshake fails.

These run over userspace TLS (this host's kernel may have no kTLS); the
kernel TLS paths are checked in the VM (tests/kernel/test_tls.py).
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime
import logging
import os
import re
import socket
import ssl
import stat
from dataclasses import dataclass
from pathlib import Path

import pytest

from usbipy.backends.base import DeviceSource, HandOffDevice
from usbipy.client import ClientError, ImportRefused, import_device, list_devices
from usbipy.client.errors import TlsRefused
from usbipy.config import Limits
from usbipy.protocol import DeviceInfo, OpStatus
from usbipy.server import UsbipServer, limits
from usbipy.server.tls import ServerTls
from usbipy.tls import TlsError, TlsFiles, certs, client_context, ktls, server_context

from ..helpers import KEYBOARD


@dataclass(frozen=True)
class Pki:
    base: Path
    server: TlsFiles
    client: TlsFiles
    #: a client certificate from another CA
    stranger: TlsFiles
    #: a client certificate of ours that expired
    expired: TlsFiles


def _files(issued: certs.Issued) -> TlsFiles:
    return TlsFiles(issued.cert, issued.key, issued.ca)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    base = tmp_path_factory.mktemp("pki")
    certs.init_ca(base)
    server = _files(certs.issue("usbipy-test", server=True, base=base,
                                alt_names=("127.0.0.1", "::1")))
    client = _files(certs.issue("alice", server=False, base=base))
    past = datetime.datetime.now(datetime.UTC) - datetime.timedelta(days=10)
    expired = _files(certs.issue("old", server=False, base=base, not_before=past, days=1))
    other = tmp_path_factory.mktemp("other-pki")
    certs.init_ca(other, name="another CA")
    stranger = certs.issue("mallory", server=False, base=other)
    # mallory trusts our CA (she knows whom she talks to); we do not trust hers
    return Pki(base, server, client,
               TlsFiles(stranger.cert, stranger.key, server.ca), expired)


def tls_server(pki: Pki, timeout: float = 10.0) -> ServerTls:
    return ServerTls(server_context(pki.server, kernel=False), kernel=False,
                     handshake_timeout=timeout)


# --- usbipy cert -------------------------------------------------------------------


def test_cert_init_writes_a_private_ca_key_and_refuses_to_replace_it(tmp_path: Path) -> None:
    made = certs.init_ca(tmp_path)
    assert made.cert == tmp_path / "tls/ca.pem"
    assert stat.S_IMODE(os.stat(made.key).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(tmp_path / "tls").st_mode) == 0o700
    with pytest.raises(TlsError, match="exists already.*--force"):
        certs.init_ca(tmp_path)
    before = made.cert.read_bytes()
    certs.init_ca(tmp_path, force=True)
    assert made.cert.read_bytes() != before


def test_cert_issue_needs_a_ca_and_a_plain_name(tmp_path: Path) -> None:
    with pytest.raises(TlsError, match="no CA in .*: run 'usbipy cert init' first"):
        certs.issue("alice", server=False, base=tmp_path)
    certs.init_ca(tmp_path)
    for bad in ("", "a/b", "evil\nname", "-x", "x" * 65, "ca", "alice-key"):
        with pytest.raises(TlsError, match="bad certificate name"):
            certs.issue(bad, server=False, base=tmp_path)
    for days in (0, -3, 100000000):
        with pytest.raises(TlsError, match=f"bad validity {days} days"):
            certs.issue("alice", server=False, base=tmp_path, days=days)
    for san in ("", "bad name", "\u00e9.example", "a..b"):
        with pytest.raises(TlsError, match="bad host name"):
            certs.issue("srv", server=True, base=tmp_path, alt_names=(san,))


def test_cert_issue_never_replaces_a_key_unasked(tmp_path: Path) -> None:
    certs.init_ca(tmp_path)
    made = certs.issue("lab1", server=True, base=tmp_path)
    key = made.key.read_bytes()
    with pytest.raises(TlsError, match="lab1.pem exists already.*--force"):
        certs.issue("lab1", server=False, base=tmp_path)
    assert made.key.read_bytes() == key
    certs.issue("lab1", server=False, base=tmp_path, force=True)
    assert made.key.read_bytes() != key
    assert stat.S_IMODE(os.stat(made.key).st_mode) == 0o600
    # no temporary file is left behind
    assert sorted(p.name for p in made.key.parent.iterdir()) == [
        "ca-key.pem", "ca.pem", "lab1-key.pem", "lab1.pem"]


def test_issued_certificates_carry_names_and_purpose(pki: Pki) -> None:
    from cryptography import x509
    from cryptography.x509.oid import ExtendedKeyUsageOID

    server = x509.load_pem_x509_certificate(pki.server.cert.read_bytes())
    names = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert names.get_values_for_type(x509.DNSName) == ["usbipy-test"]
    assert [str(a) for a in names.get_values_for_type(x509.IPAddress)] == ["127.0.0.1", "::1"]
    usage = server.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(usage) == [ExtendedKeyUsageOID.SERVER_AUTH]
    client = x509.load_pem_x509_certificate(pki.client.cert.read_bytes())
    assert client.subject.rfc4514_string() == "CN=alice"
    usage = client.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(usage) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    assert stat.S_IMODE(os.stat(pki.client.key).st_mode) == 0o600


def test_tls_files_must_come_as_three_and_be_readable(tmp_path: Path, pki: Pki) -> None:
    assert TlsFiles.from_options(None, None, None) is None
    with pytest.raises(TlsError, match="needs --tls-key, --tls-ca too"):
        TlsFiles.from_options("c.pem", None, None)
    # "$CERT" with CERT unset: refused, never taken for "no TLS"
    with pytest.raises(TlsError, match="--tls-cert, --tls-key, --tls-ca given empty"):
        TlsFiles.from_options("", "", "")
    missing = TlsFiles(tmp_path / "nope.pem", pki.client.key, pki.client.ca)
    with pytest.raises(TlsError, match="nope.pem: No such file"):
        client_context(missing)
    swapped = TlsFiles(pki.client.cert, pki.server.key, pki.client.ca)
    with pytest.raises(TlsError, match="not a certificate and its key"):
        client_context(swapped)


# --- a session ---------------------------------------------------------------------


def test_list_and_import_over_mutual_tls(serve, pki: Pki, caplog) -> None:
    caplog.set_level(logging.INFO, "usbipy.server")

    async def test(server: UsbipServer) -> None:
        context = client_context(pki.client)
        devices = await list_devices("127.0.0.1", server.port, tls=context)
        assert [d.busid for d in devices] == ["1-1", "1-2", "1-3"]
        async with await import_device("127.0.0.1", "1-2", server.port, tls=context) as dev:
            assert dev.tls is not None and dev.tls.peer == "CN=usbipy-test"
            assert dev.tls.kernel is False
            descriptor = await dev.control(0x80, 6, 0x0100, 0, 18)
            assert descriptor[:2] == b"\x12\x01"

    serve(test, tls=tls_server(pki))
    # the server names the client by its certificate
    assert "CN=alice: imported 1-2" in caplog.text


def test_the_server_name_is_checked(serve, pki: Pki) -> None:
    async def test(server: UsbipServer) -> None:
        context = client_context(pki.client)
        with pytest.raises(TlsRefused, match="Hostname mismatch.*'lab.example'"):
            await list_devices("127.0.0.1", server.port, tls=context,
                               server_hostname="lab.example")
        # the name the certificate carries, dialed by address
        devices = await list_devices("127.0.0.1", server.port, tls=context,
                                     server_hostname="usbipy-test")
        assert len(devices) == 3

    serve(test, tls=tls_server(pki))


def test_a_server_signed_by_another_ca_is_refused(serve, pki: Pki) -> None:
    async def test(server: UsbipServer) -> None:
        # trusting only the other CA: our server's certificate is not accepted
        other_ca = TlsFiles(pki.client.cert, pki.client.key,
                            pki.stranger.cert.parent / "ca.pem")
        with pytest.raises(TlsRefused, match="certificate is not accepted"):
            await list_devices("127.0.0.1", server.port, tls=client_context(other_ca))

    serve(test, tls=tls_server(pki))


@pytest.mark.parametrize("who, logged", [
    ("stranger", "TLS handshake refused: the peer's certificate is not accepted: "
                 "unable to get local issuer certificate"),
    ("expired", "TLS handshake refused: the peer's certificate is not accepted: "
                "certificate has expired"),
    ("nobody", "TLS handshake refused: the peer sent no certificate"),
])
def test_clients_without_a_valid_certificate_are_refused_and_others_served(
        serve, pki: Pki, caplog, who: str, logged: str) -> None:
    caplog.set_level(logging.INFO, "usbipy.server")

    async def test(server: UsbipServer) -> None:
        if who == "nobody":
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            context.load_verify_locations(pki.server.ca)
        else:
            context = client_context(getattr(pki, who))
        async with await import_device("127.0.0.1", "1-1", server.port,
                                       tls=client_context(pki.client)) as held:
            with pytest.raises(ClientError, match="certificate"):
                await list_devices("127.0.0.1", server.port, tls=context)
            # the session that was there goes on
            assert (await held.control(0x80, 6, 0x0100, 0, 18))[:2] == b"\x12\x01"

    serve(test, tls=tls_server(pki))
    assert logged in caplog.text


# --- the wrong protocol on either side ---------------------------------------------


def test_a_plaintext_client_on_a_tls_port_is_told_at_once(serve, pki: Pki, caplog) -> None:
    caplog.set_level(logging.INFO, "usbipy.server")

    async def test(server: UsbipServer) -> None:
        async with asyncio.timeout(5):  # the handshake timeout is 60 s: no waiting on it
            with pytest.raises(ClientError, match="requires TLS.*--tls-cert"):
                await list_devices("127.0.0.1", server.port)

    serve(test, tls=tls_server(pki, timeout=60))
    assert "the peer does not speak TLS (wrong version number)" in caplog.text


def test_a_tls_client_on_a_plaintext_port_is_told_at_once(serve, pki: Pki, caplog) -> None:
    caplog.set_level(logging.INFO, "usbipy.server")

    async def test(server: UsbipServer) -> None:
        async with asyncio.timeout(5):
            with pytest.raises(TlsRefused, match="closed the connection during the TLS "
                                                 "handshake"):
                await list_devices("127.0.0.1", server.port, tls=client_context(pki.client))

    serve(test)
    assert "a TLS handshake: this port serves plaintext USB/IP" in caplog.text


# --- hostile and broken clients ----------------------------------------------------


async def _raw(port: int, source: str = "127.0.0.2"
               ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A raw connection, from another loopback address than the well-behaved client's
    (the server caps the handshakes in progress per address)."""
    return await asyncio.open_connection("127.0.0.1", port, local_addr=(source, 0))


async def _served(port: int, pki: Pki, devices: int = 3) -> None:
    async with asyncio.timeout(5):
        listed = await list_devices("127.0.0.1", port, tls=client_context(pki.client))
    assert len(listed) == devices


def test_a_stalled_handshake_blocks_nobody_and_times_out(serve, pki: Pki, caplog) -> None:
    caplog.set_level(logging.INFO, "usbipy.server")

    async def test(server: UsbipServer) -> None:
        silent = [await _raw(server.port) for _ in range(10)]
        # half a ClientHello, then nothing
        half_reader, half = await _raw(server.port)
        half.write(bytes.fromhex("160301020001"))
        await half.drain()
        await _served(server.port, pki)
        # each is closed by the handshake timeout (1 s), none earlier than asked
        async with asyncio.timeout(10):
            assert await half_reader.read() == b""
            for reader, _writer in silent:
                assert await reader.read() == b""
        for _reader, writer in [*silent, (half_reader, half)]:
            writer.close()
        await _served(server.port, pki)

    serve(test, tls=tls_server(pki, timeout=1.0))
    # (all eleven from one address: told once, the rest counted for the next line)
    assert caplog.text.count("127.0.0.2:") == 1
    assert caplog.text.count("TLS handshake refused: the TLS handshake timed out") == 1


@pytest.mark.parametrize("sent, why", [
    (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", "does not speak TLS"),
    (bytes.fromhex("00000000") * 64, "does not speak TLS"),
    # a handshake record longer than TLS allows (2^14 + 2048)
    (bytes.fromhex("1603017fff") + bytes(1000), "does not speak TLS"),
    # a record cut off: the client leaves in the middle of it
    (bytes.fromhex("1603010200") + bytes(100), "closed the connection during the TLS handshake"),
])
def test_garbage_and_forged_records_close_only_their_connection(
        serve, pki: Pki, caplog, sent: bytes, why: str) -> None:
    caplog.set_level(logging.INFO, "usbipy.server")

    async def test(server: UsbipServer) -> None:
        async with await import_device("127.0.0.1", "1-1", server.port,
                                       tls=client_context(pki.client)) as held:
            reader, writer = await _raw(server.port)
            writer.write(sent)
            await writer.drain()
            if why.startswith("closed"):
                writer.write_eof()
            async with asyncio.timeout(5):  # closed by the server, at once
                try:
                    while await reader.read(65536):
                        pass
                except ConnectionResetError:
                    pass
            writer.close()
            await _served(server.port, pki, devices=2)  # 1-1 is held
            assert (await held.control(0x80, 6, 0x0100, 0, 18))[:2] == b"\x12\x01"

    serve(test, tls=tls_server(pki))
    assert f"TLS handshake refused: the peer {why}" in caplog.text


def test_a_forged_identity_is_escaped_in_the_log(serve, pki: Pki, caplog,
                                                 tmp_path: Path) -> None:
    """A CN with a newline and an escape sequence, signed by our CA (a CA that signs
    what it is given): it reaches the log escaped, on one line."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    ca_cert = x509.load_pem_x509_certificate((pki.base / "tls/ca.pem").read_bytes())
    ca_key = serialization.load_pem_private_key((pki.base / "tls/ca-key.pem").read_bytes(),
                                                None)
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(
                NameOID.COMMON_NAME, "eve\nusbipyd: INFO: forged\x1b[2J")]))
            .issuer_name(ca_cert.subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .sign(ca_key, hashes.SHA256()))  # type: ignore[arg-type]
    (tmp_path / "eve.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (tmp_path / "eve-key.pem").write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    eve = TlsFiles(tmp_path / "eve.pem", tmp_path / "eve-key.pem", pki.server.ca)
    caplog.set_level(logging.INFO, "usbipy.server")

    async def test(server: UsbipServer) -> None:
        await list_devices("127.0.0.1", server.port, tls=client_context(eve))

    serve(test, tls=tls_server(pki))
    lines = [r.getMessage() for r in caplog.records if "sent the list" in r.getMessage()]
    assert len(lines) == 1
    assert "CN=eve\\nusbipyd: INFO: forged\\x1b[2J: sent the list" in lines[0]
    assert "\n" not in lines[0] and "\x1b" not in lines[0]


# --- kernel TLS is never faked -------------------------------------------------------


needs_no_ktls = pytest.mark.skipif(ktls.available(), reason="this host has kernel TLS")


@needs_no_ktls
def test_without_kernel_tls_prepare_says_what_to_do() -> None:
    with pytest.raises(TlsError, match="kernel TLS is not available.*modprobe tls"):
        ktls.prepare()


@needs_no_ktls
def test_a_kernel_session_that_the_kernel_did_not_take_is_refused(serve, pki: Pki,
                                                                   caplog) -> None:
    """A kernel-TLS server whose OpenSSL could not install the keys in the kernel must
    not carry on in plaintext: the connection is dropped, and the client is told."""
    caplog.set_level(logging.INFO, "usbipy.server")
    tls = ServerTls(server_context(pki.server, kernel=True), kernel=True)

    async def test(server: UsbipServer) -> None:
        with pytest.raises(ClientError):
            await list_devices("127.0.0.1", server.port, tls=client_context(pki.client))

    serve(test, tls=tls)
    assert "OpenSSL did not hand the session to kernel TLS" in caplog.text


@needs_no_ktls
def test_a_kernel_client_handshake_without_kernel_tls_is_refused(pki: Pki) -> None:
    """The attach path: the handshake succeeds, but no plaintext socket is handed on."""
    listener = socket.create_server(("127.0.0.1", 0))
    context = server_context(pki.server, kernel=False)

    def accept() -> None:
        conn, _ = listener.accept()
        with context.wrap_socket(conn, server_side=True) as tls:
            try:
                tls.recv(1)
            except OSError:
                pass

    import threading
    thread = threading.Thread(target=accept)
    thread.start()
    sock = socket.create_connection(listener.getsockname())
    with pytest.raises(TlsError, match="OpenSSL did not hand the session to kernel TLS"):
        ktls.client_handshake(sock, client_context(pki.client, kernel=True), "127.0.0.1", 10)
    thread.join(10)
    listener.close()


class _KernelTlsSocket:
    """getsockopt(SOL_TLS) as net/tls/tls_main.c answers it: exactly 4 bytes (the
    header) or exactly the cipher's struct, else EINVAL; EBUSY with no keys."""

    def __init__(self, cipher: int | None, rx: bool = True) -> None:
        self.cipher = cipher
        self.rx = rx

    def getsockopt(self, level: int, name: int, buflen: int) -> bytes:
        import errno
        assert level == ktls.SOL_TLS
        if self.cipher is None or (name == ktls.TLS_RX and not self.rx):
            raise OSError(errno.EBUSY, "no keys")
        full = 40 if self.cipher == ktls.TLS_CIPHER_AES_GCM_128 else 56
        if buflen not in (4, full):
            raise OSError(errno.EINVAL, "Invalid argument")
        return ktls.CRYPTO_INFO_HEADER.pack(ktls.TLS_1_2_VERSION, self.cipher) + bytes(
            buflen - 4)


@pytest.mark.parametrize("sock, expected", [
    (_KernelTlsSocket(ktls.TLS_CIPHER_AES_GCM_128), True),
    (_KernelTlsSocket(ktls.TLS_CIPHER_AES_GCM_256), True),
    (_KernelTlsSocket(ktls.TLS_CIPHER_AES_GCM_128, rx=False), False),  # sending only
    (_KernelTlsSocket(None), False),
])
def test_kernel_tls_is_recognised_whatever_the_cipher(sock: _KernelTlsSocket,
                                                      expected: bool) -> None:
    assert ktls.installed(sock) is expected  # type: ignore[arg-type]


# --- limits and refusals of the server ---------------------------------------------


def test_a_flood_of_idle_connections_holds_a_bounded_number_of_handshakes(
        serve, pki: Pki, caplog) -> None:
    caplog.set_level(logging.INFO, "usbipy.server")
    flood = limits.MAX_HANDSHAKES_PER_ADDRESS + 24

    async def test(server: UsbipServer) -> None:
        loop = asyncio.get_running_loop()
        idle = []
        for _ in range(flood):  # from another loopback address than the real client
            sock = socket.socket()
            sock.setblocking(False)
            sock.bind(("127.0.0.2", 0))
            await loop.sock_connect(sock, ("127.0.0.1", server.port))
            idle.append(sock)
        try:
            async with asyncio.timeout(5):  # those over the cap are closed at once
                closed = 0
                while closed < flood - limits.MAX_HANDSHAKES_PER_ADDRESS:
                    await asyncio.sleep(0.05)
                    closed = 0
                    for sock in idle:
                        try:
                            closed += sock.recv(1) == b""
                        except BlockingIOError:
                            pass
                        except ConnectionResetError:
                            closed += 1
            assert server.access.admission.handshakes == limits.MAX_HANDSHAKES_PER_ADDRESS
            await _served(server.port, pki)  # another address is served meanwhile
        finally:
            for sock in idle:
                sock.close()

    serve(test, tls=tls_server(pki, timeout=30))
    assert "127.0.0.2: too many TLS handshakes in progress" in caplog.text


class _Stub(HandOffDevice):
    """A device the kernel would serve: it must never get a userspace TLS session."""

    busid = "2-1"

    def __init__(self) -> None:
        self.handed: list[int] = []

    @property
    def info(self) -> DeviceInfo:
        return dataclasses.replace(KEYBOARD, busid="2-1")

    def import_status(self) -> OpStatus:
        return OpStatus.OK

    def hand_off(self, fd: int) -> None:
        self.handed.append(fd)


class _Source(DeviceSource):
    def __init__(self, device: _Stub) -> None:
        self.device = device

    async def devices(self) -> list[_Stub]:
        return [self.device]


def test_no_userspace_tls_session_is_handed_to_the_kernel(serve, pki: Pki, caplog) -> None:
    caplog.set_level(logging.INFO, "usbipy.server")
    stub = _Stub()

    async def test(server: UsbipServer) -> None:
        server.registry.add_source(_Source(stub))
        with pytest.raises(ImportRefused) as refused:
            await import_device("127.0.0.1", "2-1", server.port,
                                tls=client_context(pki.client))
        assert refused.value.status is OpStatus.NA

    serve(test, tls=tls_server(pki))
    assert stub.handed == []
    assert "cannot hand 2-1 to usbip-host over TLS: kernel TLS is not available" in caplog.text


def test_serve_forever_returns_after_close(pki: Pki) -> None:
    async def main() -> None:
        server = UsbipServer(port=0, tls=tls_server(pki))
        await server.start()
        serving = asyncio.ensure_future(server.serve_forever())
        await asyncio.sleep(0)
        await server.close()
        await asyncio.wait_for(serving, 5)

    asyncio.run(main())


def test_a_batch_of_replies_reaches_the_client_whole_and_in_order(pki: Pki) -> None:
    """Small pieces are joined into one record, large ones go in as they are: the client
    decrypts exactly the bytes, in order."""
    from usbipy.server.tls import _TlsTransport
    from usbipy.tls.layer import TlsLayer

    server = TlsLayer(server_context(pki.server, kernel=False), server_side=True)
    client = TlsLayer(client_context(pki.client), server_side=False,
                      server_hostname="127.0.0.1")
    client.start()
    for _ in range(5):  # the handshake, both ways over memory
        server.receive(client.outgoing())
        client.receive(server.outgoing())
    assert server.established and client.established

    class Raw:
        sent: list[bytes] = []

        def write(self, data: bytes) -> None:
            self.sent.append(data)

        def is_closing(self) -> bool:
            return False

    raw = Raw()
    owner = Raw()  # (only held, weakly: a session taken over is not this test's)
    transport = _TlsTransport(raw, server, owner)  # type: ignore[arg-type]
    pieces: list[bytes | memoryview] = [b"h" * 48, os.urandom(65536), b"c" * 13,
                                        memoryview(os.urandom(20000)), b"t" * 48]
    transport.writelines(pieces)
    assert len(raw.sent) == 1  # one write for the batch
    assert client.receive(raw.sent[0]) == b"".join(bytes(p) for p in pieces)


def test_close_right_after_accepting_frees_every_handshake(pki: Pki) -> None:
    """close() in the same loop turn as the accepts: the handshakes that never began
    give back their slots and their sockets."""
    async def main() -> int:
        left = 0
        for _ in range(20):
            server = UsbipServer(port=0, tls=tls_server(pki))
            await server.start()
            clients = []
            for _ in range(8):
                sock = socket.socket()
                sock.setblocking(False)
                try:
                    sock.connect(("127.0.0.1", server.port))
                except BlockingIOError:
                    pass
                clients.append(sock)
            await asyncio.sleep(0)
            await server.close()
            left += server.access.admission.handshakes + len(server._tasks)
            for sock in clients:
                sock.close()
        return left

    assert asyncio.run(main()) == 0


def test_a_broken_record_after_the_handshake_ends_the_session_quietly(pki: Pki) -> None:
    """A reply the protocol writes after a forged record broke the session is dropped,
    not an exception in the event loop."""
    from usbipy.server.tls import TlsServerProtocol

    class Inner(asyncio.Protocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            self.transport = transport

    inner = Inner()

    class Raw(asyncio.Transport):
        closing = False
        sent: list[bytes] = []

        def write(self, data: bytes) -> None:  # type: ignore[override]
            self.sent.append(data)

        def abort(self) -> None:
            self.closing = True

        def close(self) -> None:
            self.closing = True

        def is_closing(self) -> bool:
            return self.closing

        def get_extra_info(self, name: str, default: object = None) -> object:
            return ("127.0.0.1", 1) if name == "peername" else default

    async def main() -> None:
        from usbipy.tls.layer import TlsLayer
        server = TlsServerProtocol(tls_server(pki), lambda: inner)
        raw = Raw()
        server.connection_made(raw)
        client = TlsLayer(client_context(pki.client), server_side=False,
                          server_hostname="127.0.0.1")
        client.start()
        for _ in range(5):
            out = client.outgoing()
            if out:
                server.data_received(out)
            while raw.sent:
                client.receive(raw.sent.pop(0))
        assert client.established
        record = bytearray(client.send(b"x" * 48))
        record[-1] ^= 1  # a forged tag
        server.data_received(bytes(record))
        assert raw.closing
        inner.transport.write(b"a late reply")  # type: ignore[attr-defined]
        inner.transport.writelines([b"more"])  # type: ignore[attr-defined]
        assert raw.sent == []

    asyncio.run(main())


@pytest.mark.parametrize("addr, key", [
    (("192.0.2.7", 40000), "192.0.2.7"),
    (("2001:db8:1:2:aaaa::1", 40000, 0, 0), "2001:db8:1:2::/64"),
    (("2001:db8:1:2:bbbb::9", 40001, 0, 0), "2001:db8:1:2::/64"),  # the same host's /64
    (("::ffff:192.0.2.7", 40000, 0, 0), "192.0.2.7"),
    (("fe80::1%eth0", 40000, 0, 2), "fe80::/64"),
])
def test_handshakes_are_counted_per_ipv4_address_and_ipv6_64(addr: tuple[object, ...],
                                                             key: str) -> None:
    assert limits.client_key(addr) == key


def test_stalled_handshakes_from_many_addresses_keep_no_real_client_out(
        serve, pki: Pki, caplog) -> None:
    # 15 per address stays under the per-address cap; 20 addresses fill the 256 slots
    caplog.set_level(logging.INFO, "usbipy.server")

    async def test(server: UsbipServer) -> None:
        loop = asyncio.get_running_loop()
        idle = []
        try:
            for n in range(300):
                sock = socket.socket()
                sock.setblocking(False)
                sock.bind((f"127.0.1.{1 + n % 20}", 0))
                await loop.sock_connect(sock, ("127.0.0.1", server.port))
                idle.append(sock)
            for _ in range(500):  # until the server has taken them in (10 s at most)
                if server.access.admission.connections >= limits.MAX_HANDSHAKES:
                    break
                await asyncio.sleep(0.02)
            assert server.access.admission.handshakes == limits.MAX_HANDSHAKES
            await _served(server.port, pki)  # (a handshake, then the list, in 5 s)
        finally:
            for sock in idle:
                sock.close()

    serve(test, tls=tls_server(pki))
    assert "TLS handshakes in progress: the oldest was closed to make room" in caplog.text


def test_a_client_the_policy_drops_is_told_so_in_words(serve, pki: Pki) -> None:
    """Not OpenSSL's "UNEXPECTED_EOF_WHILE_READING": the server closed the connection,
    and, as it did so right after the import, its policy may refuse this identity."""
    from usbipy.client import ServerGone, sync
    from usbipy.policy import Action, ClientSelector, Policy, Rule

    alice = Policy((Rule(Action.ALLOW, client=ClientSelector(cn=("alice",)), number=1),),
                   Action.DENY, "the default (deny)")
    nobody = Policy((), Action.DENY, "the default (deny)")
    context = client_context(pki.client)

    def told(lost: BaseException, port: int) -> bool:
        # (closed or reset, as the client's socket saw it: its request may have met
        # the closed socket first, or its read the FIN)
        return re.fullmatch(
            rf"the connection to 127\.0\.0\.1:{port} was lost: the server (closed|reset) "
            r"the connection right after the handshake or the import: its access policy "
            r"may refuse this identity \(its log says why\)", str(lost)) is not None

    async def test(server: UsbipServer) -> None:
        keyboard = await import_device("127.0.0.1", "1-1", server.port, tls=context)
        await server.reconfigure(nobody, Limits())
        with pytest.raises(ServerGone) as lost:
            await keyboard.control(0x80, 6, 0x0100, 0, 18)
        assert told(lost.value, server.port), lost.value
        await server.reconfigure(alice, Limits())
        blocking = await asyncio.to_thread(sync.connect, "127.0.0.1", "1-1", server.port,
                                           tls=context)
        await server.reconfigure(nobody, Limits())
        with pytest.raises(ServerGone) as lost:
            await asyncio.to_thread(blocking.control, 0x80, 6, 0x0100, 0, 18, timeout=5)
        assert told(lost.value, server.port), lost.value
        blocking.close()

    serve(test, tls=tls_server(pki), policy=alice)


def test_a_resumable_tls_attachment_is_bound_to_its_certificate(
        pki: Pki, caplog: pytest.LogCaptureFixture) -> None:
    """Over TLS the token is the certificate's: bob cannot take alice's attachment;
    alice may, from another address (a laptop that changed networks); and a
    connection of hers that drops is resumed with every byte."""
    from usbipy.client import sync
    from usbipy.client.handshake import ResumeRefused, request_resume
    from usbipy.devices import CdcAcm
    from usbipy.server import ServerThread

    caplog.set_level(logging.INFO)
    bob = _files(certs.issue("bob", server=False, base=pki.base))
    with ServerThread([CdcAcm()], port=0, tls=tls_server(pki)) as srv:
        with sync.connect("127.0.0.1", "1-1", srv.port, tls=client_context(pki.client),
                          resume=True) as dev:
            dev.control(0x00, 9, 1, 0, b"")
            assert dev.tls is not None and dev._relay is not None
            relay = dev._relay.relay
            assert relay.grant is not None
            token = relay.grant.token

            def dial(context: ssl.SSLContext, source: str) -> ssl.SSLSocket:
                sock = socket.socket()
                sock.bind((source, 0))
                sock.connect(("127.0.0.1", srv.port))
                return context.wrap_socket(sock, server_hostname="127.0.0.1")

            with dial(client_context(bob), "127.0.0.1") as thief, pytest.raises(
                    ResumeRefused, match="NODEV"):
                request_resume(thief, token, relay.stream.received)
            assert "the token was issued to another certificate" in caplog.text
            # alice from 127.0.0.2 takes it over (and leaves without a FIN: lost again)
            with dial(client_context(pki.client), "127.0.0.2") as moved:
                assert request_resume(moved, token, relay.stream.received) >= 0
            # her relay's connection was replaced: it resumes again, and goes on
            dev.bulk_write(0x02, b"z" * 3000, timeout=20)
            assert dev.bulk_read(0x81, 4096, timeout=20) == b"z" * 3000
        assert re.search(r"127\.0\.0\.2:\d+ CN=alice: resumed 1-1 of 127\.0\.0\.1:\d+ CN=alice",
                         caplog.text), caplog.text
