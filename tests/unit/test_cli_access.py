"""usbipyd with a configuration file, as an administrator runs it: two people with
their own certificates and devices, and a policy changed under them with SIGHUP."""

from __future__ import annotations

import asyncio
import os
import signal
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from usbipy.cli import usbipy as cli
from usbipy.client import ImportRefused, import_device, list_devices
from usbipy.tls import TlsFiles, certs, client_context

from ..helpers import free_port

RULES = """
[[policy.rule]]
action = "allow"
client.cn = "bob"
device.busid = ["1-2", "1-3"]
"""

ALICE_RULE = """
[[policy.rule]]
action = "allow"
client.cn = "alice"
device.busid = "1-1"
"""


@dataclass
class Daemon:
    port: int
    config: Path
    log: Path
    process: subprocess.Popen[bytes]
    tls: Path

    def client(self, name: str) -> TlsFiles:
        return TlsFiles(self.tls / f"{name}.pem", self.tls / f"{name}-key.pem",
                        self.tls / "ca.pem")

    def write(self, rules: str) -> None:
        self.config.write_text(f"""
port = {self.port}
usbip_host = false
libusb = false
[devices]
demo = true
disk_size = 1048576
[tls]
cert = "{self.tls}/localhost.pem"
key = "{self.tls}/localhost-key.pem"
ca = "{self.tls}/ca.pem"
[policy]
default = "deny"
{rules}""")

    def wait_log(self, text: str, start: int = 0, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while text not in self.log.read_text()[start:]:
            assert self.process.poll() is None, self.log.read_text()
            assert time.monotonic() < deadline, self.log.read_text()
            time.sleep(0.02)



@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[Daemon]:
    base = tmp_path / "state"
    certs.init_ca(base)
    certs.issue("localhost", server=True, base=base, alt_names=("127.0.0.1",))
    for name in ("alice", "bob"):
        certs.issue(name, server=False, base=base)
    log = tmp_path / "usbipyd.log"
    config = tmp_path / "usbipyd.toml"
    with open(log, "wb") as out:
        d = Daemon(free_port(), config, log, None, base / "tls")  # type: ignore[arg-type]
        d.write(ALICE_RULE + RULES)
        d.process = subprocess.Popen(
            [sys.executable, "-m", "usbipy.cli.usbipyd", "-c", str(config), "--ktls", "off"],
            stderr=out, env={**os.environ, "PYTHONPATH": str(Path(cli.__file__).parents[2])})
    try:
        d.wait_log("exporting 1-3")
        yield d
    finally:
        d.process.send_signal(signal.SIGTERM)
        d.process.wait(timeout=30)


def test_each_client_sees_and_imports_its_own_devices_until_revoked(daemon: Daemon) -> None:
    alice = client_context(daemon.client("alice"))
    bob = client_context(daemon.client("bob"))
    port = daemon.port

    async def listed(context: ssl.SSLContext) -> list[str]:
        return [d.busid for d in await list_devices("127.0.0.1", port, tls=context)]

    async def scenario() -> None:
        assert await listed(alice) == ["1-1"]
        assert await listed(bob) == ["1-2", "1-3"]
        with pytest.raises(ImportRefused, match=r"import of 1-2 refused: no such device"):
            await import_device("127.0.0.1", "1-2", port, tls=alice)
        keyboard = await import_device("127.0.0.1", "1-1", port, tls=alice)
        disk = await import_device("127.0.0.1", "1-2", port, tls=bob)
        start = len(daemon.log.read_text())

        # alice's rule goes; the daemon is told
        daemon.write(RULES)
        sent = time.monotonic()
        daemon.process.send_signal(signal.SIGHUP)
        async with asyncio.timeout(1):
            await keyboard.wait_closed()
        print(f"\nrevoked session dropped {1000 * (time.monotonic() - sent):.0f} ms after "
              "SIGHUP")
        await asyncio.to_thread(daemon.wait_log, "reloaded", start)
        log = daemon.log.read_text()[start:]
        assert "CN=alice: dropped from 1-1: no longer allowed by the default (deny, " \
               "usbipyd.toml line" in log, log
        # bob is untouched: his session goes on, and he still lists his devices
        assert not disk.closed
        descriptor = await disk.control(0x80, 6, 0x0100, 0, 18)
        assert descriptor[:4] == b"\x12\x01\x00\x02"
        assert await listed(alice) == []
        assert await listed(bob) == ["1-3"]  # (1-2 is his already)

        # a file with an error changes nothing
        start = len(daemon.log.read_text())
        daemon.config.write_text(daemon.config.read_text() + "\n[[policy.rule]]\n")
        daemon.process.send_signal(signal.SIGHUP)
        await asyncio.to_thread(daemon.wait_log, "the running configuration stays in force",
                                start)
        log = daemon.log.read_text()[start:]
        assert f"reload: {daemon.config}:20: policy.rule[2]: action: missing" in log, log
        assert await listed(alice) == []
        assert await listed(bob) == ["1-3"]
        assert not disk.closed
        await disk.control(0x80, 6, 0x0100, 0, 18)
        await disk.close()

    asyncio.run(scenario())


def test_a_reload_says_what_waits_for_a_restart(daemon: Daemon) -> None:
    start = len(daemon.log.read_text())
    daemon.config.write_text(daemon.config.read_text().replace("disk_size = 1048576",
                                                                "disk_size = 2097152"))
    daemon.process.send_signal(signal.SIGHUP)
    daemon.wait_log("reloaded", start)
    assert ("reload: devices.disk_size changed: takes effect when usbipyd restarts"
            in daemon.log.read_text()[start:])


def test_a_file_gone_at_reload_keeps_the_running_policy(daemon: Daemon) -> None:
    start = len(daemon.log.read_text())
    daemon.config.rename(daemon.config.with_suffix(".old"))
    daemon.process.send_signal(signal.SIGHUP)
    daemon.wait_log("the running configuration stays in force", start)
    assert (f"reload: {daemon.config}: No such file or directory"
            in daemon.log.read_text()[start:])
    alice = client_context(daemon.client("alice"))
    bob = client_context(daemon.client("bob"))

    async def listed() -> tuple[list[str], list[str]]:
        a = await list_devices("127.0.0.1", daemon.port, tls=alice)
        b = await list_devices("127.0.0.1", daemon.port, tls=bob)
        return [d.busid for d in a], [d.busid for d in b]

    assert asyncio.run(listed()) == (["1-1"], ["1-2", "1-3"])  # (not "every device")
