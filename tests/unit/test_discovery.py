"""DNS-SD records: what a server advertises, and what a browser takes from what it
hears (a hostile responder's record included). No multicast here: the records are
pure; tests/interop/test_fleet.py browses for real, in network namespaces."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import pytest

from usbipy.client import fleet
from usbipy.discovery.records import (
    SERVICE_TYPE,
    Found,
    instance_label,
    parse_service,
    txt_record,
)


def test_the_txt_record_says_version_tls_and_name_and_no_devices() -> None:
    assert txt_record("lab1", tls=True, page_port=None) == {
        "txtvers": "1", "protocol": "1.1.1", "tls": "required", "name": "lab1"}
    assert txt_record("lab1", tls=False, page_port=8443)["page"] == "8443"
    assert SERVICE_TYPE == "_usbip._tcp.local."


def test_an_instance_label_fits_dns() -> None:
    assert instance_label("lab.example.org") == "lab-example-org"
    assert len(instance_label("é" * 100).encode()) <= 63
    assert instance_label("  ") == "usbipy"


def test_a_resolved_service_becomes_a_server() -> None:
    found = parse_service(f"lab1.{SERVICE_TYPE}", ["fe80::1%eth0", "10.0.0.5"], 3240,
                          {b"name": b"Lab 1", b"tls": b"required", b"protocol": b"1.1.1",
                           b"page": b"8443"})
    assert found is not None
    assert (found.name, found.host, found.port, found.tls, found.target) == (
        "Lab 1", "10.0.0.5", 3240, True, "10.0.0.5:3240")
    assert found.page == "https://10.0.0.5:8443/"
    assert Found.from_dict(json.loads(json.dumps(found.as_dict()))) == found
    # a page on an address of its own is linked there
    assert txt_record("lab1", tls=True, page_port=8443, page_host="10.0.1.5")["page"] == (
        "10.0.1.5:8443")
    elsewhere = parse_service(f"lab1.{SERVICE_TYPE}", ["10.0.0.5"], 3240,
                              {b"page": b"10.0.1.5:8443"})
    assert elsewhere is not None and elsewhere.page == "https://10.0.1.5:8443/"
    assert Found.from_dict(json.loads(json.dumps(elsewhere.as_dict()))) == elsewhere
    bad = parse_service(f"lab1.{SERVICE_TYPE}", ["10.0.0.5"], 3240, {b"page": b"evil:8443"})
    assert bad is not None and bad.page is None


@pytest.mark.parametrize("addresses, port, txt", [
    ([], 3240, {}),                                  # no address
    (["10.0.0.5"], 0, {}),                           # no port
    (["not an address"], 3240, {}),
])
def test_a_service_that_cannot_be_used_is_left_out(addresses, port, txt) -> None:
    assert parse_service(f"x.{SERVICE_TYPE}", addresses, port, txt) is None


def test_a_hostile_record_is_kept_raw_and_shown_escaped() -> None:
    found = parse_service(f"x.{SERVICE_TYPE}", ["10.0.0.5"], 3240,
                          {b"name": b"\x1b[2J<b>evil", b"tls": b"maybe", b"page": b"99999"})
    assert found is not None
    assert found.name == "\x1b[2J<b>evil" and "\x1b" not in found.shown_name
    assert found.tls is False and found.page is None  # (only "required" is TLS)


def _found(name: str, port: int) -> Found:
    return Found(f"{name}.{SERVICE_TYPE}", name, ("127.0.0.1",), port, False, "1.1.1")


def test_a_server_found_before_and_silent_now_is_named(tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch
                                                       ) -> None:
    import socket

    from usbipy.devices import HidKeyboard
    from usbipy.discovery import browse as browse_module
    from usbipy.server import ServerThread

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    # one that listens and never answers (the kernel takes the connection; nobody reads)
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen()
    with ServerThread([HidKeyboard()], port=0) as srv:
        servers = [_found("alive", srv.port), _found("silent", silent.getsockname()[1])]

        async def found_now(seconds: float) -> list[Found]:
            return list(servers)

        monkeypatch.setattr(browse_module, "browse", found_now)
        began = time.monotonic()
        answers = asyncio.run(fleet.list_fleet(0.1, per_server=2.0))
        assert time.monotonic() - began < 10
        by_name = {a.server.name: a for a in answers}
        assert [d.busid for d in by_name["alive"].devices or []] == ["1-1"]
        assert by_name["silent"].error == "not answering: no device list in 2 s"
        assert by_name["silent"].failed and not by_name["alive"].failed
        listing = fleet.as_json(answers, lambda d: d.busid)
        assert set(listing[0]) == {"name", "instance", "host", "addresses", "port", "tls",
                                   "protocol", "page", "found_by", "error", "devices"}
        # next time DNS-SD hears only "alive": "silent" is still asked, and named
        servers[:] = [servers[0]]
        answers = asyncio.run(fleet.list_fleet(0.1, per_server=2.0))
        again = {a.server.name: a for a in answers}
        assert again["silent"].found_by == "remembered"
        assert again["silent"].error is not None
        assert again["silent"].error.startswith("not answering")
        assert "last found" in again["silent"].error
        assert not again["silent"].failed  # (named, but the exit status is for found now)
    silent.close()
    saved = json.loads((tmp_path / "usbipy" / "servers.json").read_text())
    assert {s["server"]["name"] for s in saved["servers"]} == {"alive", "silent"}


def test_the_servers_are_asked_at_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                       ) -> None:
    import socket

    from usbipy.discovery import browse as browse_module

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    silent = []
    for _ in range(3):  # (each takes the connection and never answers)
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        silent.append(sock)
    servers = [_found(f"silent{i}", s.getsockname()[1]) for i, s in enumerate(silent)]

    async def found_now(seconds: float) -> list[Found]:
        return list(servers)

    monkeypatch.setattr(browse_module, "browse", found_now)
    began = time.monotonic()
    answers = asyncio.run(fleet.list_fleet(0.1, per_server=2.0, remember=False))
    took = time.monotonic() - began
    assert [a.error for a in answers] == ["not answering: no device list in 2 s"] * 3
    # one after another would take 6 s; at once, the 2 s of one (and start-up)
    assert took < 5.0, took
    for sock in silent:
        sock.close()


@pytest.mark.parametrize("host, loopback", [
    ("127.0.0.1", True), ("127.8.9.10", True), ("::1", True), ("[::1]", True),
    ("::ffff:127.0.0.1", True), ("localhost", True), ("0.0.0.0", False), ("::", False),
    ("10.0.0.5", False), ("fe80::1%eth0", False), ("lab1", False), ("", False),
])
def test_what_counts_as_loopback(host: str, loopback: bool) -> None:
    from usbipy.netaddr import is_loopback

    assert is_loopback(host) is loopback
