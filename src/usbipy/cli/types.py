"""argparse types shared by the commands: numbers in the ranges the file takes too."""

from __future__ import annotations

import argparse
from collections.abc import Callable

from ..config.daemon import host_port


def whole(low: int, high: int) -> Callable[[str], int]:
    """An argparse type: a whole number from ``low`` to ``high`` (as in the file)."""
    def convert(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"{value} is out of range ({low} to {high})")
        return value
    return convert


def positive(high: float) -> Callable[[str], float]:
    """An argparse type: a number above 0, at most ``high`` (as in the file)."""
    def convert(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if not 0 < value <= high:
            raise argparse.ArgumentTypeError(
                f"{text} is out of range (more than 0, at most {high:g})")
        return value
    return convert


def address_and_port(text: str) -> tuple[str, int]:
    """An argparse type for :func:`host_port`."""
    try:
        return host_port(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
