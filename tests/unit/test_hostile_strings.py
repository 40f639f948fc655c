"""Strings a peer chooses (a busid, a certificate's CN) never reach a terminal or a
log raw: a newline cannot forge a line, ESC cannot drive the terminal, a C1
control or U+202E cannot reorder what is shown. Each place that prints one is
fed the worst of them."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.serialization import Encoding

from usbipy.cli.usbipy import main
from usbipy.devices import HidKeyboard
from usbipy.server import ServerThread
from usbipy.server.tls import ServerTls
from usbipy.tls import TlsFiles, certs, server_context

from ..helpers import signed_by
from .fake_sysfs import FakeSysfs

HOST = "127.0.0.1"
#: A line break, a forged check line, ESC (clear screen), a C1 NEL, LINE SEPARATOR,
#: RIGHT-TO-LEFT OVERRIDE: 30 bytes, within a busid's 32.
HOSTILE = "1-1\n✘ TLS: ok\x1b[2J\x85\u2028\u202e"
RAW = ("\n", "\x1b", "\x85", "\u2028", "\u202e")


def assert_clean(text: str) -> None:
    """No raw control from HOSTILE in ``text``, and no line of it forged."""
    for ch in RAW[1:]:
        assert ch not in text, (ch, text)
    assert not any(line.lstrip().startswith("✘ TLS: ok") for line in text.splitlines()), text


@pytest.fixture
def hostile_server() -> Iterator[ServerThread]:
    keyboard = HidKeyboard()
    keyboard.busid = HOSTILE
    with ServerThread([keyboard], port=0) as srv:
        yield srv


@pytest.mark.parametrize("command", [
    ["list", "-r", HOST],
    ["doctor", "-r", HOST],
    ["doctor", "-r", HOST, "-b", HOSTILE],
])
def test_a_hostile_busid_is_escaped_in_every_command(
        hostile_server: ServerThread, fake: FakeSysfs, capsys, command: list[str]) -> None:
    fake.load_vhci()
    main(["-t", str(hostile_server.port), *command])
    out, err = capsys.readouterr()
    assert_clean(out + err)
    assert "\\x1b[2J" in out + err  # shown, escaped
    # and in JSON, whose escapes keep it whole
    main(["-t", str(hostile_server.port), "--json", *command])
    out, _ = capsys.readouterr()
    assert_clean(out)
    if command[0] == "list":
        assert json.loads(out)[0]["busid"] == HOSTILE


def test_a_hostile_busid_is_escaped_in_the_server_s_log(hostile_server: ServerThread,
                                                        caplog) -> None:
    caplog.set_level(logging.DEBUG, logger="usbipy")
    assert main(["-t", str(hostile_server.port), "attach", "-r", HOST, "-b",
                 HOSTILE + "x"]) == 1  # (asks for a busid it does not have)
    assert_clean("\n".join(r.getMessage() for r in caplog.records))


@pytest.fixture
def hostile_pki(tmp_path: Path) -> tuple[TlsFiles, TlsFiles]:
    """A server and a client certificate of one CA, both with the hostile CN."""
    ca = certs.init_ca(tmp_path)
    files = []
    for name in ("server", "client"):
        key = tmp_path / f"{name}-key.pem"
        cert = tmp_path / f"{name}.pem"
        cert.write_bytes(signed_by(ca, HOSTILE, key, ip=HOST).public_bytes(Encoding.PEM))
        files.append(TlsFiles(cert, key, ca.cert))
    return files[0], files[1]


def test_a_hostile_certificate_name_is_escaped(hostile_pki: tuple[TlsFiles, TlsFiles],
                                               fake: FakeSysfs, caplog, capsys) -> None:
    server, client = hostile_pki
    keyboard = HidKeyboard()
    tls = ServerTls(server_context(server, kernel=False), kernel=False, handshake_timeout=10)
    caplog.set_level(logging.DEBUG, logger="usbipy")
    fake.load_vhci()
    options = ["--tls-cert", str(client.cert), "--tls-key", str(client.key), "--tls-ca",
               str(client.ca)]
    with ServerThread([keyboard], port=0, tls=tls) as srv:
        # doctor names the server by its certificate; the server's log, the client
        assert main(["-t", str(srv.port), *options, "doctor", "-r", HOST]) == 0
        assert main(["-t", str(srv.port), *options, "list", "-r", HOST]) == 0
    out, err = capsys.readouterr()
    assert_clean(out + err)
    assert_clean("\n".join(r.getMessage() for r in caplog.records))


@pytest.mark.parametrize("separator", ["\r", "\v", "\f", "\x1c", "\x1d", "\x1e", "\x85",
                                       "\u2028", "\u2029"])
def test_a_doctor_check_breaks_lines_only_where_it_means_to(separator: str) -> None:
    from usbipy.doctor.report import Check, Status

    check = Check("device list", Status.OK, f"1 offered: a{separator}b\nsecond line",
                  "a fix")
    assert check.lines() == [f"✔ device list: 1 offered: a{separator!r}b".replace("'", ""),
                             "    second line", "    a fix"]


def test_a_hostile_certificate_name_is_escaped_in_the_metrics_labels() -> None:
    from usbipy.policy import Client
    from usbipy.server.stats import ServerStats, client_label

    label = client_label(Client("10.0.0.1", cn=HOSTILE))
    assert_clean(label)
    assert "\n" not in label and label.startswith("CN=1-1\\n")
    stats = ServerStats()
    stats.imported("1-1", Client("10.0.0.1", cn=HOSTILE))
    assert [who for _busid, who in stats.imports] == [label]
