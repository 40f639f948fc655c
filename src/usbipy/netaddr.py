"""An address as usbipy's checks judge it: on this machine only (loopback), or not."""

from __future__ import annotations

import ipaddress


def is_loopback(host: str) -> bool:
    """Whether ``host`` reaches this machine only: 127.0.0.0/8, ::1, an IPv4-mapped
    loopback address, or the name "localhost" (an IPv6 scope is ignored); any other
    name, or a wildcard address, is not."""
    if host == "localhost":
        return True
    try:
        address = ipaddress.ip_address(host.split("%", 1)[0].strip("[]"))
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return address.is_loopback
