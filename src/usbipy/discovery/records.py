"""What a usbipy server says of itself in DNS-SD, and what a browser makes of it.

Pure: no sockets. The TXT record (RFC 6763 section 6) carries the protocol
version, whether TLS is required, the server's name and, where the status page
is served on the network, its port. It carries no device list: that stays
behind the server's access policy.
"""

from __future__ import annotations

import dataclasses
import ipaddress
from dataclasses import dataclass
from typing import Any

from ..escape import printable
from ..protocol.constants import USBIP_VERSION

#: The DNS-SD service type (see the package's notes on IANA's registry).
SERVICE_TYPE = "_usbip._tcp.local."
#: The TXT record's version (RFC 6763 section 6.7).
TXT_VERSION = "1"
PROTOCOL = f"{USBIP_VERSION >> 8}.{(USBIP_VERSION >> 4) & 0xF}.{USBIP_VERSION & 0xF}"
#: Seconds `usbipy list --all` listens for servers by default. A responder answers
#: a query within 20-120 ms (RFC 6762 section 6), and python-zeroconf asks again
#: after 1 s, so 2 s hears a server that missed the first question.
BROWSE_TIME = 2.0
#: Longest server name advertised (a DNS label is 63 bytes).
MAX_NAME = 63


def txt_record(name: str, *, tls: bool, page_port: int | None,
               page_host: str | None = None) -> dict[str, str]:
    """The TXT record of a server called ``name``; its page, when it serves one on the
    network: ``page=PORT`` on the advertised addresses, or ``page=ADDR:PORT`` when the
    page listens on an address of its own."""
    record = {"txtvers": TXT_VERSION, "protocol": PROTOCOL,
              "tls": "required" if tls else "none", "name": name}
    if page_port is not None:
        record["page"] = (str(page_port) if page_host is None else
                          f"[{page_host}]:{page_port}" if ":" in page_host else
                          f"{page_host}:{page_port}")
    return record


def _page(text: str) -> tuple[str | None, int | None]:
    """(host or None, port) of a TXT record's ``page``; (None, None) when it is not one."""
    host: str | None = None
    port = text
    if ":" in text:
        host, _, port = text.rpartition(":")
        host = host.strip("[]")
        try:
            host = str(ipaddress.ip_address(host))
        except ValueError:
            return None, None
    if not port.isdigit() or not 0 < int(port) < 65536:
        return None, None
    return host, int(port)


def instance_label(name: str) -> str:
    """``name`` as a DNS-SD instance label: at most 63 bytes of UTF-8, no dots
    (python-zeroconf reads a dot as a label separator)."""
    label = name.replace(".", "-").strip() or "usbipy"
    while len(label.encode()) > MAX_NAME:
        label = label[:-1]
    return label


def host_label(name: str) -> str:
    """``name`` as a host name label: letters, digits and hyphens (RFC 952)."""
    label = "".join(c if c.isascii() and (c.isalnum() or c == "-") else "-"
                    for c in name.split(".", 1)[0]).strip("-")
    return (label or "host")[:50]


@dataclass(frozen=True)
class Found:
    """A server a browse found."""

    #: The DNS-SD instance name ("lab1._usbip._tcp.local."), raw.
    instance: str
    #: The name its TXT record gives, raw (print :attr:`shown_name`).
    name: str
    addresses: tuple[str, ...]
    port: int
    tls: bool
    protocol: str | None
    #: The status page's port, when it serves one on the network, and its address
    #: when that is not the server's.
    page_port: int | None = None
    page_host: str | None = None

    @property
    def host(self) -> str:
        """The address to connect to: the first IPv4 one, else the first."""
        v4 = [a for a in self.addresses if ":" not in a]
        return (v4 or list(self.addresses))[0]

    @property
    def shown_name(self) -> str:
        return printable(self.name)

    @property
    def target(self) -> str:
        """HOST:PORT as usbipy's -r takes it."""
        host = self.host
        return f"[{host}]:{self.port}" if ":" in host else f"{host}:{self.port}"

    @property
    def page(self) -> str | None:
        if self.page_port is None:
            return None
        host = self.page_host or self.host
        shown = f"[{host}]" if ":" in host else host
        return f"https://{shown}:{self.page_port}/"

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "instance": self.instance, "host": self.host,
                "addresses": list(self.addresses), "port": self.port, "tls": self.tls,
                "protocol": self.protocol, "page": self.page}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Found:
        page = data.get("page")
        page_host = page_port = None
        if isinstance(page, str) and page.startswith("https://"):
            page_host, page_port = _page(page[len("https://"):].rstrip("/"))
        found = cls(str(data["instance"]), str(data["name"]),
                    tuple(str(a) for a in data["addresses"]), int(data["port"]),
                    bool(data["tls"]), data.get("protocol"), page_port)
        if page_host is not None and page_host != found.host:
            found = dataclasses.replace(found, page_host=page_host)
        return found


def parse_service(instance: str, addresses: list[str], port: int | None,
                  properties: dict[bytes, bytes | None]) -> Found | None:
    """A resolved service as a :class:`Found`, or None when it is not a server this
    client can use (no address, no port, a TXT record it cannot read)."""
    if not addresses or not port or not 0 < port < 65536:
        return None
    valid = []
    for address in addresses:
        try:
            valid.append(str(ipaddress.ip_address(address.split("%", 1)[0])))
        except ValueError:
            continue
    if not valid:
        return None
    txt = {key.decode("utf-8", "replace").lower():
           (value.decode("utf-8", "replace") if value is not None else "")
           for key, value in properties.items()}
    label = instance[:-len(SERVICE_TYPE) - 1] if instance.endswith("." + SERVICE_TYPE) \
        else instance
    page_host, page_port = _page(txt.get("page", ""))
    return Found(instance, (txt.get("name") or label)[:MAX_NAME * 4], tuple(valid), port,
                 txt.get("tls") == "required", txt.get("protocol"), page_port, page_host)
