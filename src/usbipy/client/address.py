"""A server's address as users write it: ``HOST``, ``HOST:PORT``, ``[V6ADDR]`` or
``[V6ADDR]:PORT`` (a bare IPv6 address is a host)."""

from __future__ import annotations

from ..escape import printable


def split_address(text: str) -> tuple[str, int | None]:
    """(host, port) from ``text``, the port None when it names none; ValueError
    naming what is wrong."""
    shown = printable(text)
    port_text = ""
    if text.startswith("["):
        host, bracket, rest = text[1:].partition("]")
        if not bracket or rest and not rest.startswith(":"):
            raise ValueError(f"bad address {shown}: write [IPV6ADDRESS]:PORT")
        port_text = rest[1:] if rest else ""
        if rest and not port_text:
            raise ValueError(f"bad port in {shown}")
    elif text.count(":") == 1:
        host, _, port_text = text.partition(":")
        if not port_text:
            raise ValueError(f"bad port in {shown}")
    else:
        host = text  # (a name, an IPv4 address, or an IPv6 address without a port)
    if not host:
        raise ValueError(f"no host in {shown}")
    if not port_text:
        return host, None
    if not (port_text.isascii() and port_text.isdecimal()):
        raise ValueError(f"bad port in {shown}")
    port = int(port_text)
    if not 0 < port < 65536:
        raise ValueError(f"port {port} out of range (1 to 65535)")
    return host, port
