"""The root of usbipy's exceptions; each package adds its own below it."""

from __future__ import annotations


class UsbipError(Exception):
    """Base class of every error usbipy raises on purpose."""
