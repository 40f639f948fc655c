"""`usbipy policy check`: what the rules decide, without a server."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from usbipy.cli import usbipy as cli
from usbipy.tls import certs


def usbipy(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    rc = cli.main(list(args))
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.fixture
def config(tmp_path: Path) -> Path:
    lab = tmp_path / "lab"
    certs.init_ca(lab, name="lab CA")
    certs.issue("carol", server=False, base=lab)
    certs.issue("dave", server=False, base=lab)
    other = tmp_path / "other"
    certs.init_ca(other, name="other CA")
    certs.issue("carol", server=False, base=other)
    path = tmp_path / "usbipyd.toml"
    path.write_text(f"""
[devices]
demo = true
disk_size = 1048576
[policy]
default = "deny"
[[policy.rule]]
action = "allow"
client = {{ ca = "{lab}/tls/ca.pem", cn = "carol" }}
device.busid = "1-2"
[[policy.rule]]
action = "allow"
client.san = "*.lab.example"
device.busid = "1-3"
[[policy.rule]]
action = "allow"
client = {{ cn = "erin", network = "10.0.0.0/8" }}
""")
    return path


def test_a_certificate_is_judged_by_its_issuer(capsys, config: Path, tmp_path: Path) -> None:
    c = ["-c", str(config), "--device", "1-2"]
    rc, out, _ = usbipy(capsys, "policy", "check", "--cert", str(tmp_path / "lab/tls/carol.pem"),
                        *c)
    assert rc == 0 and out.startswith("1-2 (1209:0002, serial MSC00000001) for CN=carol: "
                                      "allowed by rule 1 (allow client cn=carol ca=")
    rc, out, _ = usbipy(capsys, "policy", "check", "--cert",
                        str(tmp_path / "other/tls/carol.pem"), *c)
    assert rc == 3 and "denied by the default (deny, usbipyd.toml line 6)" in out
    # the certificate's own CN given as --client too is the same client
    rc, out, _ = usbipy(capsys, "policy", "check", "--client", "carol", "--cert",
                        str(tmp_path / "lab/tls/carol.pem"), *c)
    assert rc == 0 and "for CN=carol: allowed by rule 1" in out
    rc, _, err = usbipy(capsys, "policy", "check", "--client", "dave", "--cert",
                        str(tmp_path / "lab/tls/carol.pem"), *c)
    assert rc == 1 and err == "usbipy: error: --client dave: one CN only (carol given)\n"
    # a name alone cannot satisfy a CA rule, and the check says why
    rc, out, _ = usbipy(capsys, "policy", "check", "--client", "carol", *c)
    assert rc == 3 and ("usbipy: note: rule 1 names a CA: without --cert it matches no "
                        "client here") in out.splitlines()


def test_names_addresses_and_json(capsys, config: Path) -> None:
    c = ["-c", str(config)]
    rc, out, _ = usbipy(capsys, "policy", "check", "--san", "pc7.lab.example",
                        "--device", "1-3", *c)
    assert rc == 0 and "for SAN=pc7.lab.example: allowed by rule 2" in out
    # erin's rule needs both her name and her network
    rc, _, _ = usbipy(capsys, "policy", "check", "--client", "erin", "--device", "1-1", *c)
    assert rc == 3
    rc, out, _ = usbipy(capsys, "policy", "check", "--client", "erin", "--client", "10.2.3.4",
                        "--device", "1-1", "--json", *c)
    assert rc == 0
    result = json.loads(out)
    assert result["allowed"] is True and result["rule"] == 3
    assert result["client"] == "CN=erin from 10.2.3.4"
    assert result["device"] == {"busid": "1-1", "vid_pid": "1209:0001", "serial": "KBD0001"}
    # what the daemon would warn of is said too: here, no TLS for the certificate rules
    assert result["notes"][-1] == "rule 1 names a CA: without --cert it matches no client here"
    assert result["notes"][0].startswith("rule 1 (allow client cn=carol ca=") and \
        result["notes"][0].endswith("names a certificate, but TLS is not configured here: it "
                                    "matches no client unless --tls-cert/--tls-key/--tls-ca "
                                    "are given")


@pytest.mark.parametrize("args, message", [
    (["--device", "1-1"], "policy check: say which client (--client CN|ADDR, --san, --cert)"),
    (["--client", "a", "--client", "b", "--device", "1-1"], "--client b: one CN only (a given)"),
    (["--client", "erin", "--device", "9-9"],
     "no device 9-9: neither emulated by usbipyd's configuration nor plugged in here"),
])
def test_errors(capsys, config: Path, args: list[str], message: str) -> None:
    rc, _, err = usbipy(capsys, "policy", "check", "-c", str(config), *args)
    assert rc == 1 and err == f"usbipy: error: {message}\n"


def test_without_a_configuration_file_the_check_says_so(capsys) -> None:
    rc, _, err = usbipy(capsys, "policy", "check", "--client", "erin", "--device", "1-2")
    assert rc == 1 and err == ("usbipy: error: policy check: no configuration file to "
                               "check: /nonexistent/usbipy/usbipyd.toml does not exist (give "
                               "one with -c FILE)\n")
