"""A TOML file read with tomllib, and the line each key is written on.

tomllib gives values, not positions; an error about a value ("unknown key",
"not a number") is only useful with the line it is on. :class:`Document`
finds each key's line with a scan of the text that knows tables, arrays of
tables, dotted keys and multi-line strings and arrays (values inside an
inline table or an array are placed at their key's line).
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ..errors import UsbipError

#: A path to a value: table names, keys and array-of-tables indexes.
KeyPath = tuple[str | int, ...]

_HEADER = re.compile(r"\s*(\[\[?)(.*?)\]\]?\s*(?:#.*)?$")
_KEY_PART = re.compile(r"""\s*(?:([A-Za-z0-9_-]+)|"((?:[^"\\]|\\.)*)"|'([^']*)')\s*""")
_TOML_POSITION = re.compile(r"^(.*) \(at line (\d+), column (\d+)\)$")


class ConfigError(UsbipError):
    """A configuration file that cannot be used; the text names file and line."""


def _key(text: str) -> tuple[list[str], int] | None:
    """The dotted key at the start of ``text`` and where its "=" is, if it is one."""
    parts: list[str] = []
    pos = 0
    while True:
        m = _KEY_PART.match(text, pos)
        if m is None:
            return None
        parts.append(next(g for g in m.groups() if g is not None))
        pos = m.end()
        if text.startswith(".", pos):
            pos += 1
            continue
        return (parts, pos) if text.startswith("=", pos) else None


def _open_brackets(text: str) -> int:
    """Brackets and braces opened minus closed, strings and comments left out."""
    depth = 0
    quote = ""
    i = 0
    while i < len(text):
        ch = text[i]
        if quote:
            if ch == "\\" and quote == '"':
                i += 1
            elif ch == quote:
                quote = ""
        elif ch in "\"'":
            quote = ch
        elif ch == "#":
            break
        elif ch in "[{":
            depth += 1
        elif ch in "]}":
            depth -= 1
        i += 1
    return depth


#: The delimiters of multi-line strings.
_MULTILINE = ('"' * 3, "'" * 3)


def _unclosed_multiline(text: str) -> str:
    """The multi-line string delimiter ``text`` opens and leaves open, or "". Strings
    on one line and comments are skipped: triple quotes in them open nothing."""
    quote = ""
    i = 0
    while i < len(text):
        ch = text[i]
        if quote:
            if len(quote) == 3 and text.startswith(quote, i):
                quote, i = "", i + 3
                continue
            if ch == "\\" and quote[0] == '"':
                i += 2
                continue
            if len(quote) == 1 and ch == quote:
                quote = ""
        elif text.startswith(_MULTILINE, i):
            quote, i = text[i:i + 3], i + 3
            continue
        elif ch in "\"'":
            quote = ch
        elif ch == "#":
            break
        i += 1
    return quote if len(quote) == 3 else ""


def _key_lines(text: str) -> dict[KeyPath, int]:
    lines: dict[KeyPath, int] = {}
    table: KeyPath = ()
    counts: dict[tuple[str, ...], int] = {}
    depth = 0
    in_string = ""
    # (only "\n" ends a line in TOML; str.splitlines() would also split at U+2028)
    for number, line in enumerate(text.split("\n"), 1):
        if in_string:
            if in_string in line:
                in_string = ""
            continue
        if depth > 0:
            in_string = _unclosed_multiline(line)
            if not in_string:
                depth += _open_brackets(line)
            continue
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        header = _HEADER.match(line) if stripped.startswith("[") else None
        if header is not None:
            parsed = _key(header.group(2) + "=")
            if parsed is None:
                continue
            names = tuple(parsed[0])
            if header.group(1) == "[[":
                index = counts.get(names, 0)
                counts[names] = index + 1
                table = (*names, index)
            else:
                table = names
            lines.setdefault(table, number)
            continue
        found = _key(line)
        if found is None:
            continue
        parts, end = found
        path = (*table, *parts)
        lines.setdefault(path, number)
        value = line[end + 1:]
        in_string = _unclosed_multiline(value)
        if not in_string:
            depth = max(_open_brackets(value), 0)
    return lines


def dotted(path: KeyPath) -> str:
    """``("policy", "rule", 2, "action")`` as "policy.rule[3].action" (1-based)."""
    text = ""
    for part in path:
        if isinstance(part, int):
            text += f"[{part + 1}]"
        else:
            text += f".{part}" if text else part
    return text


class Document:
    """A parsed TOML file: its values, and where each is written."""

    def __init__(self, path: Path, data: dict[str, Any], lines: dict[KeyPath, int]) -> None:
        self.path = path
        self.data = data
        self._lines = lines

    @classmethod
    def read(cls, path: str | Path) -> Document:
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigError(f"{path}: {exc.strerror or exc}") from exc
        except UnicodeDecodeError as exc:
            raise ConfigError(f"{path}: not UTF-8 text ({exc.reason})") from exc
        return cls.parse(text, path)

    @classmethod
    def parse(cls, text: str, path: Path) -> Document:
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            message = str(exc)
            m = _TOML_POSITION.match(message)
            if m is None:
                message = message.replace(" (at end of document)", " at the end of the file")
                raise ConfigError(f"{path}: {message[0].lower()}{message[1:]}") from None
            what, line, column = m.groups()
            raise ConfigError(f"{path}:{line}: {what[0].lower()}{what[1:]} "
                              f"(column {column})") from None
        return cls(path, data, _key_lines(text))

    def line(self, path: KeyPath) -> int | None:
        """The line ``path`` is written on, or its nearest enclosing key's."""
        for end in range(len(path), 0, -1):
            number = self._lines.get(path[:end])
            if number is not None:
                return number
        return None

    def where(self, path: KeyPath) -> str:
        """"usbipyd.toml:12" for messages."""
        number = self.line(path)
        return f"{self.path}:{number}" if number is not None else str(self.path)

    def error(self, path: KeyPath, what: str) -> ConfigError:
        """The error for a bad value: "FILE:LINE: key.path: what"."""
        return ConfigError(f"{self.where(path)}: {dotted(path)}: {what}" if path
                           else f"{self.where(path)}: {what}")

    def items(self, path: KeyPath, table: dict[str, Any]) -> Iterator[tuple[KeyPath, Any]]:
        for key, value in table.items():
            yield (*path, key), value
