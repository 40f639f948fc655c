"""Going to the background: the process that was started learns the outcome."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

#: A program that daemonizes, then in the daemon does what argv[1] says, and in the
#: process that was started prints the daemon's pid or why it failed.
PROGRAM = """
import os, signal, sys, time
from usbipy.daemonize import DaemonFailed, daemonize
if sys.argv[2] == "sigchld-ignored":
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)
try:
    started = daemonize()
except DaemonFailed as exc:
    print(f"failed: {exc} (pid {exc.pid})")
    sys.exit(1)
if isinstance(started, int):
    print(f"pid {started}")
    sys.exit(0)
with open(sys.argv[3], "w") as out:
    out.write(f"{os.getpid()} {os.getcwd()}")
if sys.argv[1] == "ready":
    started.ready()
elif sys.argv[1] == "fail":
    started.failed("no devices to export")
os._exit(0)
"""


def run(tmp_path: Path, what: str, sigchld: str = "default") -> tuple[int, str, str]:
    said = tmp_path / "daemon.txt"
    result = subprocess.run([sys.executable, "-c", PROGRAM, what, sigchld, str(said)],
                            capture_output=True, text=True, timeout=60, cwd=tmp_path)
    deadline = time.monotonic() + 30
    while not said.exists() or not said.read_text():
        assert time.monotonic() < deadline, "the daemon wrote nothing"
        time.sleep(0.05)
    return result.returncode, result.stdout.strip(), said.read_text()


@pytest.mark.parametrize("sigchld", ["default", "sigchld-ignored"])
def test_the_caller_returns_with_the_pid_once_the_daemon_is_ready(
        tmp_path: Path, sigchld: str) -> None:
    # (with SIGCHLD ignored, as a supervisor may leave it, the first child is reaped
    # by the system: not an error)
    status, out, said = run(tmp_path, "ready", sigchld)
    pid, cwd = said.split(" ", 1)
    assert (status, out) == (0, f"pid {pid}")
    assert pid != str(os.getpid()) and cwd == "/"


def test_the_caller_hears_why_the_daemon_cannot_run(tmp_path: Path) -> None:
    status, out, said = run(tmp_path, "fail")
    assert (status, out) == (1, f"failed: no devices to export (pid {said.split()[0]})")


def test_a_daemon_that_ends_before_it_is_ready_is_a_failure(tmp_path: Path) -> None:
    status, out, _said = run(tmp_path, "nothing")
    assert status == 1 and out.startswith("failed: it ended before it was ready")
