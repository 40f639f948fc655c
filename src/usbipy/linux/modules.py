"""Whether this kernel has a module, and what to tell a user who lacks one."""

from __future__ import annotations

import os
from pathlib import Path

MODULES_ROOT = Path("/lib/modules")

#: Where a kernel's extra modules (usbip-host, vhci-hcd, tls) come from.
EXTRA_MODULES = ("install the kernel's extra modules (Debian: they ship with linux-image-*; "
                 "Ubuntu: linux-modules-extra-$(uname -r))")


def module_installed(name: str) -> bool:
    """In this kernel's module tree (modules.dep or modules.builtin name it)."""
    return listed(name, ("modules.dep", "modules.builtin"))


def listed(name: str, indexes: tuple[str, ...]) -> bool:
    """Whether one of this kernel's module ``indexes`` names module ``name``."""
    base = MODULES_ROOT / os.uname().release
    wanted = {name.replace("-", "_"), name.replace("_", "-")}
    for index in indexes:
        try:
            text = (base / index).read_text()
        except OSError:
            continue
        for line in text.splitlines():
            stem = line.split(":", 1)[0].rsplit("/", 1)[-1].split(".ko", 1)[0]
            if stem in wanted:
                return True
    return False


def load_hint(name: str) -> str:
    """What to do about module ``name`` not being loaded: modprobe it where this
    kernel has it; else, install it (modprobe would only fail)."""
    if module_installed(name):
        return f"run 'modprobe {name}' as root"
    return f"it is not installed for this kernel: {EXTRA_MODULES}"
