"""The server's access decisions: the policy in force, asked about real devices.

One :class:`Access` per server, shared by its connections; a reload swaps
its policy and limits, and every later request sees the new ones.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from ..backends.base import AnyDevice
from ..config.limits import Limits
from ..policy import OPEN, Client, Decision, DeviceFacts, Policy
from ..tls import TlsSession
from .limits import Admission, RateLimitedLog
from .resume import Resumables


def facts_of(device: AnyDevice) -> DeviceFacts:
    info = device.info
    return DeviceFacts(device.busid, info.idVendor, info.idProduct, device.serial)


def client_of(host: str | None, tls: TlsSession | None) -> Client:
    """The client a policy judges: its address and, over TLS, its certificate."""
    try:
        if tls is None:
            return Client(host)
        return Client(host, cn=tls.cn, sans=tls.sans, certificate=tls.certificate)
    except ValueError:  # (not an IP address: a Unix socket in a test, say)
        if tls is None:
            return Client()
        return Client(cn=tls.cn, sans=tls.sans, certificate=tls.certificate)


@dataclass
class HandedOff:
    """A device this server handed to the kernel, and whom for."""

    device: AnyDevice
    client: Client
    peer: str
    #: Until the kernel has taken the socket (the import decides it then).
    pending: bool = False
    #: Whether TLS (kernel TLS, here) protects the session.
    protected: bool = False
    #: When it was handed off (time.time()).
    since: float = field(default_factory=time.time)


@dataclass
class Access:
    policy: Policy = OPEN
    limits: Limits = field(default_factory=Limits)
    admission: Admission = field(init=False)
    #: busid -> the last session this server handed to the kernel for it.
    handed_off: dict[str, HandedOff] = field(default_factory=dict)
    #: For what a flood would otherwise write once per connection.
    log: RateLimitedLog = field(default_factory=RateLimitedLog)
    #: The attachments a client may resume on a new connection.
    resumables: Resumables = field(default_factory=Resumables)

    #: Changed by every reconfigure: an import begun under an older policy is
    #: decided again before it is answered.
    generation: int = 0

    def __post_init__(self) -> None:
        self.admission = Admission(self.limits, self.log)

    def reconfigure(self, policy: Policy, limits: Limits) -> None:
        self.policy = policy
        self.limits = self.admission.limits = limits
        self.generation += 1

    def decide(self, client: Client, device: AnyDevice) -> Decision:
        return self.policy.decide(client, facts_of(device))
