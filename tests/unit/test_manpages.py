"""usbipy(8) and usbipyd(8) are made from the parsers that make --help: every option
and command is in them, so the pages cannot drift from the programs."""

from __future__ import annotations

import argparse
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from usbipy import __version__
from usbipy.cli import usbipy, usbipyd

ROOT = Path(__file__).parents[2]


def _names(parser: argparse.ArgumentParser) -> Iterator[str]:
    """Every long option and command name of ``parser`` and its subcommands."""
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield name
                yield from _names(sub)
        yield from (o for o in action.option_strings if o.startswith("--"))


@pytest.mark.parametrize("module", [usbipy, usbipyd], ids=["usbipy", "usbipyd"])
def test_the_page_holds_every_option_and_command(module, tmp_path: Path) -> None:
    subprocess.run([str(ROOT / "scripts/manpages.sh"), str(tmp_path)], check=True,
                   cwd=ROOT, capture_output=True)
    prog = module.__name__.rsplit(".", 1)[1]
    page = (tmp_path / f"{prog}.8").read_text().replace("\\-", "-")
    assert page.startswith(f'.TH {prog.upper()} "8"')
    assert f'"{prog} {__version__}"' in page or __version__ in page
    names = set(_names(module.build_parser()))
    assert len(names) > 20
    missing = sorted(n for n in names if n not in page)
    assert not missing, missing
