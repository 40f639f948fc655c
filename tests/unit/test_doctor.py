"""usbipy doctor: each check's failure on a fake /sys, /proc and module tree, with the
message a user sees; the client's checks against live (and refusing) servers."""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from usbipy.cli.usbipy import main
from usbipy.doctor import Status, check_client, check_server, system
from usbipy.doctor.report import Report
from usbipy.linux import modules as linux_modules
from usbipy.server import ServerThread
from usbipy.tls import TlsFiles, certs

from .fake_sysfs import FakeSysfs

HOST = "127.0.0.1"
TCP_HEADER = ("  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt"
              "   uid  timeout inode\n")


class FakeProc:
    """/proc/net/tcp and a process or two."""

    def __init__(self, root: Path) -> None:
        self.root = root
        (root / "net").mkdir(parents=True)
        self.lines: list[str] = []
        self.write()

    def socket(self, local: str, local_port: int, remote: str, remote_port: int,
               state: int, inode: int = 1000) -> None:
        def hex_address(text: str) -> str:
            return bytes(reversed([int(p) for p in text.split(".")])).hex().upper()

        self.lines.append(
            f"   {len(self.lines)}: {hex_address(local)}:{local_port:04X} "
            f"{hex_address(remote)}:{remote_port:04X} {state:02X} 00000000:00000000 "
            f"00:00000000 00000000     0        0 {inode} 1 0000000000000000 100 0 0 10 0\n")
        self.write()

    def process(self, pid: int, comm: str, cmdline: str, sockets: tuple[int, ...] = ()
                ) -> None:
        """A process, holding the sockets of these inodes."""
        base = self.root / str(pid)
        (base / "fd").mkdir(parents=True)
        for fd, inode in enumerate(sockets, start=3):
            (base / "fd" / str(fd)).symlink_to(f"socket:[{inode}]")
        (base / "comm").write_text(comm + "\n")
        (base / "cmdline").write_bytes(cmdline.replace(" ", "\0").encode() + b"\0")

    def write(self) -> None:
        (self.root / "net/tcp").write_text(TCP_HEADER + "".join(self.lines))


@pytest.fixture
def machine(fake: FakeSysfs, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
            ) -> Iterator[tuple[FakeSysfs, FakeProc, Path]]:
    """A fake machine: /sys (with /sys/module), /proc, /lib/modules, no firewall."""
    proc = FakeProc(tmp_path / "proc")
    modules = tmp_path / "lib/modules"
    (modules / os.uname().release).mkdir(parents=True)
    (fake.root / "module").mkdir()
    monkeypatch.setattr(system, "PROC_ROOT", proc.root)
    monkeypatch.setattr(linux_modules, "MODULES_ROOT", modules)
    monkeypatch.setattr(system, "firewall_rules", lambda: {"nft": "table inet filter {\n}\n"})
    yield fake, proc, modules / os.uname().release


def find(report: Report, name: str) -> tuple[Status, str, str]:
    [check] = [c for c in report.checks if c.name == name]
    return check.status, check.detail, check.fix


def test_modules_missing_loadable_and_loaded(machine) -> None:
    fake, _proc, modules = machine
    report = check_server()
    status, detail, fix = find(report, "module usbip-host")
    assert status is Status.WARN and "not installed for this kernel" in detail
    assert "linux-modules-extra" in fix
    (modules / "modules.dep").write_text(
        "kernel/drivers/usb/usbip/usbip-host.ko: kernel/drivers/usb/usbip/usbip-core.ko\n"
        "kernel/drivers/usb/usbip/vhci-hcd.ko: kernel/drivers/usb/usbip/usbip-core.ko\n")
    report = check_server()
    assert find(report, "module usbip-host") == (
        Status.WARN, "not loaded (exports devices through the kernel (usbip bind))",
        "modprobe usbip-host")
    (fake.root / "module/usbip_host").mkdir()
    assert find(check_server(), "module usbip-host")[:2] == (Status.OK, "loaded")
    # TLS configured, no tls module anywhere: a warning (userspace TLS serves), which
    # says what kernel TLS would add
    files = TlsFiles(Path("/nonexistent/c.pem"), Path("/nonexistent/k.pem"),
                     Path("/nonexistent/ca.pem"))
    status, detail, _ = find(check_server(tls=files), "module tls")
    assert status is Status.WARN and detail == (
        "not installed for this kernel (kernel TLS: without it TLS is served in userspace, "
        "but devices bound to usbip-host cannot be exported over TLS)")
    # the resume window, as configured
    assert find(check_server(), "resumption")[1].startswith(
        "a usbipy client's lost connection is kept 60 s for it to resume")
    assert find(check_server(resume_window=0), "resumption")[1].startswith("off")
    # no USB device at all is no fault: emulated devices need none
    assert find(check_server(), "USB devices")[:2] == (
        Status.INFO, "none seen: only emulated devices can be exported from here")


def test_nothing_listening_fails_and_exits_1(machine, capsys) -> None:
    assert main(["doctor", "-c", os.devnull]) == 1
    out = capsys.readouterr().out
    assert "✘ server: nothing listens on port 3240\n" in out
    assert "    start it: usbipyd -a 0.0.0.0 (or usbipd -D)" in out
    assert out.endswith("some checks failed\n")
    assert main(["doctor", "-c", os.devnull, "--json"]) == 1
    result = json.loads(capsys.readouterr().out)
    assert result["passed"] is False
    assert {"check": "server", "status": "fail", "detail": "nothing listens on port 3240",
            "fix": "start it: usbipyd -a 0.0.0.0 (or usbipd -D); usbipyd -t PORT for another "
                   "port"} in result["checks"]


def test_a_server_on_loopback_only_with_bindings_is_warned_about(machine) -> None:
    fake, proc, _ = machine
    fake.load_usbip_host()
    fake.add_device("1-1", 0x46F4, 0x0001, driver="usbip-host")
    proc.process(321, "usbipd", "usbipd -D", sockets=(1000,))
    proc.socket("127.0.0.1", 3240, "0.0.0.0", 0, system.TCP_LISTEN, inode=1000)
    status, detail, fix = find(check_server(), "server")
    assert status is Status.WARN
    assert detail == ("usbipd (pid 321) listens on 127.0.0.1 port 3240 only: no other host can "
                      "import the devices bound here")
    assert "usbipyd -a 0.0.0.0" in fix
    proc.socket("0.0.0.0", 3240, "0.0.0.0", 0, system.TCP_LISTEN)
    assert find(check_server(), "server")[0] is Status.OK
    # and where to capture what the kernel serves
    assert "dumpcap -i usbmon1" in find(check_server(), "capture")[1]


def test_the_listener_is_the_process_that_holds_the_socket(machine) -> None:
    _fake, proc, _ = machine
    proc.process(2047, "usbipyd", "/usr/bin/python3 /usr/bin/usbipyd -t 3241", sockets=(7,))
    proc.process(2186, "python3", "python3 -m usbipy.cli.usbipyd -a 0.0.0.0",
                 sockets=(1000, 1001))
    proc.process(2200, "usbipyd", "usbipyd --check-config")
    proc.socket("0.0.0.0", 3240, "0.0.0.0", 0, system.TCP_LISTEN, inode=1000)
    proc.socket("127.0.0.1", 3241, "0.0.0.0", 0, system.TCP_LISTEN, inode=7)
    assert find(check_server(), "server")[:2] == (
        Status.OK, "usbipyd (pid 2186) listens on 0.0.0.0 port 3240")


def test_a_binding_stuck_in_use_with_no_connection(machine) -> None:
    fake, proc, _ = machine
    fake.load_usbip_host()
    path = fake.add_device("3-1", 0x46F4, 0x0001, driver="usbip-host")
    (path / "usbip_status").write_text("2\n")
    proc.socket("0.0.0.0", 3240, "0.0.0.0", 0, system.TCP_LISTEN)
    status, detail, fix = find(check_server(), "binding 3-1")
    assert status is Status.FAIL
    assert detail == "3-1 (46f4:0001): stuck in use: no connection the kernel holds is open"
    assert fix.startswith("its client went without a word; free it: usbip unbind -b 3-1 && "
                          "usbip bind -b 3-1")
    # a connection some process has open is not the kernel's (usbipd gave its away)
    proc.process(400, "sshd", "sshd")
    proc.socket("10.0.0.1", 22, "10.0.0.9", 40000, system.TCP_ESTABLISHED, inode=4242)
    os.symlink("socket:[4242]", proc.root / "400/fd/3")
    assert find(check_server(), "binding 3-1")[0] is Status.FAIL
    proc.socket("10.0.0.1", 3240, "10.0.0.9", 50000, system.TCP_ESTABLISHED, inode=5000)
    assert find(check_server(), "binding 3-1")[:2] == (
        Status.OK, "3-1 (46f4:0001): in use (10.0.0.9:50000)")


NFT_INPUT = ("table inet filter {\n\tchain input {\n\t\ttype filter hook input priority "
             "filter; policy %s;\n%s\t}\n}\n")


def nft(rules: str, policy: str = "accept") -> dict[str, str]:
    return {"nft": NFT_INPUT % (policy, "".join(f"\t\t{r}\n" for r in rules.split("|")))}


@pytest.mark.parametrize(("rules", "hit"), [
    (nft("tcp dport 3240 drop"), "nft: tcp dport 3240 drop"),
    (nft("tcp dport { 22, 3240 } counter packets 0 bytes 0 reject"),
     "nft: tcp dport { 22, 3240 } counter packets 0 bytes 0 reject"),
    (nft("tcp dport 3000-4000 drop"), "nft: tcp dport 3000-4000 drop"),
    ({"iptables": "*filter\n:INPUT ACCEPT [0:0]\n-A INPUT -p tcp -m tcp --dport 3240 -j DROP\n"},
     "iptables: -A INPUT -p tcp -m tcp --dport 3240 -j DROP"),
    ({"ip6tables": "-A INPUT -p tcp -m multiport --dports 22,3240 -j REJECT\n"},
     "ip6tables: -A INPUT -p tcp -m multiport --dports 22,3240 -j REJECT"),
    ({"iptables": "-A INPUT -p tcp -m tcp --dport 3000:4000 -j DROP\n"},
     "iptables: -A INPUT -p tcp -m tcp --dport 3000:4000 -j DROP"),
])
def test_a_firewall_rule_that_drops_the_port(machine, monkeypatch, rules: dict[str, str],
                                             hit: str) -> None:
    monkeypatch.setattr(system, "firewall_rules", lambda: rules)
    status, detail, fix = find(check_server(), "firewall")
    assert status is Status.FAIL and detail == f"rules drop TCP port 3240: {hit}"
    assert "tcp dport 3240 accept" in fix


@pytest.mark.parametrize(("rules", "expected"), [
    # other ports, UDP, negations: not ours
    (nft("tcp dport 32400 drop|udp dport 3240 drop|tcp dport != 3240 drop"), Status.OK),
    ({"iptables": "-A INPUT -p tcp ! --dport 3240 -j DROP\n-A INPUT -p udp --dport 3240 "
                  "-j DROP\n"}, Status.OK),
    # accepted before a drop: fine
    (nft("tcp dport 3240 accept|tcp dport 3240 drop"), Status.OK),
    # a default that drops, or a catch-all reject, and no accept: a warning
    (nft("ct state established accept", policy="drop"), Status.WARN),
    (nft("reject with icmpx admin-prohibited"), Status.WARN),
    ({"iptables": ":INPUT DROP [0:0]\n-A INPUT -i lo -j ACCEPT\n"}, Status.WARN),
    # ... with an accept: fine
    (nft("tcp dport 3240 accept", policy="drop"), Status.OK),
    # a chain that is not input
    ({"nft": "table inet f {\n\tchain out {\n\t\ttype filter hook output priority 0; "
             "policy accept;\n\t\ttcp dport 3240 drop\n\t}\n}\n"}, Status.OK),
])
def test_firewall_rules_read_as_the_kernel_applies_them(machine, monkeypatch,
                                                       rules: dict[str, str],
                                                       expected: Status) -> None:
    monkeypatch.setattr(system, "firewall_rules", lambda: rules)
    status, detail, _ = find(check_server(), "firewall")
    assert status is expected, detail


def test_tls_files_expired_near_their_end_and_fine(machine, tmp_path: Path) -> None:
    certs.init_ca(tmp_path)
    past = datetime.datetime.now(datetime.UTC) - datetime.timedelta(days=10)
    old = certs.issue("old", server=True, base=tmp_path, not_before=past, days=1)
    soon = certs.issue("soon", server=True, base=tmp_path, days=10)
    fine = certs.issue("fine", server=True, base=tmp_path, days=365)
    report = check_server(tls=TlsFiles(old.cert, old.key, old.ca))
    status, detail, fix = find(report, "TLS certificate")
    ended = (past + datetime.timedelta(days=1)).strftime("%Y-%m-%d")
    assert status is Status.FAIL and detail == f"{old.cert} expired on {ended}"
    assert "usbipy cert issue" in fix
    status, detail, _ = find(check_server(tls=TlsFiles(soon.cert, soon.key, soon.ca)),
                             "TLS certificate")
    assert status is Status.WARN and ("in 9 days" in detail or "in 10 days" in detail)
    assert find(check_server(tls=TlsFiles(fine.cert, fine.key, fine.ca)),
                "TLS certificate")[0] is Status.OK
    mismatched = check_server(tls=TlsFiles(fine.cert, old.key, fine.ca))
    assert find(mismatched, "TLS files")[1].startswith(f"the key {old.key} does not match")


# --- the client ---------------------------------------------------------------------------


def test_client_nothing_listening(fake: FakeSysfs) -> None:
    with socket.socket() as s:
        s.bind((HOST, 0))
        port = s.getsockname()[1]
    report = check_client(HOST, port)
    assert find(report, "name") == (Status.OK, "127.0.0.1 is 127.0.0.1", "")
    status, detail, fix = find(report, "TCP")
    assert status is Status.FAIL
    assert detail == (f"127.0.0.1 port {port}: connection refused: nothing listens there "
                      "(or a firewall rejects it)")
    assert "listens on 127.0.0.1 only by default" in fix
    status, detail, _ = find(report, "vhci-hcd")
    assert status is Status.WARN and detail.startswith("not loaded")


def test_client_a_firewall_that_drops_and_one_that_resets(fake: FakeSysfs,
                                                         monkeypatch) -> None:
    def silent(self: socket.socket, address: object) -> None:
        raise TimeoutError("timed out")

    monkeypatch.setattr(socket.socket, "connect", silent)
    status, detail, fix = find(check_client(HOST, 3240), "TCP")
    assert (status, detail) == (Status.FAIL, "127.0.0.1 port 3240: no answer in 5 s: a "
                                             "firewall drops the packets, or the host is down")
    assert "usbipy doctor" in fix

    def reset(self: socket.socket, address: object) -> None:
        raise ConnectionResetError(104, "Connection reset by peer")

    monkeypatch.setattr(socket.socket, "connect", reset)
    assert find(check_client(HOST, 3240), "TCP")[1] == (
        "127.0.0.1 port 3240: reset: the server refused us")


def test_client_a_name_that_does_not_resolve(fake: FakeSysfs) -> None:
    report = check_client("no-such-host.invalid", 3240)
    status, detail, _ = find(report, "name")
    assert status is Status.FAIL and detail.startswith("no-such-host.invalid does not resolve")
    assert not report.passed


def test_client_against_a_server(fake: FakeSysfs, capsys) -> None:
    from usbipy.devices.demo import demo_devices

    fake.load_vhci()
    with ServerThread(demo_devices(disk_size=1 << 20), port=0) as srv:
        report = check_client(HOST, srv.port, "1-2")
        assert find(report, "device list")[:2] == (Status.OK, "3 offered: 1-1, 1-2, 1-3")
        assert find(report, "vhci-hcd")[:2] == (
            Status.OK, "loaded: 2 USB 2 and 2 SuperSpeed ports free")
        assert find(report, "import")[:2] == (
            Status.OK, "1-2 imported and released at once (1209:0002)")
        assert report.passed
        assert find(report, "resumption")[:2] == (
            Status.OK, "the server resumes a lost connection within 60 s ('usbipy attach "
            "--persistent' does, in place)")
        # the doctor's import said FIN: the device is free again at once, not in 60 s
        assert srv.server is not None
        deadline = time.monotonic() + 10
        while len(srv.server.access.resumables) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert len(srv.server.access.resumables) == 0
        srv.server.access.limits = dataclasses.replace(srv.server.access.limits,
                                                       resume_window=0)
        status, detail, _ = find(check_client(HOST, srv.port, "1-2"), "resumption")
        assert status is Status.INFO and detail.startswith(
            "the server does not resume lost connections")
        assert main(["doctor", "-r", HOST, "-t", str(srv.port), "-b", "9-9"]) == 1
        out = capsys.readouterr().out
        assert "✘ device: 127.0.0.1 does not offer 9-9" in out
        fake.set_vhci_status({0: (3, 0x10002, "3-1"), 1: (3, 0x10003, "3-2")})
        status, detail, _ = find(check_client(HOST, srv.port, "1-2"), "vhci-hcd")
        assert (status, detail) == (Status.FAIL, "no free USB 2 port for 1-2")


def test_client_tls_refusals(fake: FakeSysfs, tmp_path: Path) -> None:
    from usbipy.devices.demo import demo_devices
    from usbipy.server.tls import ServerTls
    from usbipy.tls import server_context

    certs.init_ca(tmp_path / "ours")
    server = certs.issue("server", server=True, base=tmp_path / "ours", alt_names=(HOST,))
    client = certs.issue("alice", server=False, base=tmp_path / "ours")
    certs.init_ca(tmp_path / "theirs", name="another CA")
    stranger = certs.issue("eve", server=False, base=tmp_path / "theirs")
    tls = ServerTls(server_context(TlsFiles(server.cert, server.key, server.ca), kernel=False),
                    kernel=False, handshake_timeout=10)
    with ServerThread(demo_devices(disk_size=1 << 20), port=0, tls=tls) as srv:
        plain = check_client(HOST, srv.port)
        status, _detail, fix = find(plain, "device list")
        assert status is Status.FAIL and "--tls-cert" in fix
        good = check_client(HOST, srv.port, tls=TlsFiles(client.cert, client.key, client.ca))
        assert find(good, "TLS")[1].startswith("TLSv1.") and good.passed
        wrong_ca = check_client(HOST, srv.port,
                                tls=TlsFiles(stranger.cert, stranger.key, stranger.ca))
        status, detail, _ = find(wrong_ca, "TLS")
        assert status is Status.FAIL and "certificate is not accepted" in detail


def test_client_checks_the_tls_server_name_it_is_given(fake: FakeSysfs, tmp_path: Path,
                                                       capsys) -> None:
    """A server reached by an address its certificate does not name: --tls-server-name,
    before or after `doctor`, names what to check; without it, the failure says so."""
    from usbipy.devices.demo import demo_devices
    from usbipy.server.tls import ServerTls
    from usbipy.tls import server_context

    certs.init_ca(tmp_path)
    server = certs.issue("lab.example", server=True, base=tmp_path)  # no address in it
    client = certs.issue("alice", server=False, base=tmp_path)
    tls = ServerTls(server_context(TlsFiles(server.cert, server.key, server.ca), kernel=False),
                    kernel=False, handshake_timeout=10)
    options = ["--tls-cert", str(client.cert), "--tls-key", str(client.key), "--tls-ca",
               str(client.ca)]
    fake.load_vhci()
    with ServerThread(demo_devices(disk_size=1 << 20), port=0, tls=tls) as srv:
        port = ["-t", str(srv.port)]
        assert main([*port, *options, "--tls-server-name", "lab.example", "doctor", "-r", HOST,
                     "-b", "1-2"]) == 0
        out = capsys.readouterr().out
        assert "✔ TLS: TLSv1.3 with CN=lab.example" in out and "✔ import: 1-2" in out
        assert main([*port, "doctor", "-r", HOST, *options, "--tls-server-name",
                     "lab.example"]) == 0
        capsys.readouterr()
        assert main([*port, "doctor", "-r", HOST, *options]) == 1
        out = capsys.readouterr().out
        assert ("✘ TLS: the peer's certificate is not accepted: IP address mismatch, "
                "certificate is not valid for '127.0.0.1'. (connect by a name the certificate "
                "carries, or give one with --tls-server-name NAME; or issue the server a "
                "certificate that names this host: usbipy cert issue NAME --server --san "
                "HOST)") in out
