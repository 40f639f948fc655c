"""Peer-supplied text made safe for a log line or a terminal.

A busid, a path or a certificate name comes from the network. Written raw, a
newline forges a log line and an escape sequence drives the reader's
terminal. :func:`printable` keeps printable text as it is and shows every
other character as a Python escape (``\\n``, ``\\x1b``), so the text stays
readable and can never be mistaken for something else.
"""

from __future__ import annotations


def printable(text: str) -> str:
    """``text`` with control, format and other unprintable characters escaped."""
    if text.isprintable():
        return text
    return "".join(ch if ch.isprintable() else repr(ch)[1:-1] for ch in text)
