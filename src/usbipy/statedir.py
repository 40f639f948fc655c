"""Where usbipy keeps what outlives a process: the export rules `usbipy bind` records,
the TLS CA."""

from __future__ import annotations

import os
from pathlib import Path

#: The default state directory; USBIPY_STATE_DIR overrides it.
DEFAULT_STATE_DIR = Path("/var/lib/usbipy")


def state_dir() -> Path:
    return Path(os.environ.get("USBIPY_STATE_DIR", DEFAULT_STATE_DIR))
