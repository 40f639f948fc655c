"""usbipyd's Prometheus endpoint: scraped during a session, the counters move as
the traffic did."""

from __future__ import annotations

import socket
import ssl
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

prometheus_parser = pytest.importorskip("prometheus_client.parser")

from usbipy.client import sync  # noqa: E402
from usbipy.client.errors import Stalled, TransferTimeout  # noqa: E402
from usbipy.devices import CdcAcm, HidKeyboard, ImageFile, MassStorage  # noqa: E402
from usbipy.protocol import Direction  # noqa: E402
from usbipy.server import ServerThread  # noqa: E402
from usbipy.server.http import HttpEndpoint as MetricsEndpoint  # noqa: E402
from usbipy.server.stats import ServerStats, refusal_kind, status_name  # noqa: E402

HOST = "127.0.0.1"
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(url: str) -> Samples:
    with urllib.request.urlopen(url, timeout=10) as reply:
        assert reply.headers["Content-Type"].startswith("text/plain")
        text = reply.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in prometheus_parser.text_string_to_metric_families(text)
            for s in family.samples}


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


@pytest.fixture(autouse=True)
def _fresh(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every scrape reads the server anew (a second's cache would hide the session)."""
    from usbipy.server import metrics

    monkeypatch.setattr(metrics, "SNAPSHOT_MAX_AGE", 0.0)


@pytest.fixture
def served() -> Iterator[tuple[ServerThread, MetricsEndpoint, HidKeyboard]]:
    keyboard = HidKeyboard()
    endpoint = MetricsEndpoint(HOST, 0)
    with ServerThread([keyboard, MassStorage(ImageFile.scratch(1 << 20)), CdcAcm()], port=0,
                      stats=ServerStats()) as srv:
        assert srv.server is not None
        endpoint.start(srv.server, srv.loop)
        try:
            yield srv, endpoint, keyboard
        finally:
            endpoint.close()


def test_counters_move_as_the_traffic_did(
        served: tuple[ServerThread, MetricsEndpoint, HidKeyboard]) -> None:
    srv, endpoint, keyboard = served
    before = scrape(endpoint.url)
    assert value(before, "usbipy_devices_exported") == 3
    assert value(before, "usbipy_urbs_total", busid="1-3", direction="in") == 0
    with sync.connect(HOST, "1-3", srv.port) as serial:
        for _ in range(5):
            serial.control(0x80, 6, 0x0100, 0, 18, timeout=5)  # 5 IN, 18 bytes each
        serial.control(0x00, 9, 1, 0, b"", timeout=5)  # 1 OUT, no data
        serial.bulk_write(0x02, b"x" * 1000, timeout=5)  # 1 OUT, 1000 bytes
        assert serial.bulk_read(0x81, 4096, timeout=5) == b"x" * 1000  # 1 IN
        with pytest.raises(Stalled):
            serial.control(0xC0, 0x42, 0, 0, 4, timeout=5)  # 1 IN, a stall
        with sync.connect(HOST, "1-1", srv.port) as keys:
            keys.control(0x00, 9, 1, 0, b"", timeout=5)
            pending = keys.submit(1, Direction.IN, 8)  # waits for a key: in flight
            during = scrape(endpoint.url)
            keyboard.type_text("a")
            assert keys.wait(pending, timeout=5).data[2] == 0x04
            assert keys.interrupt_read(0x81, 8, timeout=5) == bytes(8)  # the release
            with pytest.raises(TransferTimeout):  # then nothing: unlinked after 0.2 s
                keys.interrupt_read(0x81, 8, timeout=0.2)
    # (the server learns of the close a moment after the client made it)
    deadline = time.monotonic() + 20
    while value(after := scrape(endpoint.url), "usbipy_devices_imported", busid="1-3",
                client=HOST) != 0:
        assert time.monotonic() < deadline, "the closed session is still counted"
        time.sleep(0.02)
    assert value(during, "usbipy_devices_imported", busid="1-3", client=HOST) == 1
    assert value(during, "usbipy_devices_imported", busid="1-1", client=HOST) == 1
    assert value(during, "usbipy_urbs_in_flight", busid="1-1") == 1
    assert value(during, "usbipy_connections_open") == 2
    assert value(after, "usbipy_urbs_total", busid="1-3", direction="in") == 7
    assert value(after, "usbipy_urbs_total", busid="1-3", direction="out") == 2
    assert value(after, "usbipy_urb_bytes_total", busid="1-3", direction="in") == 5 * 18 + 1000
    assert value(after, "usbipy_urb_bytes_total", busid="1-3", direction="out") == 1000
    assert value(after, "usbipy_urb_errors_total", busid="1-3", status="EPIPE") == 1
    assert value(after, "usbipy_urb_errors_total", busid="1-1", status="ECONNRESET") == 1
    assert value(after, "usbipy_imports_total", busid="1-3", client=HOST) == 1
    assert value(after, "usbipy_connections_total") == 2
    assert value(after, "usbipy_devices_imported", busid="1-3", client=HOST) == 0


def test_refused_handshakes_are_counted_by_reason(tmp_path: Path) -> None:
    from usbipy.server.tls import ServerTls
    from usbipy.tls import TlsFiles, certs, server_context

    certs.init_ca(tmp_path)
    issued = certs.issue("usbipy-test", server=True, base=tmp_path, alt_names=("127.0.0.1",))
    tls = ServerTls(server_context(TlsFiles(issued.cert, issued.key, issued.ca), kernel=False),
                    kernel=False, handshake_timeout=10)
    endpoint = MetricsEndpoint(HOST, 0)
    with ServerThread([HidKeyboard()], port=0, tls=tls, stats=ServerStats()) as srv:
        assert srv.server is not None
        endpoint.start(srv.server, srv.loop)
        try:
            with socket.create_connection((HOST, srv.port)) as plain:  # USB/IP, no TLS
                plain.sendall(bytes.fromhex("011180050000000000"))
                plain.settimeout(10)
                assert plain.recv(100) == b""  # refused
            anonymous = ssl.create_default_context(cafile=str(issued.ca))
            with socket.create_connection((HOST, srv.port)) as raw, pytest.raises(
                    (ssl.SSLError, ConnectionError)):
                with anonymous.wrap_socket(raw, server_hostname=HOST) as tls_sock:
                    tls_sock.recv(1)  # (TLS 1.3: the refusal comes after the handshake)
            deadline = time.monotonic() + 10
            while True:  # (the server counts once it has seen each end)
                samples = scrape(endpoint.url)
                refused = {dict(labels)["reason"]: v for (name, labels), v in samples.items()
                           if name == "usbipy_tls_handshakes_refused_total"}
                if sum(refused.values()) >= 2 or time.monotonic() > deadline:
                    break
                time.sleep(0.05)
            assert refused == {"not_tls": 1, "certificate": 1}, refused
        finally:
            endpoint.close()


def test_labels_in_words() -> None:
    assert status_name(-32) == "EPIPE" and status_name(-999) == "-999"
    assert refusal_kind("1.2.3.4:5: TLS handshake refused: the peer sent no certificate") == (
        "certificate")
    assert refusal_kind("x: TLS handshake refused: the TLS handshake timed out") == "timeout"
    assert refusal_kind("x: TLS handshake refused: something new") == "other"


def test_a_busy_port_is_an_error_usbipyd_names(tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    from usbipy.cli.usbipyd import main

    with socket.socket() as busy:
        busy.bind((HOST, 0))
        busy.listen()
        port = busy.getsockname()[1]
        code = main(["-c", "/dev/null", "--demo", "-t", "0", "--metrics", f"{HOST}:{port}"])
    assert code == 1
    err = capsys.readouterr().err
    assert err.startswith(f"usbipyd: cannot serve HTTP on {HOST}:{port}: ")
    assert err.count("\n") == 1
    code = main(["-c", "/dev/null", "--demo", "-t", "0", "--capture",
                 str(tmp_path / "no" / "dir" / "x.pcapng")])
    assert code == 1
    assert "usbipyd: cannot write " in capsys.readouterr().err


def test_scrapes_within_a_second_share_one_snapshot(monkeypatch: pytest.MonkeyPatch) -> None:
    from usbipy.server import metrics

    monkeypatch.setattr(metrics, "SNAPSHOT_MAX_AGE", 60.0)
    endpoint = MetricsEndpoint(HOST, 0)
    calls = []
    real = metrics.snapshot

    async def counted(server):
        calls.append(1)
        return await real(server)

    monkeypatch.setattr(metrics, "snapshot", counted)
    with ServerThread([HidKeyboard()], port=0, stats=ServerStats()) as srv:
        assert srv.server is not None
        endpoint.start(srv.server, srv.loop)
        try:
            for _ in range(5):
                scrape(endpoint.url)
        finally:
            endpoint.close()
    assert len(calls) == 1


def test_resumptions_are_counted_with_how_long_they_were_down(
        served: tuple[ServerThread, MetricsEndpoint, HidKeyboard]) -> None:
    srv, endpoint, _keyboard = served
    with sync.connect(HOST, "1-3", srv.port, resume=True) as serial:
        serial.control(0x00, 9, 1, 0, b"", timeout=5)
        samples = scrape(endpoint.url)
        assert value(samples, "usbipy_resumed_down_seconds_count") == 0
        assert value(samples, "usbipy_resume_waiting") == 0
        relay = serial._relay
        assert relay is not None
        remote = relay.relay.remote
        assert remote is not None
        remote.shutdown(socket.SHUT_RDWR)  # the connection drops under the relay
        serial.bulk_write(0x02, b"y" * 100, timeout=20)
        assert serial.bulk_read(0x81, 4096, timeout=20) == b"y" * 100
        samples = scrape(endpoint.url)
        assert value(samples, "usbipy_resumed_down_seconds_count") == 1
        assert value(samples, "usbipy_resumed_down_seconds_bucket", le="+Inf") == 1
        assert value(samples, "usbipy_resume_expired_total") == 0
