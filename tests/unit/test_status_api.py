"""usbipyd's HTTP listener: the status API's JSON, its live events, an admin's release,
who may see what (loopback, and the policy's grants over mutual TLS), and what a
browser's attacker may not do (another Host, a cross-site POST)."""

from __future__ import annotations

import http.client
import json
import socket
import ssl
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import serving_status
from usbipy.cli import usbipy as cli
from usbipy.client import sync
from usbipy.devices import CdcAcm, HidKeyboard, ImageFile, MassStorage
from usbipy.policy import Action, ClientSelector, DeviceSelector, Grant, Policy, Rule
from usbipy.server import ServerThread
from usbipy.server.http import HttpEndpoint
from usbipy.tls import TlsFiles, client_context, server_context

HOST = "127.0.0.1"
#: A busid a hostile exporter could choose: markup and a terminal escape.
HOSTILE_BUSID = "1-9<script>\x1b[31m"


def wait_for(check: Callable[[], Any], timeout: float = 20.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def get(url: str, *, context: ssl.SSLContext | None = None,
        headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    request = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=10, context=context) as reply:
            return reply.status, dict(reply.headers), reply.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()


def post(url: str, *, content_type: str | None = "application/json",
         context: ssl.SSLContext | None = None,
         headers: dict[str, str] | None = None) -> tuple[int, Any]:
    request = urllib.request.Request(url, data=b"{}", method="POST", headers={
        **({"Content-Type": content_type} if content_type else {}), **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=10, context=context) as reply:
            return reply.status, json.loads(reply.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def status_of(base: str, context: ssl.SSLContext | None = None) -> dict[str, Any]:
    code, _headers, body = get(f"{base}/api/v1/status", context=context)
    assert code == 200, body
    result: dict[str, Any] = json.loads(body)
    return result


def device(status: dict[str, Any], busid: str) -> dict[str, Any]:
    [found] = [d for d in status["devices"] if d["busid"] == busid]
    result: dict[str, Any] = found
    return result


@pytest.fixture
def served() -> Iterator[tuple[ServerThread, HttpEndpoint]]:
    hostile = CdcAcm()
    hostile.busid = HOSTILE_BUSID
    with serving_status([HidKeyboard(), MassStorage(ImageFile.scratch(1 << 20)), hostile]
                        ) as served:
        yield served


DEVICE_KEYS: dict[str, Any] = {"busid": str, "vid_pid": str, "vendor": (str, type(None)),
               "product": (str, type(None)), "serial": (str, type(None)), "speed": str,
               "via": str, "state": str, "rule": (str, type(None)),
               "client": (dict, type(None)), "can_release": bool}
CLIENT_KEYS: dict[str, Any] = {"address": (str, type(None)), "cn": (str, type(None)),
               "since": (str, type(None)), "seconds": (float, int, type(None)),
               "bytes_in": (int, type(None)), "bytes_out": (int, type(None)),
               "protected": bool}


def check_schema(status: dict[str, Any]) -> None:
    assert set(status) == {"api", "server", "you", "devices", "servers"}
    assert status["api"] == 1
    assert set(status["server"]) == {"name", "version", "tls", "addresses", "port"}
    assert isinstance(status["server"]["port"], int)
    assert set(status["you"]) == {"client", "grant"}
    assert isinstance(status["servers"], list)
    for record in status["devices"]:
        assert set(record) == set(DEVICE_KEYS), record
        for key, kind in DEVICE_KEYS.items():
            assert isinstance(record[key], kind), (key, record[key])
        assert record["state"] in ("available", "in-use", "served-by-kernel", "gone")
        assert record["via"] in ("emulated", "usbip-host", "libusb")
        if record["client"] is not None:
            assert set(record["client"]) == set(CLIENT_KEYS)
            for key, kind in CLIENT_KEYS.items():
                assert isinstance(record["client"][key], kind), (key, record["client"])


def test_the_status_lists_every_device_in_the_documented_shape(served) -> None:
    srv, endpoint = served
    status = status_of(endpoint.base)
    check_schema(status)
    assert [d["busid"] for d in status["devices"]] == ["1-1", "1-2", HOSTILE_BUSID]
    assert status["you"] == {"client": "127.0.0.1", "grant": "admin"}
    keyboard = device(status, "1-1")
    assert (keyboard["vid_pid"], keyboard["state"], keyboard["via"],
            keyboard["can_release"]) == ("1209:0001", "available", "emulated", False)
    assert status["server"]["port"] == srv.port


def test_an_import_shows_who_holds_it_and_an_admin_releases_it(served) -> None:
    srv, endpoint = served
    with sync.connect(HOST, "1-1", srv.port) as dev:
        dev.control(0x80, 6, 0x0100, 0, 18, timeout=5)
        record = wait_for(lambda: (r := device(status_of(endpoint.base), "1-1"))
                          ["state"] == "in-use" and r["client"]["bytes_out"] and r)
        check_schema(status_of(endpoint.base))
        assert record["client"]["address"] == "127.0.0.1"
        assert record["client"]["protected"] is False
        assert record["client"]["bytes_out"] >= 18
        assert record["client"]["since"].endswith("Z")
        assert record["can_release"] is True
        code, body = post(f"{endpoint.base}/api/v1/devices/1-1/release")
        assert (code, body) == (200, {"released": "1-1", "client": "127.0.0.1"})
        with pytest.raises(Exception):  # noqa: B017 (the session is gone: any error)
            for _ in range(50):
                dev.control(0x80, 6, 0x0100, 0, 18, timeout=5)
                time.sleep(0.05)
    wait_for(lambda: device(status_of(endpoint.base), "1-1")["state"] == "available")
    code, body = post(f"{endpoint.base}/api/v1/devices/1-1/release")
    assert code == 409 and "not in use" in body["error"]
    code, body = post(f"{endpoint.base}/api/v1/devices/9-9/release")
    assert code == 404


def test_events_arrive_when_a_device_is_imported(served) -> None:
    srv, endpoint = served
    connection = http.client.HTTPConnection(HOST, endpoint.port, timeout=20)
    connection.request("GET", "/api/v1/events")
    reply = connection.getresponse()
    assert reply.status == 200
    assert reply.headers["Content-Type"].startswith("text/event-stream")

    def next_status() -> dict[str, Any]:
        event = None
        while True:
            line = reply.fp.readline().decode()
            assert line, "the stream ended"
            if line.startswith("event: "):
                event = line[7:].strip()
            elif line.startswith("data: ") and event == "status":
                result: dict[str, Any] = json.loads(line[6:])
                return result

    first = next_status()
    assert device(first, "1-1")["state"] == "available"
    with sync.connect(HOST, "1-1", srv.port):
        began = time.monotonic()
        for _ in range(40):  # (each event is a change; the import is one of them)
            update = next_status()
            if device(update, "1-1")["state"] == "in-use":
                break
        else:
            pytest.fail("no event showed the import")
        assert time.monotonic() - began < 10
    connection.close()


def test_a_browser_attack_is_refused(served) -> None:
    srv, endpoint = served
    # DNS rebinding: a page of evil.example whose name now resolves to 127.0.0.1
    code, _headers, _body = get(f"{endpoint.base}/api/v1/status",
                                headers={"Host": f"evil.example:{endpoint.port}"})
    assert code == 421
    with sync.connect(HOST, "1-1", srv.port):
        wait_for(lambda: device(status_of(endpoint.base), "1-1")["state"] == "in-use")
        # CSRF: a cross-site form can send neither JSON nor this server's Origin
        assert post(f"{endpoint.base}/api/v1/devices/1-1/release",
                    content_type="application/x-www-form-urlencoded")[0] == 415
        assert post(f"{endpoint.base}/api/v1/devices/1-1/release",
                    headers={"Origin": "http://evil.example"})[0] == 403
        assert device(status_of(endpoint.base), "1-1")["state"] == "in-use"
        assert post(f"{endpoint.base}/api/v1/devices/1-1/release",
                    headers={"Origin": endpoint.base})[0] == 200


def test_the_page_is_served_with_a_strict_policy(served) -> None:
    _srv, endpoint = served
    code, headers, body = get(f"{endpoint.base}/")
    assert code == 200 and b"/static/app.js" in body
    assert headers["Content-Type"].startswith("text/html")
    assert "default-src 'self'" in headers["Content-Security-Policy"]
    assert headers["X-Content-Type-Options"] == "nosniff"
    code, headers, body = get(f"{endpoint.base}/static/app.js")
    assert code == 200 and headers["Content-Type"].startswith("text/javascript")
    for sink in (b"innerHTML", b"outerHTML", b"insertAdjacentHTML", b"document.write"):
        assert sink not in body  # (peer strings go in as text, never as markup)
    assert get(f"{endpoint.base}/static/../../etc/passwd")[0] == 404
    # a browser asks for an icon first: no reply after it has a second Content-Length
    assert get(f"{endpoint.base}/favicon.ico")[0] == 204
    code, headers, _body = get(f"{endpoint.base}/api/v1/status")
    raw = http.client.HTTPConnection(HOST, endpoint.port, timeout=10)
    raw.request("GET", "/api/v1/status")
    assert [k for k, _v in raw.getresponse().getheaders()].count("Content-Length") == 1
    raw.close()


def test_status_prints_what_a_peer_chose_escaped(served, capsys) -> None:
    srv, endpoint = served
    with sync.connect(HOST, "1-1", srv.port):
        wait_for(lambda: device(status_of(endpoint.base), "1-1")["state"] == "in-use")
        assert cli.main(["status", "-r", f"{HOST}:{endpoint.port}"]) == 0
    out = capsys.readouterr().out
    assert "\x1b" not in out
    assert "1-9<script>\\x1b[31m" in out
    assert "in use by 127.0.0.1" in out and "plaintext" in out
    assert cli.main(["status", "-r", f"{HOST}:{endpoint.port}", "--json"]) == 0
    listing = json.loads(capsys.readouterr().out)
    check_schema(listing["servers"][0]["status"])


# --- over mutual TLS: the policy's grants ---------------------------------------------


@pytest.fixture
def pki(tmp_path: Path) -> Path:
    from usbipy.tls import certs

    certs.init_ca(tmp_path)
    certs.issue("localhost", server=True, base=tmp_path, alt_names=("127.0.0.1",))
    for name in ("watcher", "operator", "stranger", "prober"):
        certs.issue(name, server=False, base=tmp_path)
    return tmp_path / "tls"


def files(pki: Path, name: str) -> TlsFiles:
    return TlsFiles(pki / f"{name}.pem", pki / f"{name}-key.pem", pki / "ca.pem")


GRANTS = Policy((
    Rule(None, client=ClientSelector(cn=("watcher",)), grant=Grant.VIEW, number=1),
    Rule(None, client=ClientSelector(cn=("operator",)), device=DeviceSelector(busid=("1-1",)),
         grant=Grant.ADMIN, number=2),
    Rule(None, client=ClientSelector(cn=("operator",)), grant=Grant.VIEW, number=3),
    Rule(None, client=ClientSelector(cn=("prober",)), device=DeviceSelector(busid=("1-2",)),
         grant=Grant.VIEW, number=4),
), default=Action.ALLOW)


@pytest.fixture
def served_tls(pki: Path) -> Iterator[tuple[ServerThread, HttpEndpoint]]:
    with serving_status([HidKeyboard(), MassStorage(ImageFile.scratch(1 << 20))],
                        server_context(files(pki, "localhost"), kernel=False),
                        policy=GRANTS) as served:
        yield served


def test_over_tls_the_grants_decide_who_sees_and_who_releases(served_tls, pki) -> None:
    srv, endpoint = served_tls
    assert endpoint.base.startswith("https://")
    stranger = client_context(files(pki, "stranger"))
    code, _headers, body = get(f"{endpoint.base}/api/v1/status", context=stranger)
    assert code == 403 and b"CN=stranger from 127.0.0.1 may not view" in body
    assert get(f"{endpoint.base}/", context=stranger)[0] == 403
    assert get(f"{endpoint.base}/metrics", context=stranger)[0] == 403

    watcher = client_context(files(pki, "watcher"))
    operator = client_context(files(pki, "operator"))
    # a grant on one device shows that device, and not the metrics, which name them all
    prober = client_context(files(pki, "prober"))
    assert [d["busid"] for d in status_of(endpoint.base, prober)["devices"]] == ["1-2"]
    code, _headers, body = get(f"{endpoint.base}/metrics", context=prober)
    assert code == 403 and b"may not read the metrics" in body
    assert get(f"{endpoint.base}/metrics", context=watcher)[0] == 200
    seen = status_of(endpoint.base, watcher)
    check_schema(seen)
    assert seen["you"] == {"client": "CN=watcher from 127.0.0.1", "grant": "view"}
    assert seen["server"]["tls"] is False  # (the USB/IP listener's, not this one's)
    with sync.connect(HOST, "1-1", srv.port):
        record = wait_for(lambda: (r := device(status_of(endpoint.base, watcher), "1-1"))
                          ["state"] == "in-use" and r)
        assert record["can_release"] is False
        code, body = post(f"{endpoint.base}/api/v1/devices/1-1/release", context=watcher)
        assert code == 403 and "may not release" in body["error"]
        as_operator = status_of(endpoint.base, operator)
        assert as_operator["you"]["grant"] == "admin"
        assert device(as_operator, "1-1")["can_release"] is True
        assert device(as_operator, "1-2")["can_release"] is False
        code, body = post(f"{endpoint.base}/api/v1/devices/1-1/release", context=operator)
        assert (code, body["released"]) == (200, "1-1")


def test_a_plaintext_request_on_the_tls_listener_gets_no_answer(served_tls) -> None:
    _srv, endpoint = served_tls
    with socket.create_connection((HOST, endpoint.port), timeout=10) as sock:
        sock.sendall(b"GET /api/v1/status HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        received = b""
        try:
            while chunk := sock.recv(4096):
                received += chunk
        except (ConnectionResetError, TimeoutError):
            pass
    assert b"HTTP/" not in received and b"devices" not in received


def test_a_client_without_a_certificate_is_refused(served_tls) -> None:
    _srv, endpoint = served_tls
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    with pytest.raises((ssl.SSLError, ConnectionResetError, urllib.error.URLError)):
        with urllib.request.urlopen(f"{endpoint.base}/api/v1/status", timeout=10,
                                    context=context) as reply:
            reply.read()


def test_requests_at_once_are_bounded(served) -> None:
    _srv, endpoint = served
    from usbipy.server import http as http_module

    # every request thread waits for a request that does not come (for its timeout)...
    idle = [socket.create_connection((HOST, endpoint.port), timeout=10)
            for _ in range(http_module.MAX_REQUESTS)]
    try:
        # ...so one more connection is closed unanswered, not given a thread
        with socket.create_connection((HOST, endpoint.port), timeout=10) as extra:
            extra.sendall(b"GET /api/v1/status HTTP/1.0\r\n\r\n")
            try:
                answer = extra.recv(100)
            except ConnectionResetError:
                answer = b""
            assert answer == b""
    finally:
        for sock in idle:
            sock.close()

    def answered() -> bool:  # (the threads end as they see their sockets close)
        try:
            return get(f"{endpoint.base}/api/v1/status")[0] == 200
        except (OSError, http.client.HTTPException):
            return False

    wait_for(answered)


def test_the_status_off_loopback_needs_tls(capsys) -> None:
    from usbipy.cli.usbipyd import main

    for check in ([], ["--check-config"]):
        assert main(["-c", "/dev/null", "--demo", "-t", "0", "--http", "192.0.2.1:8080",
                     *check]) == 1
        err = capsys.readouterr().err
        assert err.count("\n") == 1
        assert "a status page on an address other than loopback needs mutual TLS" in err
    assert main(["-c", "/dev/null", "--demo", "-t", "0", "--metrics", "192.0.2.1:9100",
                 "--check-config"]) == 1
    assert "--metrics is its older name" in capsys.readouterr().err


def test_status_refuses_what_is_not_the_api(capsys) -> None:
    import http.server

    answers = [{"server": {"name": "x", "port": "\x1b]0;owned\x07\x1b[2J", "version": "1"},
                "devices": [{"busid": "1-1\x1b[31m", "state": "in-use",
                             "client": "not a dict"}]},
               ["not", "an", "object"]]

    class Fake(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (the base's name)
            body = json.dumps(answers[0]).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    fake = http.server.ThreadingHTTPServer((HOST, 0), Fake)
    import threading

    threading.Thread(target=fake.serve_forever, daemon=True).start()
    try:
        where = f"{HOST}:{fake.server_address[1]}"
        assert cli.main(["status", "-r", where]) == 0
        out = capsys.readouterr().out
        assert "\x1b" not in out and "\x07" not in out
        assert "port \\x1b]0;owned" in out and "1-1\\x1b[31m" in out
        answers.pop(0)
        assert cli.main(["status", "-r", where]) == 1
        err = capsys.readouterr().err
        assert "not in the shape of usbipy's API" in err and "Traceback" not in err
    finally:
        fake.shutdown()
        fake.server_close()


def test_a_device_that_left_is_shown_gone_then_forgotten(served, monkeypatch) -> None:
    srv, endpoint = served
    from usbipy.server import status as status_module

    assert device(status_of(endpoint.base), "1-2")["state"] == "available"
    assert srv.server is not None
    srv.call(srv.server.registry.remove, "1-2")
    gone = wait_for(lambda: (r := device(status_of(endpoint.base), "1-2"))["state"] == "gone"
                    and r)
    assert (gone["state"], gone["client"], gone["can_release"]) == ("gone", None, False)
    assert gone["vid_pid"] == "1209:0002"
    check_schema(status_of(endpoint.base))
    monkeypatch.setattr(status_module, "GONE_KEPT", 0.0)
    wait_for(lambda: "1-2" not in [d["busid"] for d in status_of(endpoint.base)["devices"]])


def test_a_release_body_is_bounded(served) -> None:
    _srv, endpoint = served
    for length, code in (("-1", 400), ("abc", 400), (str(1 << 30), 413)):
        with socket.create_connection((HOST, endpoint.port), timeout=10) as sock:
            sock.sendall(f"POST /api/v1/devices/1-1/release HTTP/1.1\r\nHost: {HOST}\r\n"
                         f"Content-Type: application/json\r\nContent-Length: {length}\r\n"
                         "\r\n".encode())
            answer = sock.recv(200)
        assert answer.startswith(f"HTTP/1.0 {code}".encode()), (length, answer)


def trickle_is_cut(port: int, message: bytes) -> None:
    """``message`` sent a byte each 0.2 s (never silent for a read's timeout): the
    server ends the connection within a few seconds all the same."""
    with socket.create_connection((HOST, port), timeout=10) as sock:
        began = time.monotonic()
        cut = False
        for index in range(40):
            try:
                sock.sendall(message[index % len(message):][:1])
                ready = socket.socket.recv(sock, 1, socket.MSG_DONTWAIT)
                if ready == b"":
                    cut = True
                    break
            except BlockingIOError:
                pass
            except OSError:
                cut = True
                break
            time.sleep(0.2)
        assert cut and time.monotonic() - began < 5


def test_a_request_that_trickles_in_is_cut_at_its_deadline(served, monkeypatch) -> None:
    _srv, endpoint = served
    from usbipy.server import http as http_module

    monkeypatch.setattr(http_module, "REQUEST_TIMEOUT", 1.0)
    trickle_is_cut(endpoint.port, b"GET /api/v1/status HTTP/1.1\r\nX-Padding: " + b"x" * 64)


def test_a_handshake_that_trickles_in_is_cut_at_its_deadline(served_tls, monkeypatch
                                                              ) -> None:
    _srv, endpoint = served_tls
    from usbipy.server import http as http_module

    monkeypatch.setattr(http_module, "REQUEST_TIMEOUT", 1.0)
    # (a real ClientHello, slowly: no certificate is needed to hold a thread so)
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    outgoing = ssl.MemoryBIO()
    hello = context.wrap_bio(ssl.MemoryBIO(), outgoing)
    with pytest.raises(ssl.SSLWantReadError):
        hello.do_handshake()
    trickle_is_cut(endpoint.port, outgoing.read())


def test_a_failure_is_a_json_500_and_a_log_line(served, monkeypatch, caplog) -> None:
    _srv, endpoint = served
    assert endpoint.board is not None

    async def broken() -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(endpoint.board, "devices", broken)
    code, _headers, body = get(f"{endpoint.base}/api/v1/status")
    assert code == 500 and json.loads(body) == {"error": "the server failed; its log says why"}
    assert "http: GET /api/v1/status failed" in caplog.text


def test_a_tls_session_shows_its_certificate_and_traffic_both_ways(pki, caplog) -> None:
    """The USB/IP session itself over mutual TLS: the page names the client's CN, says
    the session is protected, and counts the bytes each way; the log names the admin
    who released it."""
    import logging

    from usbipy.server.tls import ServerTls

    tls = ServerTls(server_context(files(pki, "localhost"), kernel=False), kernel=False)
    with serving_status([CdcAcm()], None, tls=tls) as (srv, endpoint), \
            sync.connect(HOST, "1-1", srv.port,
                         tls=client_context(files(pki, "watcher"))) as acm:
        acm.control(0x00, 9, 1, 0, b"")  # SET_CONFIGURATION
        acm.bulk_write(0x02, b"ping" * 256, timeout=5)
        echoed = b""
        while len(echoed) < 1024:  # (the port echoes, in packets of its own size)
            echoed += acm.bulk_read(0x81, 1024, timeout=5)
        assert echoed == b"ping" * 256
        record = wait_for(lambda: (r := device(status_of(endpoint.base), "1-1"))["client"]
                          and r["client"]["bytes_in"] >= 1024 and r)
        client = record["client"]
        assert (client["cn"], client["protected"], client["address"]) == (
            "watcher", True, "127.0.0.1")
        assert client["bytes_out"] >= 1024
        with caplog.at_level(logging.WARNING, logger="usbipy.server"):
            assert post(f"{endpoint.base}/api/v1/devices/1-1/release")[0] == 200
        assert ("1-1: released from 127.0.0.1:" in caplog.text
                and "CN=watcher" in caplog.text and "by 127.0.0.1 (status page)"
                in caplog.text), caplog.text
