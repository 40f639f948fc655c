"""Access policy: which client may list and import which device."""

from .rules import (
    OPEN,
    Action,
    CertificateAuthority,
    Client,
    ClientSelector,
    Decision,
    DeviceFacts,
    DeviceSelector,
    Grant,
    Policy,
    Rule,
    parse_address,
)

__all__ = [
    "OPEN",
    "Action",
    "CertificateAuthority",
    "Client",
    "ClientSelector",
    "Decision",
    "DeviceFacts",
    "DeviceSelector",
    "Grant",
    "Policy",
    "Rule",
    "parse_address",
]
