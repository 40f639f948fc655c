"""Who may use which device: rules tried first to last, then a default.

A rule pairs what it says of a device (busid, VID:PID, serial, or a name the
configuration gives devices) with what it says of a client (the certificate's
CN or a subjectAltName, the CA that issued it, the network it comes from) and
allows or denies. Within one field any listed pattern may match; across
fields all must. A rule without a device part applies to every device, one
without a client part to every client. The first rule that matches decides;
when none does, the default does.

Pure: no I/O, no event loop. The server asks :meth:`Policy.decide` for every
device a client lists or imports, and again for every session on a reload.
"""

from __future__ import annotations

import enum
import fnmatch
import ipaddress
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

from ..escape import printable

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


class Action(enum.Enum):
    ALLOW = "allow"
    DENY = "deny"


class Grant(enum.IntEnum):
    """What a client may do on usbipyd's HTTP listener (the status API and page):
    ``view`` a device's state, or also, as ``admin``, release it from its client."""

    VIEW = 1
    ADMIN = 2

    @property
    def word(self) -> str:
        return self.name.lower()


@dataclass(frozen=True)
class DeviceFacts:
    """What a rule can know about a device."""

    busid: str
    vendor: int
    product: int
    serial: str | None = None

    @property
    def vid_pid(self) -> str:
        return f"{self.vendor:04x}:{self.product:04x}"


class Client:
    """What a rule can know about a client: its address and, over TLS, its
    verified certificate."""

    def __init__(self, address: str | None = None, *, cn: str | None = None,
                 sans: tuple[str, ...] = (), certificate: bytes | None = None) -> None:
        self.address = parse_address(address) if address else None
        #: The subject's commonName, raw (match with it, print :attr:`name`).
        self.cn = cn
        #: subjectAltName values (DNS names, addresses, e-mail addresses, URIs).
        self.sans = sans
        #: The certificate (DER): a CA rule checks its signature.
        self.certificate = certificate
        #: CA rule's file -> whether that CA signed the certificate (each checked once
        #: per client, not per device of every list).
        self.issued_by: dict[str, bool] = {}

    @property
    def name(self) -> str:
        """How logs name the client: "CN=alice from 10.0.0.5", escaped."""
        who = f"CN={printable(self.cn)}" if self.cn is not None else (
            f"SAN={printable(self.sans[0])}" if self.sans else "")
        where = str(self.address) if self.address is not None else ""
        if who and where:
            return f"{who} from {where}"
        return who or where or "a client"

    @cached_property
    def x509(self) -> Any:
        """The certificate as a cryptography ``x509.Certificate``, or None."""
        if self.certificate is None:
            return None
        from cryptography import x509  # (only CA rules need it: an optional dependency)

        try:  # (OpenSSL verified it; cryptography may still find it malformed)
            return x509.load_der_x509_certificate(self.certificate)
        except ValueError:
            return None


def parse_address(text: str) -> IPAddress:
    """An address as rules compare it: an IPv4-mapped IPv6 address is its IPv4 one."""
    address = ipaddress.ip_address(text.split("%", 1)[0])
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def _matches(patterns: tuple[str, ...], value: str | None, *, fold: bool = False) -> bool:
    if value is None:
        return False
    if fold:
        value = value.lower()
        return any(fnmatch.fnmatchcase(value, p.lower()) for p in patterns)
    return any(fnmatch.fnmatchcase(value, p) for p in patterns)


@dataclass(frozen=True)
class DeviceSelector:
    """The device part of a rule or of a name: every given field must match."""

    busid: tuple[str, ...] = ()
    vid_pid: tuple[str, ...] = ()
    serial: tuple[str, ...] = ()
    #: Patterns of names given in the configuration's [names].
    name: tuple[str, ...] = ()
    #: The selectors of the names ``name`` matches, resolved when loading.
    named: tuple[DeviceSelector, ...] = ()

    def matches(self, device: DeviceFacts) -> bool:
        if self.busid and not _matches(self.busid, device.busid):
            return False
        if self.vid_pid and not _matches(self.vid_pid, device.vid_pid, fold=True):
            return False
        if self.serial and not _matches(self.serial, device.serial):
            return False
        return not self.name or any(s.matches(device) for s in self.named)

    @property
    def empty(self) -> bool:
        return not (self.busid or self.vid_pid or self.serial or self.name)

    def __str__(self) -> str:
        return _describe(("busid", self.busid), ("vid_pid", self.vid_pid),
                         ("serial", self.serial), ("name", self.name))


@dataclass(frozen=True)
class CertificateAuthority:
    """A CA a rule names: it matches a client whose certificate its key signed."""

    path: str
    #: The CA's certificate (a cryptography ``x509.Certificate``).
    certificate: Any = field(compare=False)

    def issued(self, client: Client) -> bool:
        known = client.issued_by.get(self.path)
        if known is None:
            known = client.issued_by[self.path] = self._verify(client.x509)
        return known

    def _verify(self, cert: Any) -> bool:
        if cert is None:
            return False
        # Names prove nothing (two CAs may share one, and a certificate need not
        # carry an AuthorityKeyIdentifier): only this CA's key verifying the
        # certificate's signature says that this CA issued it.
        from cryptography.exceptions import InvalidSignature

        try:
            cert.verify_directly_issued_by(self.certificate)
        except (ValueError, TypeError, InvalidSignature):
            return False
        return True


@dataclass(frozen=True)
class ClientSelector:
    """The client part of a rule: every given field must match."""

    cn: tuple[str, ...] = ()
    san: tuple[str, ...] = ()
    ca: tuple[CertificateAuthority, ...] = ()
    network: tuple[IPNetwork, ...] = ()

    def matches(self, client: Client) -> bool:
        if self.cn and not _matches(self.cn, client.cn):
            return False
        # (DNS names and e-mail domains are case-insensitive)
        if self.san and not any(_matches(self.san, san, fold=True) for san in client.sans):
            return False
        if self.ca and not any(ca.issued(client) for ca in self.ca):
            return False
        address = client.address
        return not self.network or (
            address is not None and any(address in net for net in self.network))

    @property
    def empty(self) -> bool:
        return not (self.cn or self.san or self.ca or self.network)

    def __str__(self) -> str:
        return _describe(("cn", self.cn), ("san", self.san),
                         ("ca", tuple(ca.path for ca in self.ca)),
                         ("network", tuple(str(n) for n in self.network)))


def _describe(*fields: tuple[str, tuple[str, ...]]) -> str:
    parts = []
    for key, values in fields:
        if values:
            shown = values[0] if len(values) == 1 else "|".join(values)
            parts.append(f"{key}={printable(shown)}")
    return " ".join(parts)


@dataclass(frozen=True)
class Rule:
    #: Whether the client may use the device; None: a rule that only grants.
    action: Action | None
    device: DeviceSelector = field(default_factory=DeviceSelector)
    client: ClientSelector = field(default_factory=ClientSelector)
    #: Where it is written ("usbipyd.toml line 27"), for the logs.
    where: str = ""
    #: 1-based position in the policy.
    number: int = 0
    #: What the client may do with the device on the HTTP listener; None: nothing.
    grant: Grant | None = None

    def matches(self, client: Client, device: DeviceFacts) -> bool:
        return self.device.matches(device) and self.client.matches(client)

    def __str__(self) -> str:
        said = " ".join(part for part in (
            self.action.value if self.action is not None else "",
            f"grant {self.grant.word}" if self.grant is not None else "",
            f"client {self.client}" if not self.client.empty else "",
            f"device {self.device}" if not self.device.empty else "") if part)
        where = f", {self.where}" if self.where else ""
        return f"rule {self.number} ({said}{where})"


@dataclass(frozen=True)
class Decision:
    action: Action
    #: The rule that decided, or None for the default.
    rule: Rule | None
    #: What decided, for a log line: "rule 2 (allow client cn=alice, ...)".
    reason: str

    @property
    def allowed(self) -> bool:
        return self.action is Action.ALLOW


@dataclass(frozen=True)
class Policy:
    """Rules, first match wins, then ``default``."""

    rules: tuple[Rule, ...] = ()
    default: Action = Action.ALLOW
    #: How the default came to be, for the logs: "the default (usbipyd.toml line 4)".
    default_reason: str = "no access policy"

    def decide(self, client: Client, device: DeviceFacts) -> Decision:
        for rule in self.rules:
            if rule.action is not None and rule.matches(client, device):
                return Decision(rule.action, rule, str(rule))
        return Decision(self.default, None, self.default_reason)

    def grant(self, client: Client, device: DeviceFacts) -> Grant | None:
        """What ``client`` may do with ``device`` on the HTTP listener: the first rule
        that grants and matches says; no such rule, nothing. (A rule that only allows
        grants nothing: using a device is not watching who else uses it.)"""
        for rule in self.rules:
            if rule.grant is not None and rule.matches(client, device):
                return rule.grant
        return None

    def grants_anything(self, client: Client) -> bool:
        """Whether some rule grants ``client`` something, on some device."""
        return any(rule.grant is not None and rule.client.matches(client)
                   for rule in self.rules)

    def grants_everything(self, client: Client) -> bool:
        """Whether a rule with no device part grants ``client`` something: then every
        device is granted it (grants add up to seeing; none takes one away)."""
        return any(rule.grant is not None and rule.device.empty and rule.client.matches(client)
                   for rule in self.rules)

    @property
    def open(self) -> bool:
        """Every client may use every device."""
        return not any(rule.action is not None for rule in self.rules) and (
            self.default is Action.ALLOW)


#: Every client may use every device: what a server without a policy does.
OPEN = Policy()

