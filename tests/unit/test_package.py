"""The package's shape: what importing loads, what it exports, where the version lives."""

from __future__ import annotations

import importlib
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

import usbipy

ROOT = Path(__file__).resolve().parents[2]


#: What importing a module must not load: the layers below do not reach up, and
#: what needs no event loop (or no network) does not load one.
FORBIDDEN_LOADS = {
    # the sans-IO codec: bytes in, messages out
    "usbipy.protocol": ("asyncio", "socket", "selectors", "ssl", "usbipy.server",
                        "usbipy.client", "usbipy.backends", "usbipy.config"),
    # the USB spec's vocabulary is below the codec
    "usbipy.usb": ("usbipy.protocol", "asyncio", "socket", "ssl"),
    # the access rules are pure
    "usbipy.policy": ("asyncio", "socket", "ssl", "usbipy.server"),
    # the settings are below the server that runs with them
    "usbipy.config": ("usbipy.server", "usbipy.backends", "usbipy.devices", "usbipy.capture",
                      "asyncio"),
    # the blocking client and what is built on it need no event loop
    "usbipy.client.sync": ("asyncio", "usbipy.client.userspace", "usbipy.server"),
    "usbipy.client.transfers": ("asyncio", "usbipy.client.userspace"),
    "usbipy.pyusb": ("asyncio", "usbipy.client.userspace", "usbipy.server"),
    # the captures' blocks and records are sans-IO too
    "usbipy.capture.pcapng": ("asyncio", "socket", "usbipy.server"),
    "usbipy.capture.usbmon": ("asyncio", "socket", "usbipy.server"),
}


@pytest.mark.parametrize("module", sorted(FORBIDDEN_LOADS))
def test_importing_loads_nothing_above_it(module: str) -> None:
    forbidden = FORBIDDEN_LOADS[module]
    code = (f"import sys, {module}; "
            f"print(' '.join(m for m in {forbidden!r} if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            check=True)
    assert result.stdout.strip() == "", f"importing {module} loads {result.stdout.strip()}"


def test_the_top_level_names_load_on_use() -> None:
    assert usbipy.UsbipServer.__module__ == "usbipy.server.server"
    assert set(dir(usbipy)) == set(usbipy.__all__)


@pytest.mark.parametrize("name", [
    "usbipy", "usbipy.protocol", "usbipy.usb", "usbipy.backends", "usbipy.backends.libusb",
    "usbipy.devices", "usbipy.server", "usbipy.client",
])
def test_all_is_sorted_and_complete(name: str) -> None:
    module = importlib.import_module(name)
    exported = module.__all__
    assert list(exported) == sorted(exported), f"{name}.__all__ is not sorted"
    assert len(set(exported)) == len(exported)
    for attr in exported:
        assert hasattr(module, attr), f"{name}.__all__ names {attr}, which is missing"
    public = {attr for attr, value in vars(module).items()
              if not attr.startswith("_") and not isinstance(value, type(sys))
              and getattr(value, "__module__", "").startswith("usbipy")}
    public.discard("annotations")
    assert public <= set(exported), f"{name} exports {public - set(exported)} without __all__"


def test_the_version_is_written_once() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert "version" not in project and "version" in project["dynamic"]
    assert usbipy.__version__.count(".") == 2


def test_the_package_is_typed() -> None:
    assert (ROOT / "src/usbipy/py.typed").exists()


def test_a_second_setup_installs_nothing() -> None:
    """scripts/demo.sh runs setup.sh at every start: once the .venv matches
    pyproject.toml (the test command ran setup.sh just now), pip is not run again."""
    stamp = ROOT / ".venv/.usbipy-installed"
    if not stamp.exists():
        pytest.fail("run the tests with scripts/test.sh, which sets the .venv up first")
    trace = subprocess.run(["sh", "-x", str(ROOT / "scripts/setup.sh"), "--test"], cwd=ROOT,
                           capture_output=True, text=True, timeout=300, check=True).stderr
    assert "pip install" not in trace and "apt-get" not in trace, trace
