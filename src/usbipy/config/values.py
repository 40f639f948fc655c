"""What a setting's value may be, checked the same way on the command line and
in the configuration file.

A :class:`Kind` holds both checks: ``parse`` turns an option's text into the
value (argparse's ``type``; ArgumentTypeError names what is wrong), ``check``
takes a value from the file (ConfigError at the file's line and key). The
ranges are the same for both, so an option and its key refuse the same things.
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .toml import Document, KeyPath

#: Checks a value the file gives; raises the Document's ConfigError.
Check = Callable[[Document, KeyPath, Any], Any]

#: The ranges a value may take, in the file and as an option.
PORTS = (0, 65535)
COUNTS = (1, 1 << 20)
#: A resume buffer holds at least a few frames (protocol.resume.MAX_FRAME).
RESUME_BUFFERS = (4 << 20, 1 << 40)
DISK_SIZES = (512, 1 << 50)
#: A capture file's size in MB, and how many files the ring keeps.
CAPTURE_SIZES = (1, 1 << 20)
CAPTURE_FILES = (1, 1000)
MAX_SECONDS = 3600.0
MAX_RATE = 1e6
MAX_HERTZ = 20000.0

#: Four hex digits a side (as devices are compared: "046d:c52b"), or a pattern with a
#: wildcard (* ? [...]); "46d:c52b" would never match anything.
_HEX4 = re.compile(r"[0-9a-f]{4}", re.IGNORECASE)
_ID_PATTERN = re.compile(r"[0-9a-f*?\[\]!-]+", re.IGNORECASE)


@dataclass(frozen=True)
class Kind:
    """A setting's kind of value: its file check, and how argparse takes it."""

    check: Check
    #: argparse's ``type`` (None: the text as is).
    parse: Callable[[str], Any] | None = None
    #: argparse's ``choices``.
    choices: tuple[str, ...] | None = None
    #: A switch: --NAME and --no-NAME (argparse.BooleanOptionalAction).
    switch: bool = False
    #: An option that may repeat, each adding a value (argparse's "append").
    repeats: bool = False


def shown(value: Any) -> str:
    """A value in an error: its repr, cut to 40 characters."""
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def vid_pid_valid(pattern: str) -> bool:
    sides = pattern.split(":")
    return len(sides) == 2 and all(
        _HEX4.fullmatch(side) or (any(c in side for c in "*?[") and _ID_PATTERN.fullmatch(side))
        for side in sides)


# --- the file's checks ----------------------------------------------------------------


def check_string(doc: Document, path: KeyPath, value: Any) -> str:
    if not isinstance(value, str):
        raise doc.error(path, f"{shown(value)} is not a string")
    if not value:
        raise doc.error(path, "empty")
    return value


def check_strings(doc: Document, path: KeyPath, value: Any) -> tuple[str, ...]:
    """A string or a list of strings, none empty."""
    values = value if isinstance(value, list) else [value]
    if not values:
        raise doc.error(path, "an empty list")
    return tuple(check_string(doc, path, v) for v in values)


def _file(doc: Document, path: KeyPath, value: Any) -> str:
    # (relative to the file's directory)
    return str(doc.path.parent / check_string(doc, path, value))


def _bool(doc: Document, path: KeyPath, value: Any) -> bool:
    if not isinstance(value, bool):
        raise doc.error(path, f"{shown(value)} is not true or false")
    return value


def _text(text: str) -> str:
    if not text.isprintable() or not 0 < len(text) <= 63:
        raise argparse.ArgumentTypeError(f"{shown(text)}: a name is 1 to 63 printable "
                                         "characters")
    return text


def _check_text(doc: Document, path: KeyPath, value: Any) -> str:
    text = check_string(doc, path, value)
    try:
        return _text(text)
    except argparse.ArgumentTypeError as exc:
        raise doc.error(path, str(exc)) from None


def check_choice(*choices: str) -> Check:
    def check(doc: Document, path: KeyPath, value: Any) -> str:
        if value not in choices:
            raise doc.error(path, f"{shown(value)} is not one of {', '.join(choices)}")
        return str(value)
    return check


# --- argparse's types -----------------------------------------------------------------


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


def positive(high: float, zero: bool = False) -> Callable[[str], float]:
    """An argparse type: a number above 0 (or 0 too, with ``zero``), at most ``high``
    (as in the file)."""
    def convert(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if not (0 <= value if zero else 0 < value) or not value <= high:
            raise argparse.ArgumentTypeError(
                f"{text} is out of range ({_low(zero)}, at most {high:g})")
        return value
    return convert


def _low(zero: bool) -> str:
    return "0 or more" if zero else "more than 0"


def host_port(text: str, default_host: str = "127.0.0.1") -> tuple[str, int]:
    """``ADDR:PORT``, ``[V6ADDR]:PORT`` or ``PORT`` (on ``default_host``); ValueError
    naming what is wrong (argparse shows it as the option's error)."""
    host, port_text = default_host, text
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        if not rest.startswith(":"):
            raise ValueError(f"{text!r}: expected [ADDRESS]:PORT")
        port_text = rest[1:]
    elif ":" in text:
        if text.count(":") > 1:
            raise ValueError(f"{text!r}: write an IPv6 address in brackets: [ADDRESS]:PORT")
        host, _, port_text = text.partition(":")
        host = host or default_host
    if not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise ValueError(f"{text!r}: the port must be a number from 0 to 65535")
    return host, int(port_text)


def address_and_port(text: str) -> tuple[str, int]:
    """An argparse type for :func:`host_port`."""
    try:
        return host_port(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


# --- the kinds ------------------------------------------------------------------------


def whole_number(low: int, high: int) -> Kind:
    def check(doc: Document, path: KeyPath, value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise doc.error(path, f"{shown(value)} is not a whole number")
        if not low <= value <= high:
            raise doc.error(path, f"{value} is out of range ({low} to {high})")
        return value
    return Kind(check, whole(low, high))


def seconds(high: float = MAX_SECONDS, zero: bool = False) -> Kind:
    """Seconds above 0 (or 0 too, with ``zero``: "none"), at most ``high``."""
    def check(doc: Document, path: KeyPath, value: Any) -> float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise doc.error(path, f"{shown(value)} is not a number of seconds")
        if not (0 <= value if zero else 0 < value) or not value <= high:
            raise doc.error(path, f"{value:g} is out of range ({_low(zero)}, at most {high:g})")
        return float(value)
    return Kind(check, positive(high, zero))


def rate(high: float = MAX_RATE) -> Kind:
    def check(doc: Document, path: KeyPath, value: Any) -> float:
        if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
            raise doc.error(path, f"{shown(value)} is not a positive number")
        if not value <= high:
            raise doc.error(path, f"{value:g} is out of range (at most {high:g})")
        return float(value)
    return Kind(check, positive(high))


def hertz(high: float = MAX_HERTZ) -> Kind:
    def check(doc: Document, path: KeyPath, value: Any) -> float:
        if (isinstance(value, bool) or not isinstance(value, int | float)
                or not 0 < value <= high):
            raise doc.error(path, f"{shown(value)} is not a frequency of {high:g} Hz or less")
        return float(value)
    return Kind(check, positive(high))


def choice(*choices: str) -> Kind:
    return Kind(check_choice(*choices), choices=choices)


def _host_port_check(doc: Document, path: KeyPath, value: Any) -> tuple[str, int]:
    if isinstance(value, int) and not isinstance(value, bool):  # (metrics = 9240)
        value = str(value)
    text = check_string(doc, path, value)
    try:
        return host_port(text)
    except ValueError as exc:
        raise doc.error(path, str(exc)) from None


#: True or false; --NAME and --no-NAME.
SWITCH = Kind(_bool, switch=True)
#: A line of text (a name).
TEXT = Kind(lambda doc, path, value: _check_text(doc, path, value), _text)
#: A file's name; in the file, relative to the file's directory.
FILE = Kind(_file)
#: ADDR:PORT, [V6ADDR]:PORT or PORT (on 127.0.0.1).
HOST_PORT = Kind(_host_port_check, address_and_port)
#: Addresses: an option that repeats, a string or a list of them in the file.
ADDRESSES = Kind(lambda doc, path, value: list(check_strings(doc, path, value)), repeats=True)
