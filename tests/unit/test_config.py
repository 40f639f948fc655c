"""usbipyd's configuration file: every key it takes, every error it names, and how the
command line and a reload combine with it."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from tests.helpers import daemon_settings
from usbipy.cli import usbipyd
from usbipy.config import ConfigError, Document, Limits, Settings, load
from usbipy.config import file as config_file
from usbipy.config.options import DEFAULTS, SETTINGS, TABLES
from usbipy.errors import UsbipError
from usbipy.policy import Action
from usbipy.server import service

SAMPLE = """\
# every key there is
listen = ["0.0.0.0", "::"]
port = 3241
family = "ipv4"
state_dir = "state"
usbip_host = false
libusb = false
loop = "asyncio"
debug = true
pid_file = "/run/usbipyd.pid"

[devices]
demo = true
disk = "disk.img"
read_only = true
disk_size = 1048576
serial = "pty"

[tls]
cert = "server.pem"
key = "server-key.pem"
ca = "ca.pem"
ktls = "off"
handshake_timeout = 5
plaintext_port = 3242

[limits]
max_connections = 100
max_connections_per_address = 10
accept_rate = 2.5
accept_burst = 5
request_timeout = 3
idle_timeout = 1.5

[names]
yubikey = { vid_pid = "1050:*" }

[policy]
default = "deny"

[[policy.rule]]
action = "allow"
client.cn = ["alice", "bob"]
device.name = "yubikey"

[[policy.rule]]
action = "deny"
client = { network = "10.9.0.0/16" }
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "usbipyd.toml"
    path.write_text(text)
    return path


def test_every_key_of_the_sample(tmp_path: Path) -> None:
    config = load(write(tmp_path, SAMPLE))
    d = str(tmp_path)
    assert config.options == {
        "address": ["0.0.0.0", "::"], "tcp_port": 3241, "family": "ipv4",
        "state_dir": f"{d}/state", "usbip_host": False, "libusb": False, "loop": "asyncio",
        "debug": True, "pid": "/run/usbipyd.pid",
        "demo": True, "disk": f"{d}/disk.img", "read_only": True, "disk_size": 1048576,
        "serial": "pty",
        # relative paths are the file's directory's
        "tls_cert": f"{d}/server.pem", "tls_key": f"{d}/server-key.pem",
        "tls_ca": f"{d}/ca.pem", "ktls": "off", "tls_handshake_timeout": 5.0,
        "plaintext_port": 3242,
    }
    assert config.limits_over(Limits()) == Limits(100, 10, 2.5, 5, 3.0, 1.5)
    policy = config.policy
    assert policy is not None and policy.default is Action.DENY
    assert [str(rule) for rule in policy.rules] == [
        "rule 1 (allow client cn=alice|bob device name=yubikey, usbipyd.toml line 41)",
        "rule 2 (deny client network=10.9.0.0/16, usbipyd.toml line 46)"]
    assert policy.default_reason == "the default (deny, usbipyd.toml line 39)"


def test_every_option_of_usbipyd_has_a_key() -> None:
    # (what the command line sets, the file can set; flags that only act once are apart)
    keys = {setting.dest for table in TABLES.values() for setting in table.values()}
    options = {action.dest for action in usbipyd.build_parser()._actions
               if action.dest not in ("help", "version", "config", "check_config")}
    assert options - keys == {"daemon"}
    assert keys <= options


def test_one_schema_makes_the_options_and_the_keys() -> None:
    """Each setting's option and key come from the one entry: same dest, same kind."""
    parser = usbipyd.build_parser()
    by_flag = {flag: action for action in parser._actions for flag in action.option_strings}
    for setting in SETTINGS:
        for flag in setting.flags:
            action = by_flag[flag]
            assert action.dest == setting.dest and action.default is None
            if setting.kind is not None and setting.kind.parse is not None:
                assert action.type is setting.kind.parse
            if setting.kind is not None and setting.kind.choices is not None:
                assert tuple(action.choices or ()) == setting.kind.choices


#: (file text, the error: FILE is the file's path)
ERRORS = [
    ("port = 3240\nport = 1\n", "FILE:2: cannot overwrite a value (column 9)"),
    ("[tls\n", "FILE:1: expected ']' at the end of a table declaration (column 5)"),
    ("prot = 3240\n", "FILE:1: prot: unknown key (known: debug, device_mode, devices, "
                      "diagnostics, export, family, libusb, limits, listen, loop, names, "
                      "pid_file, policy, port, rules_only, server, state_dir, tls, usbip_host)"),
    ("port = '3240'\n", "FILE:1: port: '3240' is not a whole number"),
    # "" names no table: the top's keys are not set through it
    ("[\"\"]\nport = 5\n", "FILE:1: : unknown key (known: debug, device_mode, devices, "
                          "diagnostics, export, family, libusb, limits, listen, loop, names, "
                          "pid_file, policy, port, rules_only, server, state_dir, tls, "
                          "usbip_host)"),
    ("port = 70000\n", "FILE:1: port: 70000 is out of range (0 to 65535)"),
    ("port = true\n", "FILE:1: port: True is not a whole number"),
    ("debug = 1\n", "FILE:1: debug: 1 is not true or false"),
    ("listen = []\n", "FILE:1: listen: an empty list"),
    ("listen = ['']\n", "FILE:1: listen: empty"),
    ("loop = 'trio'\n", "FILE:1: loop: 'trio' is not one of auto, asyncio, uvloop"),
    ("devices = 1\n", "FILE:1: devices: 1 is not a table"),
    ("\n[devices]\ndemo = true\nnoise = 1\n",
     "FILE:4: devices.noise: unknown key (known: audio, demo, disk, disk_size, microphone, "
     "read_only, serial, speaker, tone, webcam)"),
    ("[tls]\nhandshake_timeout = 0\n",
     "FILE:2: tls.handshake_timeout: 0 is out of range (more than 0, at most 3600)"),
    ("[limits]\naccept_rate = -1\n", "FILE:2: limits.accept_rate: -1 is not a positive number"),
    ("[limits]\nmax_conections = 5\n",
     "FILE:2: limits.max_conections: unknown key (known: accept_burst, accept_rate, "
     "dead_peer_timeout, idle_timeout, max_connections, max_connections_per_address, "
     "request_timeout, resume_buffer, resume_buffers, resume_window)"),
    ("[limits]\nresume_window = -1\n",
     "FILE:2: limits.resume_window: -1 is out of range (0 or more, at most 3600)"),
    ("[limits]\nresume_buffer = 1024\n",
     "FILE:2: limits.resume_buffer: 1024 is out of range (4194304 to 1099511627776)"),
    ("[names]\nkey = { product = 'x' }\n",
     "FILE:2: names.key.product: unknown key (known: busid, serial, vid_pid)"),
    ("[names]\nkey = {}\n",
     "FILE:2: names.key: names nothing (give one of busid, vid_pid, serial)"),
    ("[names]\nkey = { vid_pid = '1050' }\n",
     "FILE:2: names.key.vid_pid: '1050' is not VID:PID, four hex digits each (wildcards * "
     "and ?)"),
    ("[names]\nkey = { vid_pid = '46d:c52b' }\n",  # (it would never match "046d:c52b")
     "FILE:2: names.key.vid_pid: '46d:c52b' is not VID:PID, four hex digits each (wildcards * "
     "and ?)"),
    ("[names]\nkey = { busid = '1 2' }\n",
     "FILE:2: names.key.busid: '1 2' is not a busid such as 1-2.3"),
    ("[policy]\n[[policy.rule]]\naction = 'allow'\ndevice.busid = '1-1'\n",
     'FILE:1: policy.default: missing: say "allow" or "deny" (what a client gets '
     'for a device no rule matches)'),
    ("[policy]\ndefault = 'maybe'\n",
     "FILE:2: policy.default: 'maybe' is not one of allow, deny"),
    ("[policy]\ndefault = 'deny'\nrules = []\n",
     "FILE:3: policy.rules: unknown key (known: default, rule)"),
    ("[policy]\ndefault = 'deny'\n[[policy.rule]]\ndevice.busid = '1-1'\n",
     'FILE:3: policy.rule[1]: action: missing: say "allow" or "deny" (or grant "view" '
     'or "admin" of the status page)'),
    ("[policy]\ndefault = 'deny'\n[[policy.rule]]\naction = 'permit'\n",
     "FILE:4: policy.rule[1].action: 'permit' is not one of allow, deny"),
    ("[policy]\ndefault = 'deny'\n[[policy.rule]]\naction = 'allow'\n",
     "FILE:3: policy.rule[1]: names no device and no client (a rule for every client and "
     "device is policy.default)"),
    ("[policy]\ndefault = 'deny'\n[[policy.rule]]\naction = 'allow'\ndevice = {}\n",
     "FILE:5: policy.rule[1].device: names nothing (give one of busid, vid_pid, serial, "
     "name)"),
    ("[policy]\ndefault = 'deny'\n[[policy.rule]]\naction = 'allow'\ndevice.busid = '1-1'\n"
     "[[policy.rule]]\naction = 'allow'\ndevice.name = 'scope'\n",
     "FILE:8: policy.rule[2].device.name: 'scope' matches no name in [names] (known: none)"),
    ("[policy]\ndefault = 'deny'\n[[policy.rule]]\naction = 'allow'\n"
     "client = { cn = 'a', user = 'b' }\n",
     "FILE:5: policy.rule[1].client.user: unknown key (known: ca, cn, network, san)"),
    ("[policy]\ndefault = 'deny'\n[[policy.rule]]\naction = 'allow'\n"
     "client.network = '10.0.0.1/8'\n",
     "FILE:5: policy.rule[1].client.network: '10.0.0.1/8' is not a network such as "
     "10.0.0.0/8 (10.0.0.1/8 has host bits set)"),
    ("[policy]\ndefault = 'deny'\n[[policy.rule]]\naction = 'allow'\n"
     "client.ca = 'missing.pem'\n",
     "FILE:5: policy.rule[1].client.ca: DIR/missing.pem: No such file or directory"),
    ("[policy]\ndefault = 'deny'\n[[policy.rule]]\naction = 'allow'\n"
     "client.ca = 'usbipyd.toml'\n",
     "FILE:5: policy.rule[1].client.ca: DIR/usbipyd.toml: not a PEM certificate"),
    ("[policy]\ndefault = 'deny'\n[[policy.rule]]\naction = 'allow'\nclient.cn = 5\n",
     "FILE:5: policy.rule[1].client.cn: 5 is not a string"),
    ("[policy]\ndefault = 'deny'\nrule = 5\n",
     "FILE:3: policy.rule: is not a list of rules: write [[policy.rule]]"),
    ("[[export]]\nvid_pid = '0483:df11'\n[[export]]\nvid_pid = '483:df11'\n",
     "FILE:4: export[2].vid_pid: '483:df11' is not VID:PID, four hex digits each (wildcards * "
     "and ?)"),
    ("[[export]]\nvid_pid = '0483:df11'\nvia = 'usbfs'\n",
     "FILE:3: export[1].via: 'usbfs' is not one of usbip-host, libusb"),
    ("[[export]]\ninterface_class = 9\n",
     "FILE:2: export[1].interface_class: 0x09 is the hub class: a hub cannot be exported (its "
     "devices can)"),
    ("[[export]]\ninterface_class = ['storage']\n",
     "FILE:2: export[1].interface_class: 'storage' is not a class code, 0 to 255 (0x08: mass "
     "storage, 0xff: vendor specific)"),
    ("[[export]]\nvia = 'libusb'\n",
     "FILE:1: export[1]: names no device (give busid, vid_pid, serial, name or "
     "interface_class)"),
    ("[[export]]\nproduct = '0001'\n",
     "FILE:2: export[1].product: unknown key (known: busid, interface_class, name, serial, via, "
     "vid_pid)"),
    ("[[export]]\nname = 'probe'\n",
     "FILE:2: export[1].name: 'probe' matches no name in [names] (known: none)"),
    ("export = 5\n", "FILE:1: export: is not a list of rules: write [[export]]"),
]


@pytest.mark.parametrize(("text", "message"), ERRORS,
                         ids=[m.split(": ", 1)[1][:40] for _t, m in ERRORS])
def test_every_error_names_file_line_and_key(tmp_path: Path, text: str, message: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as caught:
        load(path)
    assert str(caught.value) == message.replace("FILE", str(path)).replace("DIR",
                                                                           str(tmp_path))


def test_unreadable_and_undecodable_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"nope.toml: No such file or directory$"):
        load(tmp_path / "nope.toml")
    path = tmp_path / "latin1.toml"
    path.write_bytes(b"# caf\xe9\n")
    with pytest.raises(ConfigError, match=r"latin1.toml: not UTF-8 text"):
        load(path)


def test_key_lines_know_tables_dotted_keys_and_multiline_values(tmp_path: Path) -> None:
    doc = Document.parse('''\
title = """
port = 1
"""
listen = [
  "a",
  "b",
]
"quoted.key" = 1
[policy]
default = "deny"
[[policy.rule]]
action = "allow"
[[policy.rule]]
client . cn = "x"
device = { busid = "1-1" }
''', Path("f.toml"))
    assert doc.line(("title",)) == 1
    assert doc.line(("port",)) is None  # inside a string, not a key
    assert doc.line(("listen",)) == 4
    assert doc.line(("quoted.key",)) == 8
    assert doc.line(("policy", "default")) == 10
    assert doc.line(("policy", "rule", 0, "action")) == 12
    assert doc.line(("policy", "rule", 1, "client", "cn")) == 14
    assert doc.line(("policy", "rule", 1, "device", "busid")) == 15  # its inline table's line
    assert doc.line(("policy", "rule", 1, "nothing")) == 13  # the rule's header


def settings(*argv: str) -> Settings:
    return daemon_settings(*argv)


def test_options_win_over_the_file(tmp_path: Path) -> None:
    path = write(tmp_path, "port = 4000\nusbip_host = false\n[devices]\nserial = 'pty'\n"
                           "[limits]\nidle_timeout = 4\nrequest_timeout = 9\n")
    base = settings("-c", str(path))
    assert base.options.tcp_port == 4000 and base.options.usbip_host is False
    assert base.options.serial == "pty" and base.options.loop == "auto"  # a default
    over = settings("-c", str(path), "-t", "5000", "--usbip-host", "--serial", "echo",
                    "--idle-timeout", "2")
    assert over.options.tcp_port == 5000 and over.options.usbip_host is True
    assert over.options.serial == "echo"
    assert (over.limits.idle_timeout, over.limits.request_timeout) == (2.0, 9.0)
    # and "no" wins too
    assert settings("-c", str(path), "--no-libusb").options.libusb is False
    assert settings("-6").options.family == "ipv6"


def test_no_file_means_no_policy_and_default_limits(tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(config_file, "DEFAULT_PATH", tmp_path / "absent.toml")
    plain = settings()
    assert plain.file is None and plain.policy.open and plain.limits == Limits()
    # the default file is read when it exists
    default = write(tmp_path, "[policy]\ndefault = 'deny'\n")
    monkeypatch.setattr(config_file, "DEFAULT_PATH", default)
    assert settings().file == default and not settings().policy.open


def test_check_config(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "disk.img").write_bytes(bytes(1 << 20))
    tls = SAMPLE[SAMPLE.index("[tls]"):SAMPLE.index("[limits]")]
    path = write(tmp_path, SAMPLE.replace(tls, "\n" * tls.count("\n")))  # (lines kept)
    assert usbipyd.main(["-c", str(path), "--check-config"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == f"usbipyd: {path}: ok"
    # a rule on certificate names without TLS can never match: said, not refused
    assert out[1].startswith("usbipyd: rule 1 (allow client cn=alice|bob") and \
        out[1].endswith("names a certificate, but TLS is not configured here: it matches no "
                        "client unless --tls-cert/--tls-key/--tls-ca are given")
    assert "usbipyd: access policy: 2 rules, then the default (deny, usbipyd.toml line 39)" in out
    one = write(tmp_path, "[policy]\ndefault = 'deny'\n[[policy.rule]]\naction = 'allow'\n"
                          "device.busid = '1-2'\n")
    assert usbipyd.main(["-c", str(one), "--check-config"]) == 0
    assert "usbipyd: access policy: 1 rule, then the default (deny, usbipyd.toml line 2)" in \
        capsys.readouterr().out
    bad = write(tmp_path, "port = 'x'\n")
    assert usbipyd.main(["-c", str(bad), "--check-config"]) == 1
    assert capsys.readouterr().err == f"usbipyd: {bad}:1: port: 'x' is not a whole number\n"


def test_a_bad_file_starts_nothing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = write(tmp_path, "[devices]\ndemo = true\n[policy]\ndefault = 'deny'\n"
                          "[[policy.rule]]\naction = 'allow'\n")
    assert usbipyd.main(["-c", str(bad), "-t", "0"]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"usbipyd: {bad}:5: policy.rule[1]: names no device and no client")
    assert "listening" not in err


@pytest.mark.parametrize(("argv", "message"), [
    (["--idle-timeout", "0"], "argument --idle-timeout: 0 is out of range (more than 0, at "
                              "most 3600)"),
    (["--request-timeout", "inf"], "argument --request-timeout: inf is out of range (more "
                                   "than 0, at most 3600)"),
    (["--accept-rate", "nan"], "argument --accept-rate: nan is out of range (more than 0, "
                               "at most 1e+06)"),
    (["--max-connections", "99999999"], "argument --max-connections: 99999999 is out of "
                                        "range (1 to 1048576)"),
    (["-t", "70000"], "argument -t/--tcp-port: 70000 is out of range (0 to 65535)"),
    (["--disk-size", "x"], "argument --disk-size: 'x' is not a whole number"),
])
def test_options_take_the_ranges_of_the_file(capsys: pytest.CaptureFixture[str],
                                             argv: list[str], message: str) -> None:
    with pytest.raises(SystemExit) as exit_:
        usbipyd.main([*argv, "--check-config"])
    assert exit_.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1] == f"usbipyd: error: {message}"


def test_namespace_keeps_every_default() -> None:
    ns = settings().options
    assert isinstance(ns, argparse.Namespace)
    assert {k: getattr(ns, k) for k in DEFAULTS} == DEFAULTS


ROOT = Path(__file__).parents[2]


def test_the_readme_sample_and_its_policy_check(tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    import re

    from usbipy.cli import usbipy

    readme = (ROOT / "README.md").read_text()
    sample = re.search(r"```toml\n(.*?)```", readme, re.S)
    assert sample is not None
    # (the same lines, with the demo devices to check against)
    path = write(tmp_path, sample.group(1).replace("demo = false", "demo = true "))
    config = load(path)
    assert config.policy is not None and len(config.policy.rules) == 4
    shown = re.findall(r"^      \$ usbipy (policy check .*)\n      (.*)$", readme, re.M)
    assert len(shown) == 2
    for command, output in shown:
        status = usbipy.main([*command.split(), "-c", str(path)])
        assert capsys.readouterr().out.rstrip("\n") == output
        assert status == (0 if "allowed" in output else 3)


def test_the_systemd_unit_checks_then_runs_and_reloads_with_sighup() -> None:
    unit = (ROOT / "systemd/usbipyd.service").read_text()
    lines = [tuple(line.split("=", 1)) for line in unit.splitlines()
             if "=" in line and not line.startswith("#")]
    execs = [(key, value) for key, value in lines if key.startswith("Exec")]
    assert [key for key, _ in execs] == ["ExecStartPre", "ExecStart", "ExecReload",
                                         "ExecReload"]
    # the file is checked before a start and before the reload's SIGHUP
    assert execs[-1][1] == "/bin/kill -HUP $MAINPID"
    for key, value in execs[:3]:
        program, *argv = value.split()
        assert program == "/opt/usbipy/bin/usbipyd"
        parsed = usbipyd.build_parser().parse_args(argv)
        assert parsed.config == "/etc/usbipy/usbipyd.toml"
        assert parsed.check_config is (key != "ExecStart")


def test_a_line_separator_inside_a_comment_does_not_shift_the_lines(tmp_path: Path) -> None:
    path = write(tmp_path, "# caf\u2028e\nport = 1\nloop = 'x'\n")
    with pytest.raises(ConfigError, match=r"usbipyd.toml:3: loop: 'x' is not one of"):
        load(path)


def test_triple_quotes_in_a_comment_or_a_string_are_not_a_multiline_string(
        tmp_path: Path) -> None:
    for text in ("port = 3240  # do not use '''\nloop = 'x'\n",
                 "state_dir = \"a'''b\"\nloop = 'x'\n"):
        with pytest.raises(ConfigError, match=r"usbipyd.toml:2: loop: 'x' is not one of"):
            load(write(tmp_path, text))


def test_tls_may_come_partly_from_the_file_and_partly_from_options(tmp_path: Path) -> None:
    path = write(tmp_path, "[tls]\nca = 'ca.pem'\n[policy]\ndefault = 'deny'\n"
                           "[[policy.rule]]\naction = 'allow'\nclient.cn = 'alice'\n")
    both = settings("-c", str(path), "--tls-cert", "s.pem", "--tls-key", "k.pem")
    assert both.options.tls_ca == f"{tmp_path}/ca.pem" and both.warnings == []
    with pytest.raises(UsbipError, match="mutual TLS needs --tls-cert, --tls-key too"):
        settings("-c", str(path))


def test_mapped_ipv6_networks_are_their_ipv4_networks(tmp_path: Path) -> None:
    from usbipy.policy import Client, DeviceFacts
    path = write(tmp_path, "[policy]\ndefault = 'deny'\n[[policy.rule]]\naction = 'allow'\n"
                           "client.network = '::ffff:10.0.0.0/104'\n")
    policy = load(path).policy
    assert policy is not None
    disk = DeviceFacts("1-2", 1, 2)
    assert policy.decide(Client("10.1.2.3"), disk).allowed
    assert policy.decide(Client("::ffff:10.1.2.3"), disk).allowed
    assert not policy.decide(Client("11.1.2.3"), disk).allowed


def test_a_reload_reads_the_file_it_started_with(tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    # started from the default file; that file is gone at the reload: an error, never
    # "no file, so no policy"
    import asyncio

    path = write(tmp_path, "[policy]\ndefault = 'deny'\n")
    monkeypatch.setattr(config_file, "DEFAULT_PATH", path)
    running = settings()
    assert running.file == path and not running.policy.open
    path.unlink()

    class Server:
        async def reconfigure(self, *_: object) -> None:
            raise AssertionError("the policy must not change")

    kept = asyncio.run(service.reload(Server(), running))  # type: ignore[arg-type]
    assert kept is running


@pytest.mark.parametrize(("text", "message"), [
    # what a start would refuse, --check-config refuses too
    ("[tls]\nplaintext_port = 3241\n",
     "--plaintext-port needs --tls-cert, --tls-key and --tls-ca"),
    ("[tls]\ncert = 'a.pem'\nkey = 'k.pem'\n",
     "mutual TLS needs --tls-ca too (a certificate, its key and the CA of the peers; 'usbipy "
     "cert' makes them) ([tls] cert, key and ca in FILE)"),
    # a file the configuration names is said at its line and key
    ("[tls]\ncert = 'a.pem'\nkey = 'k.pem'\nca = 'c.pem'\n",
     "FILE:2: tls.cert: DIR/a.pem: No such file or directory"),
    ("[devices]\ndisk = 'none.img'\n", "DIR/none.img"),
])
def test_check_config_checks_what_a_start_checks(tmp_path: Path, text: str, message: str,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path, text)
    assert usbipyd.main(["-c", str(path), "--check-config"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("usbipyd: ") and err.count("\n") == 1
    assert message.replace("FILE", str(path)).replace("DIR", str(tmp_path)) in err


def test_tls_without_a_policy_is_said(tmp_path: Path) -> None:
    path = write(tmp_path, "[tls]\ncert = 'a.pem'\nkey = 'k.pem'\nca = 'c.pem'\n")
    assert settings("-c", str(path)).warnings == [
        "mutual TLS and no [policy] in a configuration file: every client whose certificate "
        "the CA signed may list and import every device"]
    assert settings().warnings == []


@pytest.mark.parametrize(("text", "message"), [
    ("[[policy.rule]]\naction = 'allow'\ndevice.busid = '1-1'\n",
     'FILE:1: policy.default: missing: say "allow" or "deny" (what a client gets for a device '
     'no rule matches)'),
    ("port = ", "FILE: invalid value at the end of the file"),
    ("[limits]\naccept_rate = inf\n",
     "FILE:2: limits.accept_rate: inf is out of range (at most 1e+06)"),
])
def test_more_errors(tmp_path: Path, text: str, message: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as caught:
        load(path)
    assert str(caught.value) == message.replace("FILE", str(path))


def test_bracket_wildcards_in_ids(tmp_path: Path) -> None:
    from usbipy.policy import Client, DeviceFacts
    path = write(tmp_path, "[policy]\ndefault = 'deny'\n[[policy.rule]]\naction = 'allow'\n"
                           "device = { vid_pid = '0483:374[0-9]', busid = '1-[!1]' }\n")
    policy = load(path).policy
    assert policy is not None
    assert policy.decide(Client(), DeviceFacts("1-2", 0x0483, 0x3748)).allowed
    assert not policy.decide(Client(), DeviceFacts("1-1", 0x0483, 0x3748)).allowed
    assert not policy.decide(Client(), DeviceFacts("1-2", 0x0483, 0x374B)).allowed


def test_a_multiline_string_in_an_array_keeps_later_lines(tmp_path: Path) -> None:
    text = 'listen = ["""a\nb""", "c"]\nloop = "x"\n'
    with pytest.raises(ConfigError, match=r"usbipyd.toml:3: loop: 'x' is not one of"):
        load(write(tmp_path, text))


def test_main_gives_sighup_back_as_it_found_it() -> None:
    import signal

    before = signal.getsignal(signal.SIGHUP)
    assert usbipyd.main(["-c", "/dev/null", "--check-config"]) == 0
    assert signal.getsignal(signal.SIGHUP) is before


def test_an_error_after_the_start_is_said_once(monkeypatch: pytest.MonkeyPatch,
                                               capsys: pytest.CaptureFixture[str],
                                               caplog: pytest.LogCaptureFixture) -> None:
    """In the foreground, a start that fails once prepared (no uvloop, a capture file
    that cannot be opened) is one line on stderr, not a log line and the line again."""
    def no_loop(main: object, loop: str) -> None:
        main.close()  # type: ignore[attr-defined]
        raise UsbipError("uvloop is not installed: pip install 'usbipy[fast]'")

    monkeypatch.setattr(service, "run_loop", no_loop)
    with caplog.at_level("ERROR", logger="usbipyd"):
        status = usbipyd.main(["-c", "/dev/null", "-t", "0", "--no-usbip-host", "--no-libusb",
                               "--demo"])
    assert status == 1
    err = capsys.readouterr().err
    assert err.count("uvloop is not installed") == 1, err
    assert "uvloop is not installed" not in caplog.text


def test_grant_rules_give_the_status_page_and_decide_no_import(tmp_path: Path) -> None:
    from usbipy.policy import Client, DeviceFacts, Grant

    policy = load(write(tmp_path, """
[policy]
default = "allow"
[[policy.rule]]
grant = "admin"
client.cn = "ops-*"
[[policy.rule]]
grant = "view"
client.network = "10.0.0.0/8"
device.busid = "1-*"
[[policy.rule]]
action = "deny"
grant = "view"
client.cn = "guest"
""")).policy
    assert policy is not None
    facts = DeviceFacts("1-2", 0x1209, 0x0002)
    ops, lab, guest = Client("10.1.2.3", cn="ops-anna"), Client("10.1.2.3"), Client(cn="guest")
    assert policy.grant(ops, facts) is Grant.ADMIN
    assert policy.grant(lab, facts) is Grant.VIEW
    assert policy.grant(lab, DeviceFacts("2-1", 1, 1)) is None
    assert policy.grant(Client("192.0.2.1"), facts) is None
    assert policy.grants_anything(lab) and not policy.grants_anything(Client("192.0.2.1"))
    # a rule that only grants decides nothing of imports; one that does both, both
    assert policy.decide(ops, facts).allowed
    assert not policy.decide(guest, facts).allowed
    assert policy.grant(guest, facts) is Grant.VIEW
    assert "grant admin" in str(policy.rules[0])


def test_a_bad_grant_is_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"policy\.rule\[1\]\.grant: 'root' is not one of "
                                          "view, admin"):
        load(write(tmp_path, "[policy]\ndefault = 'deny'\n[[policy.rule]]\ngrant = 'root'\n"
                             "client.cn = 'x'\n"))


def test_http_and_advertising_settings(tmp_path: Path) -> None:
    settings = load(write(tmp_path, """
[server]
advertise = false
name = "lab 1"
[diagnostics]
http = "127.0.0.1:8080"
""")).options
    assert (settings["advertise"], settings["server_name"], settings["http"]) == (
        False, "lab 1", ("127.0.0.1", 8080))
    with pytest.raises(ConfigError, match="server.name: .*1 to 63 printable"):
        load(write(tmp_path, '[server]\nname = "a\\u0007b"\n'))
    with pytest.raises(UsbipError, match="--http and --metrics name one listener"):
        service.http_address(argparse.Namespace(http=("127.0.0.1", 1),
                                                metrics=("127.0.0.1", 2)))


def test_grant_rules_and_the_status_listener_are_checked_together(tmp_path: Path) -> None:
    from usbipy.config import read_settings

    grant = '[policy]\ndefault = "allow"\n[[policy.rule]]\ngrant = "view"\nclient.cn = "x"\n'
    loopback = read_settings(write(tmp_path, grant + '[diagnostics]\nhttp = "127.0.0.1:1"\n'))
    assert any("grant rules apply to [diagnostics] http on an address other than loopback"
               in w for w in loopback.warnings)
    network = read_settings(write(tmp_path, '[diagnostics]\nhttp = "0.0.0.0:8443"\n'))
    assert any("no rule grants it: every client gets 403" in w for w in network.warnings)
    both = read_settings(write(tmp_path, grant + '[diagnostics]\nhttp = "0.0.0.0:8443"\n'))
    assert not any("403" in w or "grant rules apply" in w for w in both.warnings)
