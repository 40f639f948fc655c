from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest


def require(tool: str) -> str:
    path = shutil.which(tool)
    if path is None:
        message = f"{tool} is not installed (apt-get install it; the README's test command does)"
        if os.environ.get("USBIPY_REQUIRE_ALL"):
            pytest.fail(message)
        pytest.skip(message)
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Usbipyd:
    def __init__(self, proc: subprocess.Popen[str], port: int) -> None:
        self.proc = proc
        self.port = port


@pytest.fixture
def usbipyd(tmp_path: Path) -> Iterator[Usbipyd]:
    port = free_port()
    log = open(tmp_path / "usbipyd.log", "w")
    proc = subprocess.Popen(
        # (-c /dev/null: never this machine's /etc/usbipy/usbipyd.toml)
        [sys.executable, "-m", "usbipy.cli.usbipyd", "-c", os.devnull, "--demo",
         "--tcp-port", str(port),
         "--disk-size", str(8 << 20)],
        stdout=log, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 20
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                pytest.fail(f"usbipyd did not start: {(tmp_path / 'usbipyd.log').read_text()}")
            time.sleep(0.05)
    yield Usbipyd(proc, port)
    proc.terminate()
    proc.wait(timeout=20)
    log.close()
