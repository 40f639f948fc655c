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


def test_importing_the_codec_loads_no_io() -> None:
    code = ("import sys, usbipy.protocol; "
            "print(' '.join(m for m in ('asyncio', 'socket', 'selectors', 'ssl', "
            "'usbipy.server', 'usbipy.client', 'usbipy.backends') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            check=True)
    assert result.stdout.strip() == ""


def test_the_top_level_names_load_on_use() -> None:
    assert usbipy.UsbipServer.__module__ == "usbipy.server.daemon"
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
