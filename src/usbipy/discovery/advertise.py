"""usbipyd's DNS-SD advertisement, with python-zeroconf on the server's event loop.

A server listening on a wildcard address advertises every address the host has
(but loopback); one listening on given addresses advertises those, on their
interfaces. The advertisement is withdrawn (an mDNS goodbye, TTL 0) when usbipyd
stops, so browsers drop it at once.
"""

from __future__ import annotations

import ipaddress
import socket

import ifaddr
from zeroconf import InterfaceChoice, IPVersion, NonUniqueNameException, ServiceInfo
from zeroconf.asyncio import AsyncZeroconf

from .records import SERVICE_TYPE, host_label, instance_label, txt_record

#: Wildcard listen addresses.
ANY = ("0.0.0.0", "::")


def host_addresses(listening: list[str]) -> list[str]:
    """The addresses to advertise for a server listening on ``listening``: those given,
    and for a wildcard every address of its family the host has (usbipyd's IPv6
    sockets are IPv6 only: "::" serves no IPv4 client), loopback and link-local
    IPv6 left out (a scope is not in an AAAA record)."""
    found: list[str] = [a for a in listening if a not in ANY]
    if "0.0.0.0" in listening or "::" in listening:
        for adapter in ifaddr.get_adapters():
            for ip in adapter.ips:
                if isinstance(ip.ip, str):
                    if "0.0.0.0" in listening:
                        found.append(ip.ip)
                elif "::" in listening:
                    found.append(ip.ip[0])
    unique: list[str] = []
    for text in found:
        address = ipaddress.ip_address(text.split("%", 1)[0])
        if address.is_loopback or (address.version == 6 and address.is_link_local):
            continue
        if str(address) not in unique:
            unique.append(str(address))
    return unique


class Advertiser:
    """One server's advertisement, started and closed on the loop."""

    def __init__(self, name: str, port: int, listening: list[str], *, tls: bool,
                 page_port: int | None = None, page_host: str | None = None) -> None:
        self.name = name
        self.port = port
        self._listening = listening
        self._tls = tls
        self._page_port = page_port
        self._page_host = page_host
        self._zeroconf: AsyncZeroconf | None = None
        self._info: ServiceInfo | None = None
        #: The instance name in use (python-zeroconf renames it on a conflict).
        self.instance = f"{instance_label(name)}.{SERVICE_TYPE}"

    async def start(self) -> None:
        addresses = host_addresses(self._listening)
        if not addresses:
            raise ValueError("no address but loopback to advertise")
        wildcard = any(a in ANY for a in self._listening)
        interfaces = InterfaceChoice.All if wildcard else addresses
        version = (IPVersion.All if any(":" in a for a in addresses) else IPVersion.V4Only)
        self._zeroconf = AsyncZeroconf(interfaces=interfaces, ip_version=version)
        self._info = ServiceInfo(
            SERVICE_TYPE, self.instance, port=self.port,
            properties=txt_record(self.name, tls=self._tls, page_port=self._page_port,
                                  page_host=self._page_host),
            # (a host name of its own: the machine's, NAME.local, is avahi's to
            # announce; two announcers of one name make avahi rename the host)
            server=f"usbipy-{host_label(socket.gethostname())}.local.",
            parsed_addresses=addresses)
        try:
            # (the first await probes the name; the second announces it)
            await (await self._zeroconf.async_register_service(
                self._info, allow_name_change=True))
        except NonUniqueNameException as exc:
            await self.close()
            raise ValueError(f"the name {self.instance} is taken") from exc
        except BaseException:
            await self.close()
            raise
        self.instance = self._info.name

    async def close(self) -> None:
        zeroconf, self._zeroconf = self._zeroconf, None
        if zeroconf is None:
            return
        try:
            if self._info is not None:
                await (await zeroconf.async_unregister_service(self._info))
        finally:
            await zeroconf.async_close()
