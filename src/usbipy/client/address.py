"""A server's address as users write it: ``HOST``, ``HOST:PORT``, ``[V6ADDR]`` or
``[V6ADDR]:PORT`` (a bare IPv6 address is a host), or a URL,
``usbip://HOST[:PORT][/BUSID]`` (``/VID:PID[:SERIAL]`` for a device by its ids;
``*`` for the host: wherever DNS-SD finds it)."""

from __future__ import annotations

from urllib.parse import unquote, urlsplit

from ..escape import printable
from ..protocol.constants import USBIP_PORT


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


def parse_address(address: str, busid: str | None = None) -> tuple[str, int, str | None]:
    """(host, port, busid) from ``"HOST"``, ``"HOST:PORT"``, ``"[V6]:PORT"`` or
    ``"usbip://HOST[:PORT][/BUSID]"``; ValueError naming what is wrong."""
    shown = printable(address)
    if "://" in address:
        url = urlsplit(address)
        if url.scheme != "usbip":
            raise ValueError(f"not a usbip:// URL: {shown}")
        if url.username is not None or url.query or url.fragment:
            raise ValueError(f"a usbip:// URL has a host, a port and a busid only: {shown}")
        netloc = url.netloc
        if netloc.startswith("[") and "]" not in netloc:
            raise ValueError(f"bad address {shown}")
        # (an IPv6 zone is percent-encoded in a URL, RFC 6874: fe80::1%25eth0)
        host = unquote(netloc[1:netloc.index("]")] if netloc.startswith("[")
                       else netloc.rpartition(":")[0] if ":" in netloc else netloc)
        try:
            port = url.port if url.port is not None else USBIP_PORT
        except ValueError:
            raise ValueError(f"bad port in {shown}") from None
        path = unquote(url.path[1:] if url.path.startswith("/") else url.path)
        if path:
            if "/" in path:
                raise ValueError(f"a busid has no '/': {shown}")
            if busid is not None and busid != path:
                raise ValueError(f"the URL names busid {printable(path)}, busid= says "
                                 f"{printable(busid)}")
            busid = path
    else:
        host, given = split_address(address)
        port = given if given is not None else USBIP_PORT
    if not host:
        raise ValueError(f"no host in {shown}")
    if not 0 < port < 65536:
        raise ValueError(f"port {port} out of range (1 to 65535)")
    return host, port, busid
