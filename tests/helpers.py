"""Shared test helpers: codec pairs in memory, a fake transport, URB builders.

Test modules import from here, never from one another.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import threading
import wave
from pathlib import Path
from typing import Any

from usbipy.config import Settings, config_path, read_settings
from usbipy.protocol import (
    ClientConnection,
    CmdSubmit,
    CmdUnlink,
    DeviceInfo,
    Direction,
    InterfaceInfo,
    IsoPacket,
    Message,
    OpRepImport,
    OpReqImport,
    OpStatus,
    ServerConnection,
    Speed,
)


def h(*parts: str) -> bytes:
    """Bytes from hex pieces, so golden data reads as the layout."""
    return bytes.fromhex("".join(parts))


def padded(text: str, size: int) -> str:
    return text.encode().ljust(size, b"\0").hex()


#: The device record used by codec-level tests: a keyboard on 3-2.
KEYBOARD = DeviceInfo(
    path="/sys/devices/pci0000:00/0000:00:1d.1/usb3/3-2", busid="3-2", busnum=3, devnum=2,
    speed=Speed.FULL, idVendor=0x1209, idProduct=0x0001, bcdDevice=0x0100,
    bDeviceClass=0, bDeviceSubClass=0, bDeviceProtocol=0, bConfigurationValue=1,
    bNumConfigurations=1, bNumInterfaces=1, interfaces=(InterfaceInfo(3, 1, 1),),
)
#: KEYBOARD as the 312-byte usbip_usb_device record.
KEYBOARD_RECORD = h(
    padded("/sys/devices/pci0000:00/0000:00:1d.1/usb3/3-2", 256),  # path, NUL padded
    padded("3-2", 32),  # busid, NUL padded
    "00000003",  # busnum
    "00000002",  # devnum
    "00000002",  # speed: USB_SPEED_FULL
    "1209",  # idVendor
    "0001",  # idProduct
    "0100",  # bcdDevice
    "00", "00", "00",  # bDeviceClass, bDeviceSubClass, bDeviceProtocol
    "01",  # bConfigurationValue
    "01",  # bNumConfigurations
    "01",  # bNumInterfaces
)
DEVID = (3 << 16) | 2


def imported_server() -> ServerConnection:
    """A server codec that has answered an import of KEYBOARD."""
    server = ServerConnection()
    server.receive_data(h("0111", "8003", "00000000", padded("3-2", 32)))
    assert server.next_event() == OpReqImport("3-2")
    server.send(OpRepImport(OpStatus.OK, KEYBOARD))
    return server


def imported_client() -> ClientConnection:
    """A client codec that has imported KEYBOARD."""
    client = ClientConnection()
    client.send(OpReqImport("3-2"))
    client.receive_data(h("0111", "0003", "00000000") + KEYBOARD_RECORD)
    event = client.next_event()
    assert isinstance(event, OpRepImport) and event.status == OpStatus.OK
    return client


def imported_pair(device: DeviceInfo = KEYBOARD) -> tuple[ClientConnection, ServerConnection]:
    """A client and a server codec that have done a successful import of ``device``."""
    client, server = ClientConnection(), ServerConnection()
    server.receive_data(client.send(OpReqImport(device.busid)))
    assert server.next_event() == OpReqImport(device.busid)
    client.receive_data(server.send(OpRepImport(OpStatus.OK, device)))
    event = client.next_event()
    assert isinstance(event, OpRepImport) and event.status == OpStatus.OK
    return client, server


def drain(conn: ClientConnection | ServerConnection) -> list[Message]:
    """Every whole message buffered in ``conn``."""
    return list(conn.events())


def urb(seqnum: int, ep: int, direction: Direction, length: int = 0, *, data: bytes = b"",
        setup: bytes = bytes(8), flags: int = 0, devid: int = DEVID,
        iso: list[IsoPacket] | None = None) -> CmdSubmit:
    if direction is Direction.OUT and data:
        length = len(data)
    return CmdSubmit(seqnum, devid, direction, ep, flags, length, setup, data, 0,
                     len(iso) if iso is not None else 0, 0, iso)


def unlink(seqnum: int, target: int, devid: int = DEVID) -> CmdUnlink:
    return CmdUnlink(seqnum, devid, target)


class FakeTransport:
    """An asyncio transport that records what the protocol writes and asks for."""

    def __init__(self, peer: tuple[str, int] = ("192.0.2.7", 40000)) -> None:
        self.written = bytearray()
        self.peer = peer
        self.reading = True
        self.pauses = 0
        self.closed = False
        self.aborted = False
        #: Bytes "not yet sent": a client that does not read.
        self.unflushed = 0

    def write(self, data: bytes) -> None:
        assert not self.closed, "write after close"
        self.written += data

    def writelines(self, pieces: list[bytes]) -> None:
        for piece in pieces:
            self.write(piece)

    def pause_reading(self) -> None:
        self.reading = False
        self.pauses += 1

    def resume_reading(self) -> None:
        self.reading = True

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.closed = self.aborted = True

    def is_closing(self) -> bool:
        return self.closed

    def get_write_buffer_size(self) -> int:
        return self.unflushed

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"peername": self.peer}.get(name, default)

    def take(self) -> bytes:
        data, self.written = bytes(self.written), bytearray()
        return data


async def settle(rounds: int = 5) -> None:
    """Let callbacks and short tasks scheduled on the loop run."""
    for _ in range(rounds):
        await asyncio.sleep(0)


def wait_for_log(proc: Any, log: Path, text: str, within: float = 60) -> None:
    """Until ``text`` is in the ``log`` a started ``proc`` (subprocess.Popen) writes;
    AssertionError with the log if it dies or ``within`` seconds pass first."""
    import time

    deadline = time.monotonic() + within
    while text not in log.read_text():
        assert proc.poll() is None, log.read_text()
        assert time.monotonic() < deadline, log.read_text()
        time.sleep(0.05)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def write_wav(path: Path, samples: bytes, *, channels: int = 1, rate: int = 48000) -> Path:
    """A 16-bit PCM WAV file at ``path`` holding ``samples``."""
    with wave.open(str(path), "wb") as wav:
        wav.setnchannels(channels)
        wav.setsampwidth(2)
        wav.setframerate(rate)
        wav.writeframes(samples)
    return path


def signed_by(ca: Any, cn: str, key_path: Path | None = None, *, ip: str | None = None
              ) -> Any:
    """A client certificate for ``cn`` that the CA ``ca`` (a certs.Issued) signs, as a
    cryptography certificate; its key is written to ``key_path`` when given. Unlike
    certs.issue, it takes any CN (a hostile one too) and carries no
    AuthorityKeyIdentifier: only its signature says who issued it. ``ip``: a
    subjectAltName, for a server's certificate."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    ca_cert = x509.load_pem_x509_certificate(ca.cert.read_bytes())
    ca_key = serialization.load_pem_private_key(ca.key.read_bytes(), None)
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    builder = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
            .issuer_name(ca_cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH,
                                                  ExtendedKeyUsageOID.SERVER_AUTH]),
                           critical=False))
    if ip is not None:
        builder = builder.add_extension(x509.SubjectAlternativeName(
            [x509.IPAddress(ipaddress.ip_address(ip))]), critical=False)
    cert = builder.sign(ca_key, hashes.SHA256())
    if key_path is not None:
        key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                               serialization.PrivateFormat.PKCS8,
                                               serialization.NoEncryption()))
    return cert


def daemon_settings(*argv: str) -> Settings:
    """The settings usbipyd would run with, given ``argv``."""
    from usbipy.cli import usbipyd

    cli = usbipyd.build_parser().parse_args(list(argv))
    return read_settings(config_path(cli.config), vars(cli))


class Cutter:
    """A TCP proxy to the server whose connections can be cut (RST both ways), or
    refused for a while, or accepted and never answered (the network still down),
    or accepted and closed (a port forward to a server that is gone)."""

    def __init__(self, port: int) -> None:
        self.target = port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.pairs: list[tuple[socket.socket, socket.socket]] = []
        self.refusing = False
        self.closing = False
        self.silent = False
        self.held: list[socket.socket] = []
        self._cut: set[socket.socket] = set()
        self.accepted = 0
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            if self.refusing:
                reset(client)
                continue
            if self.closing:  # (a port forward whose server is gone)
                client.close()
                continue
            if self.silent:  # (a network down: nothing comes back)
                self.held.append(client)
                continue
            server = socket.create_connection(("127.0.0.1", self.target))
            with self._lock:
                self.pairs.append((client, server))
                self.accepted += 1
            for a, b in ((client, server), (server, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    def cut(self) -> None:
        with self._lock:
            pairs, self.pairs = self.pairs, []
            self._cut.update(sock for pair in pairs for sock in pair)
        for pair in pairs:
            for sock in pair:
                # (SHUT_RD first: a pump blocked in recv() on it holds the socket, and a
                # close alone would send the reset only once that recv returned)
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                    struct.pack("ii", 1, 0))
                    sock.shutdown(socket.SHUT_RD)
        for pair in pairs:
            for sock in pair:
                reset(sock)

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    if src not in self._cut:  # (a cut is a reset, not a FIN)
                        dst.shutdown(socket.SHUT_WR)
                    return
                dst.sendall(data)
        except OSError:
            return

    def close(self) -> None:
        self.listener.close()
        self.cut()
        for sock in self.held:
            sock.close()


def reset(sock: socket.socket) -> None:
    """Close with a reset (SO_LINGER 0): a network that dropped the flow."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()


def scsi(dev: Any, tag: int, cdb: bytes, data_in: int = 0, data_out: bytes = b"",
         timeout: float = 5) -> bytes:
    """One Bulk-Only command on a sync.Device of a mass-storage device: the CBW, the
    data either way, and a CSW that must say the command passed."""
    flags = 0x80 if data_in else 0
    cbw = struct.pack("<IIIBBB16s", 0x43425355, tag, data_in or len(data_out), flags, 0,
                       len(cdb), cdb)
    dev.bulk_write(0x02, cbw, timeout=timeout)
    got = dev.bulk_read(0x81, data_in, timeout=timeout) if data_in else b""
    if data_out:
        dev.bulk_write(0x02, data_out, timeout=timeout)
    csw = dev.bulk_read(0x81, 13, timeout=timeout)
    assert struct.unpack("<IIIB", csw) == (0x53425355, tag, 0, 0)
    return bytes(got)


@contextlib.contextmanager
def serving_status(devices: list[Any], http_tls: Any = None,
                   **server_args: Any) -> Any:
    """``devices`` served on a free port, with the HTTP listener (status API, page,
    metrics) on another of 127.0.0.1, with ``http_tls`` (an SSLContext) if given; the
    rest are the server's arguments (its own ``tls`` among them). Yields (ServerThread,
    HttpEndpoint)."""
    from usbipy.server import ServerThread
    from usbipy.server.http import HttpEndpoint
    from usbipy.server.stats import ServerStats

    endpoint = HttpEndpoint("127.0.0.1", 0, http_tls)
    try:
        with ServerThread(devices, port=0, stats=ServerStats(), **server_args) as srv:
            assert srv.server is not None
            endpoint.start(srv.server, srv.loop)
            yield srv, endpoint
    finally:
        endpoint.close()
