"""Every example in the README runs as written.

Each Python block is marked (an HTML comment, invisible on the page) with what it
runs against: ``demo`` (scripts/demo.sh's server on 127.0.0.1:3240), ``demo-tls``
(the same with the TLS set-up the README gives, run from the folder of alice's
files), or ``server NAME`` (the example is itself a server on port 3240; a
client here drives it as the text says and checks what it serves). Each runs in
a network namespace of its own, so port 3240 is its alone whatever else this
machine runs.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

README = Path(__file__).parents[2] / "README.md"
EXAMPLE = re.compile(r"<!-- example: ([a-z -]+) -->\n```python\n(.*?)```", re.S)
PORT = 3240


def examples() -> list[tuple[str, str]]:
    return [(kind, code) for kind, code in EXAMPLE.findall(README.read_text())]


def test_every_python_block_of_the_readme_is_an_example() -> None:
    blocks = README.read_text().count("```python\n")
    assert blocks == len(examples()) >= 7, "a ```python block without <!-- example: ... -->"


# --- running one inside a network namespace ----------------------------------------------


def _namespace() -> list[str]:
    """The command prefix that runs a program in a new network namespace."""
    if shutil.which("unshare") is None or shutil.which("ip") is None:
        pytest.fail("the README examples need unshare and ip (util-linux, iproute2)")
    prefix = ["unshare", "-n"] if os.geteuid() == 0 else ["unshare", "-rn"]
    probe = subprocess.run([*prefix, "true"], capture_output=True, text=True, check=False)
    if probe.returncode != 0:
        pytest.fail(f"cannot make a network namespace here: {probe.stderr.strip()}")
    return prefix


def run_in_namespace(kind: str, code: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """Run the example (in ``cwd``) in a namespace of its own, with what it needs."""
    script = cwd / "example.py"
    script.write_text(code)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[2] / "src")}
    return subprocess.run(
        [*_namespace(), sys.executable, "-m", "tests.unit.test_readme", kind, str(script)],
        cwd=Path(__file__).parents[2], env={**env, "EXAMPLE_CWD": str(cwd)},
        capture_output=True, text=True, timeout=240, check=False)


@pytest.mark.parametrize(("kind", "code"), examples(),
                         ids=[f"{i}-{k.replace(' ', '-')}" for i, (k, _) in
                              enumerate(examples())])
def test_the_example_runs(kind: str, code: str, tmp_path: Path) -> None:
    done = run_in_namespace(kind, code, tmp_path)
    assert done.returncode == 0, f"{done.stdout}\n{done.stderr}"
    assert "example: passed" in done.stdout, done.stdout + done.stderr


# --- inside the namespace (python -m tests.unit.test_readme KIND SCRIPT) -------------------


def _wait_for_port(proc: subprocess.Popen[str], deadline: float = 60) -> None:
    end = time.monotonic() + deadline
    while True:
        try:
            socket.create_connection(("127.0.0.1", PORT), timeout=1).close()
            return
        except OSError:
            if proc.poll() is not None or time.monotonic() > end:
                out, err = proc.communicate(timeout=5)
                raise SystemExit(f"no server on port {PORT}:\n{out}\n{err}") from None
            time.sleep(0.05)


@contextmanager
def _started(args: list[str], cwd: Path, *, stdin: int | None = None
             ) -> Iterator[subprocess.Popen[str]]:
    proc = subprocess.Popen(args, cwd=cwd, stdin=stdin, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        _wait_for_port(proc)
        yield proc
    finally:
        if proc.poll() is None:
            proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()


def _demo(cwd: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "usbipy.cli.usbipyd", "-c", os.devnull, "--demo", "--audio",
            "--webcam", "--http", "3241", "--disk-size", "1048576", "-a", "127.0.0.1", "-t",
            str(PORT), *extra]


def _run_example(script: Path, cwd: Path) -> None:
    done = subprocess.run([sys.executable, str(script)], cwd=cwd, capture_output=True,
                          text=True, timeout=120, check=False)
    print(done.stdout, end="")
    if done.returncode != 0 or "Traceback" in done.stderr:
        raise SystemExit(f"the example failed ({done.returncode}):\n{done.stderr}")


def against_demo(script: Path, cwd: Path) -> None:
    with _started(_demo(cwd), cwd):
        _run_example(script, cwd)


def against_demo_tls(script: Path, cwd: Path) -> None:
    # the README's set-up: `usbipy cert init`, `cert issue localhost --server --san
    # 127.0.0.1`, `cert issue alice --client`, in a state directory of its own
    from usbipy.cli.usbipy import main

    state = cwd / "state"
    os.environ["USBIPY_STATE_DIR"] = str(state)
    for args in (["cert", "init"], ["cert", "issue", "localhost", "--server", "--san",
                                    "127.0.0.1"], ["cert", "issue", "alice", "--client"]):
        if main(args) != 0:
            raise SystemExit(f"usbipy {' '.join(args)} failed")
    tls = state / "tls"
    for name in ("alice.pem", "alice-key.pem", "ca.pem"):
        shutil.copy(tls / name, cwd / name)
    with _started(_demo(cwd, "--tls-cert", str(tls / "localhost.pem"), "--tls-key",
                        str(tls / "localhost-key.pem"), "--tls-ca", str(tls / "ca.pem")), cwd):
        _run_example(script, cwd)


def serve_counter(script: Path, cwd: Path) -> None:
    with _started([sys.executable, str(script)], cwd):
        from usbipy.client import sync

        with sync.connect("127.0.0.1", "1-1") as counter:
            counter.control(0x00, 9, 1, 0, b"")
            counts = [int.from_bytes(counter.bulk_read(0x81, 4, timeout=5), "little")
                      for _ in range(3)]
            assert counts == [1, 2, 3], counts
            counter.control(0x40, 1, 0, 0, b"")  # the vendor request: reset
            assert counter.bulk_read(0x81, 4, timeout=5) == (1).to_bytes(4, "little")


def serve_keyboard(script: Path, cwd: Path) -> None:
    from usbipy.client import sync

    with _started([sys.executable, str(script)], cwd, stdin=subprocess.PIPE) as proc:
        assert proc.stdin is not None
        with sync.connect("127.0.0.1", "1-1") as keyboard:
            keyboard.control(0x00, 9, 1, 0, b"")
            proc.stdin.write("\n")  # "then press Enter here to type"
            proc.stdin.flush()
            pressed: list[int] = []
            while len(pressed) < 6:
                report = keyboard.interrupt_read(0x81, 8, timeout=10)
                if report[2]:
                    pressed.append(report[2])
            # HID usages of h, e, l, l, o and Enter (HID Usage Tables, 10)
            assert pressed == [0x0B, 0x08, 0x0F, 0x0F, 0x12, 0x28], pressed
        proc.stdin.write("\n")  # "Enter to stop"
        proc.stdin.flush()
        assert proc.wait(timeout=30) == 0


def serve_streaming(script: Path, cwd: Path) -> None:
    from usbipy.client import sync

    with _started([sys.executable, str(script)], cwd, stdin=subprocess.PIPE) as proc:
        assert proc.stdin is not None
        found = {}
        for busid in ("1-1", "1-2"):
            with sync.connect("127.0.0.1", busid) as device:
                descriptor = device.control(0x80, 6, 0x0100, 0, 18, timeout=5)
                found[busid] = int.from_bytes(descriptor[4:5], "little")  # bDeviceClass
        # the headset is described per interface (class 0); the webcam is a composite
        # of a video function (Interface Association: class 0xEF)
        assert found == {"1-1": 0x00, "1-2": 0xEF}, found
        proc.stdin.write("\n")
        proc.stdin.flush()
        assert proc.wait(timeout=30) == 0


RUNNERS: dict[str, Callable[[Path, Path], None]] = {
    "demo": against_demo, "demo-tls": against_demo_tls, "server counter": serve_counter,
    "server keyboard": serve_keyboard, "server streaming": serve_streaming,
}


def test_every_example_has_a_runner() -> None:
    assert {kind for kind, _ in examples()} <= set(RUNNERS)


if __name__ == "__main__":
    kind, script = sys.argv[1], Path(sys.argv[2])
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    RUNNERS[kind](script, Path(os.environ["EXAMPLE_CWD"]))
    print("example: passed")
