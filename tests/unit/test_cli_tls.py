"""`usbipy cert`, and the --tls-* options of usbipy and usbipyd, as a user runs them."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from usbipy.cli import usbipy as cli
from usbipy.cli import usbipyd
from usbipy.tls import ktls

from ..helpers import free_port, wait_for_log
from .fake_sysfs import FakeSysfs


def usbipy(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    rc = cli.main(list(args))
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.fixture
def state(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("USBIPY_STATE_DIR", str(tmp_path / "state"))
    return tmp_path / "state"


def test_cert_init_and_issue(capsys, state: Path) -> None:
    rc, out, _ = usbipy(capsys, "cert", "init")
    assert rc == 0 and out == (f"usbipy: info: CA made: {state}/tls/ca.pem (its key: "
                               f"{state}/tls/ca-key.pem; keep it private)\n")
    rc, out, _ = usbipy(capsys, "cert", "issue", "lab1", "--server", "--san", "10.0.0.7")
    tls = state / "tls"
    assert rc == 0 and out.splitlines() == [
        f"usbipy: info: server certificate for lab1: {tls}/lab1.pem",
        f"usbipy: info: use it with: usbipyd --tls-cert {tls}/lab1.pem --tls-key "
        f"{tls}/lab1-key.pem --tls-ca {tls}/ca.pem"]
    rc, out, _ = usbipy(capsys, "cert", "issue", "alice", "--client", "--json")
    assert rc == 0 and json.loads(out) == {"cert": f"{tls}/alice.pem",
                                           "key": f"{tls}/alice-key.pem",
                                           "ca": f"{tls}/ca.pem"}
    for key in ("ca-key.pem", "lab1-key.pem", "alice-key.pem"):
        assert stat.S_IMODE(os.stat(tls / key).st_mode) == 0o600


@pytest.mark.parametrize("args, message", [
    (["cert", "issue", "alice", "--client"], "no CA in .*: run 'usbipy cert init' first"),
    (["--tls-cert", "a.pem", "list", "-r", "127.0.0.1"],
     "mutual TLS needs --tls-key, --tls-ca too"),
    (["list", "-r", "127.0.0.1", "--tls-cert", "a.pem", "--tls-key", "b.pem", "--tls-ca",
      "c.pem"], "a.pem: No such file or directory"),
    (["--tls-cert", "", "--tls-key", "", "--tls-ca", "", "list", "-r", "127.0.0.1"],
     "given empty"),
    (["--tls-server-name", "lab1", "list", "-r", "127.0.0.1"],
     "--tls-server-name needs --tls-cert, --tls-key and --tls-ca"),
    (["cert", "issue", "ca", "--client"], "bad certificate name 'ca'"),
])
def test_tls_errors_are_one_line(capsys, state: Path, args: list[str], message: str) -> None:
    rc, out, err = usbipy(capsys, *args)
    assert rc == 1 and out == ""
    assert len(err.splitlines()) == 1
    assert err.startswith("usbipy: error: ")
    import re
    assert re.search(message, err), err


@pytest.mark.skipif(ktls.available(), reason="this host has kernel TLS")
def test_attach_over_tls_without_kernel_tls_says_what_to_do(fake: FakeSysfs, capsys,
                                                             state: Path) -> None:
    fake.load_vhci()
    usbipy(capsys, "cert", "init")
    usbipy(capsys, "cert", "issue", "alice", "--client")
    tls = state / "tls"
    rc, _, err = usbipy(capsys, "attach", "-r", "127.0.0.1", "-b", "1-1",
                        "--tls-cert", str(tls / "alice.pem"), "--tls-key",
                        str(tls / "alice-key.pem"), "--tls-ca", str(tls / "ca.pem"))
    assert rc == 1
    assert err == ("usbipy: error: kernel TLS is not available on this host: load it with "
                   "'modprobe tls' (as root; Linux 4.17 or newer with CONFIG_TLS)\n")


@pytest.mark.skipif(ktls.available(), reason="this host has kernel TLS")
def test_usbipyd_ktls_on_refuses_to_start_without_kernel_tls(capsys, state: Path) -> None:
    usbipy(capsys, "cert", "init")
    usbipy(capsys, "cert", "issue", "srv", "--server")
    tls = state / "tls"
    rc = usbipyd.main(["-t", "0", "--no-usbip-host", "--no-libusb", "--ktls", "on",
                       "--tls-cert", str(tls / "srv.pem"), "--tls-key",
                       str(tls / "srv-key.pem"), "--tls-ca", str(tls / "ca.pem")])
    err = capsys.readouterr().err
    assert rc == 1 and "usbipyd: kernel TLS is not available on this host" in err
    assert "Traceback" not in err


@pytest.mark.parametrize("args", [["--ktls", "on"], ["--plaintext-port", "3241"],
                                  ["--tls-handshake-timeout", "5"]])
def test_usbipyd_tls_options_without_tls_are_refused(capsys, args: list[str]) -> None:
    rc = usbipyd.main(["-t", "0", "--no-usbip-host", "--no-libusb", *args])
    err = capsys.readouterr().err
    assert rc == 1 and err == (f"usbipyd: {args[0]}{' on' if args[1] == 'on' else ''} needs "
                               "--tls-cert, --tls-key and --tls-ca\n")


def test_usbipyd_needs_all_three_tls_files(capsys) -> None:
    rc = usbipyd.main(["-t", "0", "--no-usbip-host", "--no-libusb", "--tls-cert", "x.pem"])
    err = capsys.readouterr().err
    assert rc == 1 and err == ("usbipyd: mutual TLS needs --tls-key, --tls-ca too (a "
                               "certificate, its key and the CA of the peers; 'usbipy cert' "
                               "makes them)\n")



@pytest.fixture
def tls_daemon(tmp_path: Path, capsys, state: Path) -> Iterator[tuple[int, int, Path]]:
    """usbipyd --demo with TLS on one port and plaintext on loopback on another."""
    usbipy(capsys, "cert", "init")
    usbipy(capsys, "cert", "issue", "localhost", "--server", "--san", "127.0.0.1")
    usbipy(capsys, "cert", "issue", "alice", "--client")
    tls = state / "tls"
    port, plain = free_port(), free_port()
    log = tmp_path / "usbipyd.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "usbipy.cli.usbipyd", "-c", os.devnull, "--demo",
             "--disk-size", "1048576",
             "-t", str(port), "--plaintext-port", str(plain), "--no-usbip-host",
             "--no-libusb", "--tls-cert", str(tls / "localhost.pem"), "--tls-key",
             str(tls / "localhost-key.pem"), "--tls-ca", str(tls / "ca.pem")],
            stderr=out, env={**os.environ, "PYTHONPATH": str(Path(cli.__file__).parents[2])})
    try:
        wait_for_log(proc, log, "exporting 1-3")
        yield port, plain, tls
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)


def test_list_over_tls_and_over_the_loopback_plaintext_port(capsys, tls_daemon) -> None:
    port, plain, tls = tls_daemon
    client = ["--tls-cert", str(tls / "alice.pem"), "--tls-key", str(tls / "alice-key.pem"),
              "--tls-ca", str(tls / "ca.pem")]
    rc, out, err = usbipy(capsys, "-t", str(port), *client, "list", "-r", "127.0.0.1")
    assert rc == 0, err
    assert "1-2: " in out and "1-3: " in out
    # by name, the certificate's own
    rc, out, err = usbipy(capsys, "-t", str(port), *client, "list", "-r", "localhost",
                          "--json")
    assert rc == 0 and len(json.loads(out)) == 3, err
    rc, out, err = usbipy(capsys, "-t", str(plain), "list", "-r", "127.0.0.1", "--json")
    assert rc == 0 and len(json.loads(out)) == 3, err
    rc, out, err = usbipy(capsys, "-t", str(port), "list", "-r", "127.0.0.1")
    assert rc == 1 and "requires TLS" in err
    rc, out, err = usbipy(capsys, "-t", str(port), *client, "--tls-server-name", "elsewhere",
                          "list", "-r", "127.0.0.1")
    assert rc == 1 and err == (f"usbipy: error: TLS with 127.0.0.1:{port} failed: the peer's "
                               "certificate is not accepted: Hostname mismatch, certificate "
                               "is not valid for 'elsewhere'. (connect by a name the "
                               "certificate carries, or give one with --tls-server-name NAME; "
                               "or issue the server a certificate that names this host: "
                               "usbipy cert issue NAME --server --san HOST)\n")


def test_the_plaintext_port_is_loopback_only(tls_daemon) -> None:
    _port, plain, _tls = tls_daemon
    out = subprocess.run(["ss", "-Hltn", f"sport = :{plain}"], capture_output=True, text=True,
                         check=False).stdout
    if not out.strip():
        pytest.skip("ss cannot list sockets here")
    assert [line.split()[3] for line in out.splitlines()] == [f"127.0.0.1:{plain}"]
