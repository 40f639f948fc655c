"""Many hosts, one view, on a real (private) network: three usbipyd in three network
namespaces advertise themselves by DNS-SD, and a client in a fourth lists every
server's devices with `usbipy list --all`, attaches one by its ids wherever it is
(usbip://*/VID:PID), and names a server that stopped as not answering, within the
bound. Avahi, the network's own mDNS daemon, sees the servers too.

Multicast stays inside the namespaces this test makes (tests/interop/netlab.py)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.interop.netlab import Avahi, Host, NetLab

SERVERS = 3
SERVICE = "_usbip._tcp"
#: The bound a listing keeps when a server does not answer: the browse (2 s), one
#: server's time to answer (5 s), and room for a slow machine's Python start.
LISTING_BOUND = 20.0
#: The tests browse longer than the default 2 s: they test what is found, not how
#: fast a slow machine's responders answer.
BROWSE = ("--browse-time", "5")


def unavailable(reason: str | None) -> None:
    if reason is not None:
        if os.environ.get("USBIPY_REQUIRE_ALL"):
            pytest.fail(reason)
        pytest.skip(reason)


def wait_for_text(path: Path, text: str, proc: subprocess.Popen[Any],
                  timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while text not in path.read_text():
        assert proc.poll() is None, path.read_text()
        assert time.monotonic() < deadline, path.read_text()
        time.sleep(0.05)


class Lab:
    def __init__(self, net: NetLab, tmp: Path) -> None:
        self.net = net
        self.tmp = tmp
        self.servers: list[subprocess.Popen[Any]] = []
        self.client: Host = net.hosts[SERVERS]
        self.cache = tmp / "client-cache"
        self.pki = tmp / "pki" / "tls"

    def alice(self) -> list[str]:
        return ["--tls-cert", str(self.pki / "alice.pem"), "--tls-key",
                str(self.pki / "alice-key.pem"), "--tls-ca", str(self.pki / "ca.pem")]

    def usbipy(self, *args: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
        return self.client.run([sys.executable, "-m", "usbipy.cli.usbipy", *args, *(
            BROWSE if args and args[0] in ("list", "status") and "-r" not in args else ())],
                               capture_output=True, text=True, timeout=timeout,
                               env={**os.environ, "XDG_CACHE_HOME": str(self.cache)})

    def python(self, code: str) -> subprocess.CompletedProcess[str]:
        return self.client.run([sys.executable, "-c", code], capture_output=True, text=True,
                               timeout=60, env={**os.environ, "XDG_CACHE_HOME": str(self.cache)})


LAB0_CONFIG = """
[tls]
cert = "{pki}/lab0.pem"
key = "{pki}/lab0-key.pem"
ca = "{pki}/ca.pem"
[diagnostics]
http = "0.0.0.0:8443"
[policy]
default = "allow"
[[policy.rule]]
grant = "admin"
client.cn = "alice"
"""


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    """One lab for the module (each server takes a second or two to advertise): the
    test that stops a server comes last. lab0 requires mutual TLS and serves its status
    page on the network; lab1 and lab2 are plaintext, their pages on loopback."""
    unavailable(NetLab.available())
    tmp_path = tmp_path_factory.mktemp("fleet")
    from usbipy.tls import certs

    with NetLab(SERVERS + 1) as net:
        lab = Lab(net, tmp_path)
        certs.init_ca(lab.pki.parent)
        certs.issue("lab0", server=True, base=lab.pki.parent,
                    alt_names=(net.hosts[0].address,))
        certs.issue("alice", server=False, base=lab.pki.parent)
        for index, host in enumerate(net.hosts[:SERVERS]):
            log = tmp_path / f"lab{index}.log"
            config = tmp_path / f"lab{index}.toml"
            config.write_text(LAB0_CONFIG.format(pki=lab.pki) if index == 0 else "")
            # (lab1 alone has a headset, 1209:0004: a device only one server offers)
            extra = [] if index == 0 else ["--http", "8080", *(["--audio"] if index == 1
                                                               else [])]
            with open(log, "w") as out:
                proc = host.popen(
                    [sys.executable, "-m", "usbipy.cli.usbipyd", "-c", str(config), "--demo",
                     "--disk-size", str(1 << 20), "-a", "0.0.0.0", "--name", f"lab{index}",
                     "--state-dir", str(tmp_path / f"state{index}"), "--ktls", "off", "-d",
                     *extra], stdout=out, stderr=subprocess.STDOUT)
            lab.servers.append(proc)
            wait_for_text(log, "advertised by DNS-SD as", proc)
        yield lab


def test_avahi_sees_the_servers(lab: Lab) -> None:
    unavailable(Avahi.available())
    with lab.client.avahi() as avahi:
        # avahi-browse -rt, as a user runs it (asked again until it has all three: a
        # daemon just started may answer before it heard every server)
        deadline = time.monotonic() + 60
        while True:
            services = avahi.browse(SERVICE, timeout=20)
            if {s["name"] for s in services} >= {"lab0", "lab1", "lab2"}:
                break
            assert time.monotonic() < deadline, services
            time.sleep(0.5)
    by_name = {s["name"]: s for s in services}
    for index in range(SERVERS):
        service = by_name[f"lab{index}"]
        assert service["address"] == lab.net.hosts[index].address
        assert service["port"] == 3240
        tls = "tls=required" if index == 0 else "tls=none"
        assert {"protocol=1.1.1", tls, f"name=lab{index}", "txtvers=1"} <= set(
            service["txt"])
        # no device list in the advertisement: that stays behind the access policy
        assert not any("1209" in entry for entry in service["txt"])


def test_status_all_reads_the_pages_on_the_network_and_each_page_knows_its_peers(
        lab: Lab) -> None:
    status = lab.usbipy("status", "--all", "--json", *lab.alice())
    assert status.returncode == 0, status.stderr
    [server] = json.loads(status.stdout)["servers"]
    assert server["url"] == f"https://{lab.net.hosts[0].address}:8443/api/v1/status"
    seen = server["status"]
    assert seen["server"]["name"] == "lab0" and seen["server"]["tls"] is True
    assert seen["you"] == {"client": "CN=alice from 10.77.0.13", "grant": "admin"}
    assert [d["busid"] for d in seen["devices"]] == ["1-1", "1-2", "1-3"]
    text = lab.usbipy("status", "--all", *lab.alice())
    assert text.returncode == 0 and "lab0 (usbipy " in text.stdout
    # without a certificate the page is not even reached
    refused = lab.usbipy("status", "-r", f"{lab.net.hosts[0].address}:8443")
    assert refused.returncode == 1 and "needs TLS" in refused.stderr
    # lab1's page (on its loopback) lists the other servers, lab0's with its link
    peers = lab.net.hosts[1].run(
        [sys.executable, "-c", "import json, urllib.request; print(json.dumps(json.load("
         "urllib.request.urlopen('http://127.0.0.1:8080/api/v1/status', timeout=10))"
         "['servers']))"], capture_output=True, text=True, timeout=60)
    assert peers.returncode == 0, peers.stderr
    listed = {p["name"]: p for p in json.loads(peers.stdout)}
    assert set(listed) == {"lab0", "lab2"}
    assert listed["lab0"]["page"] == f"https://{lab.net.hosts[0].address}:8443/"
    assert listed["lab2"]["page"] is None


def test_a_server_that_says_no_is_not_advertised(lab: Lab, tmp_path: Path) -> None:
    host = lab.net.hosts[0]
    log = tmp_path / "quiet.log"
    with open(log, "w") as out:
        quiet = host.popen([sys.executable, "-m", "usbipy.cli.usbipyd", "-c", os.devnull,
                            "--demo", "--disk-size", str(1 << 20), "-a", "0.0.0.0", "-t",
                            "3250", "--name", "quiet", "--no-advertise",
                            "--state-dir", str(tmp_path / "quiet")],
                           stdout=out, stderr=subprocess.STDOUT)
    wait_for_text(log, "listening on 0.0.0.0:3250", quiet)
    listed = lab.usbipy("list", "--all", "--json", *lab.alice())
    names = {s["name"] for s in json.loads(listed.stdout)["servers"]}
    assert names == {"lab0", "lab1", "lab2"}
    quiet.terminate()
    quiet.wait(timeout=30)


def test_list_all_finds_every_server_and_names_one_that_stopped(lab: Lab) -> None:
    listed = lab.usbipy("list", "--all", "--json", *lab.alice())
    assert listed.returncode == 0, listed.stderr
    servers = json.loads(listed.stdout)["servers"]
    by_name = {s["name"]: s for s in servers}
    assert set(by_name) == {"lab0", "lab1", "lab2"}, servers
    for index in range(SERVERS):
        server = by_name[f"lab{index}"]
        assert server["host"] == lab.net.hosts[index].address
        assert (server["port"], server["tls"], server["protocol"], server["found_by"],
                server["error"]) == (3240, index == 0, "1.1.1", "dns-sd", None)
        assert [d["busid"] for d in server["devices"]] == ["1-1", "1-2", "1-3", *(
            ["1-4"] if index == 1 else [])]
    assert by_name["lab0"]["page"] == f"https://{lab.net.hosts[0].address}:8443/"
    assert by_name["lab1"]["page"] is None  # (its page is on its loopback only)

    # without credentials, the server that requires TLS is named (not a failure: it
    # was not asked), the others listed
    plain = lab.usbipy("list", "--all")
    assert plain.returncode == 0, plain.stderr
    assert "usbipy: info: lab0 (10.77.0.10:3240): requires TLS" in plain.stderr
    for index in (1, 2):
        assert f" - {lab.net.hosts[index].address}:3240 (lab{index})" in plain.stdout
    assert plain.stdout.count("(1209:0002)") == 2

    # a device by its ids, wherever it is: on the one server that offers it...
    found = lab.python("from usbipy.pyusb import get_backend\n"
                      "backend = get_backend('usbip://*/1209:0004')\n"
                      "print(backend.host, [d.busid for d in backend.enumerate_devices()])")
    assert found.returncode == 0, found.stderr
    assert found.stdout.split() == [lab.net.hosts[1].address, "['1-4']"]
    # (the same from asyncio)
    found = lab.python("import asyncio, usbipy\n"
                      "async def main():\n"
                      "    async with usbipy.connect('usbip://*/1209:0004') as device:\n"
                      "        print(device.info.busid)\n"
                      "asyncio.run(main())")
    assert found.returncode == 0 and found.stdout.split() == ["1-4"], found.stderr
    # ...and one that two offer is not taken from either: anyone may answer DNS-SD
    several = lab.python("from usbipy.pyusb import get_backend\n"
                         "get_backend('usbip://*/1209:0003')")
    assert "2 servers offer 1209:0003: lab1 (10.77.0.11:3240) 1-3, lab2 (10.77.0.12:3240)" \
        in several.stderr

    # lab2 stops (SIGSTOP: it answers neither DNS-SD nor USB/IP): named, within the bound
    stopped = lab.servers[2]
    stopped.send_signal(signal.SIGSTOP)
    try:
        began = time.monotonic()
        again = lab.usbipy("list", "--all", "--json", *lab.alice())
        took = time.monotonic() - began
        assert took < LISTING_BOUND, took
        # (named, with when it was last found; the exit status is for servers found now)
        assert again.returncode == 0, again.stderr
        result = json.loads(again.stdout)
        assert result["not_answering"] == 0
        by_name = {s["name"]: s for s in result["servers"]}
        assert by_name["lab2"]["found_by"] == "remembered"
        assert by_name["lab2"]["error"].startswith("not answering: no device list in 5 s")
        assert by_name["lab2"]["devices"] is None
        assert all(by_name[n]["error"] is None and len(by_name[n]["devices"]) >= 3
                   for n in ("lab0", "lab1"))
        text = lab.usbipy("list", "--all", *lab.alice())
        assert text.returncode == 0
        assert (f"usbipy: warning: lab2 ({lab.net.hosts[2].address}:3240): not answering"
                in text.stderr) and "last found" in text.stderr
        assert "(lab0, TLS)" in text.stdout and "(lab1)" in text.stdout
    finally:
        stopped.send_signal(signal.SIGCONT)
