"""usbipyd's configuration file: what each key means, and every check of it.

Each key sets what a command-line option sets (the option, when given, wins),
plus what only the file can say: the access policy, the names it gives
devices, and the limits. Every error names the file, the line and the key;
a file with any error is refused whole.

Relative paths in the file are taken from the file's directory.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import ipaddress
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..exports.rules import ExportRule, ExportRules, PluggedDevice, Via
from ..linux import rootdev
from ..netaddr import is_loopback
from ..policy import (
    Action,
    CertificateAuthority,
    ClientSelector,
    DeviceSelector,
    Grant,
    Policy,
    Rule,
)
from ..policy.rules import IPNetwork
from ..usb.classes import UsbClass
from .limits import Limits
from .options import TABLES
from .toml import ConfigError, Document, KeyPath, dotted
from .values import check_choice, check_strings, shown, vid_pid_valid

#: Where usbipyd looks when --config is not given.
DEFAULT_PATH = Path("/etc/usbipy/usbipyd.toml")

_BUSID = re.compile(r"[0-9a-z.*?:\[\]!\-]+", re.IGNORECASE)

#: The tables that are not settings.
_RULE_TABLES = ("names", "policy", "export")
_EXPORT_KEYS = ("busid", "vid_pid", "serial", "name", "interface_class", "via")
_DEVICE_KEYS = ("busid", "vid_pid", "serial", "name")
_CLIENT_KEYS = ("cn", "san", "ca", "network")


@dataclass
class DaemonConfig:
    """What a configuration file says."""

    path: Path | None = None
    #: argparse dest -> value, for the options the file sets.
    options: dict[str, Any] = field(default_factory=dict)
    #: [limits] fields the file sets.
    limits: dict[str, Any] = field(default_factory=dict)
    policy: Policy | None = None
    #: The [[export]] rules, in order.
    exports: ExportRules = field(default_factory=ExportRules)
    #: argparse dest -> "FILE:LINE: key" where the file sets it, for errors found
    #: later (a certificate file that cannot be read, say).
    origins: dict[str, str] = field(default_factory=dict)

    def limits_over(self, base: Limits) -> Limits:
        return dataclasses.replace(base, **self.limits)


def _table(doc: Document, path: KeyPath, value: Any) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise doc.error(path, f"{shown(value)} is not a table")
    return value


def _unknown(doc: Document, path: KeyPath, known: Any) -> ConfigError:
    return doc.error(path, f"unknown key (known: {', '.join(sorted(known))})")


def _selector_fields(doc: Document, path: KeyPath, table: dict[str, Any],
                     known: tuple[str, ...]) -> dict[str, tuple[str, ...]]:
    found: dict[str, tuple[str, ...]] = {}
    for key, value in table.items():
        if key not in known:
            raise _unknown(doc, (*path, key), known)
        found[key] = check_strings(doc, (*path, key), value)
    if not found:
        raise doc.error(path, f"names nothing (give one of {', '.join(known)})")
    return found


def _device_selector(doc: Document, path: KeyPath, value: Any,
                     names: dict[str, DeviceSelector] | None) -> DeviceSelector:
    table = _table(doc, path, value)
    keys = _DEVICE_KEYS if names is not None else _DEVICE_KEYS[:3]
    found = _selector_fields(doc, path, table, keys)
    for pattern in found.get("vid_pid", ()):
        if not vid_pid_valid(pattern):
            raise doc.error((*path, "vid_pid"),
                            f"{pattern!r} is not VID:PID, four hex digits each (wildcards "
                            "* and ?)")
    for pattern in found.get("busid", ()):
        if not _BUSID.fullmatch(pattern):
            raise doc.error((*path, "busid"), f"{pattern!r} is not a busid such as 1-2.3")
    named: list[DeviceSelector] = []
    for pattern in found.get("name", ()):
        hits = [selector for name, selector in (names or {}).items()
                if fnmatch.fnmatchcase(name, pattern)]
        if not hits:
            known = ", ".join(sorted(names or {})) or "none"
            raise doc.error((*path, "name"),
                            f"{pattern!r} matches no name in [names] (known: {known})")
        named += hits
    return DeviceSelector(busid=found.get("busid", ()), vid_pid=found.get("vid_pid", ()),
                          serial=found.get("serial", ()), name=found.get("name", ()),
                          named=tuple(named))


def _network(doc: Document, path: KeyPath, text: str) -> IPNetwork:
    try:
        net = ipaddress.ip_network(text)
    except ValueError as exc:
        raise doc.error(path, f"{text!r} is not a network such as 10.0.0.0/8 ({exc})"
                        ) from None
    mapped = net.network_address.ipv4_mapped if net.version == 6 else None
    if mapped is not None and net.prefixlen >= 96:
        # (clients are compared by their IPv4 address: ::ffff:10.0.0.0/104 is 10.0.0.0/8)
        return ipaddress.IPv4Network((mapped, net.prefixlen - 96))
    return net


def _ca(doc: Document, path: KeyPath, text: str) -> CertificateAuthority:
    file = doc.path.parent / text
    try:
        from cryptography import x509
    except ImportError:
        raise doc.error(path, "a CA rule needs the cryptography package: pip install "
                              "'usbipy[tls]'") from None
    try:
        cert = x509.load_pem_x509_certificate(file.read_bytes())
    except OSError as exc:
        raise doc.error(path, f"{file}: {exc.strerror or exc}") from None
    except ValueError:
        raise doc.error(path, f"{file}: not a PEM certificate") from None
    return CertificateAuthority(str(file), cert)


def _client_selector(doc: Document, path: KeyPath, value: Any) -> ClientSelector:
    found = _selector_fields(doc, path, _table(doc, path, value), _CLIENT_KEYS)
    return ClientSelector(
        cn=found.get("cn", ()), san=found.get("san", ()),
        ca=tuple(_ca(doc, (*path, "ca"), text) for text in found.get("ca", ())),
        network=tuple(_network(doc, (*path, "network"), text)
                      for text in found.get("network", ())))


def _names(doc: Document, value: Any) -> dict[str, DeviceSelector]:
    names: dict[str, DeviceSelector] = {}
    for path, selector in doc.items(("names",), _table(doc, ("names",), value)):
        names[str(path[-1])] = _device_selector(doc, path, selector, None)
    return names


def _policy(doc: Document, value: Any, names: dict[str, DeviceSelector]) -> Policy:
    table = _table(doc, ("policy",), value)
    for key in table:
        if key not in ("default", "rule"):
            raise _unknown(doc, ("policy", key), ("default", "rule"))
    if "default" not in table:
        where: KeyPath = ("policy", "default")
        if doc.line(where) is None:  # ([[policy.rule]] with no [policy] header)
            where = ("policy", "rule", 0)
        raise ConfigError(f"{doc.where(where)}: policy.default: missing: say \"allow\" or "
                          '"deny" (what a client gets for a device no rule matches)')
    default = Action(check_choice("allow", "deny")(doc, ("policy", "default"),
                                                  table["default"]))
    rules_value = table.get("rule", [])
    if not isinstance(rules_value, list):
        raise doc.error(("policy", "rule"), "is not a list of rules: write [[policy.rule]]")
    rules: list[Rule] = []
    for index, rule_value in enumerate(rules_value):
        path: KeyPath = ("policy", "rule", index)
        rule = _table(doc, path, rule_value)
        for key in rule:
            if key not in ("action", "grant", "device", "client"):
                raise _unknown(doc, (*path, key), ("action", "grant", "device", "client"))
        if "action" not in rule and "grant" not in rule:
            raise doc.error(path, 'action: missing: say "allow" or "deny" (or grant "view" '
                                  'or "admin" of the status page)')
        action = (Action(check_choice("allow", "deny")(doc, (*path, "action"), rule["action"]))
                  if "action" in rule else None)
        grant = (Grant[check_choice("view", "admin")(doc, (*path, "grant"),
                                                     rule["grant"]).upper()]
                 if "grant" in rule else None)
        if "device" not in rule and "client" not in rule:
            raise doc.error(path, "names no device and no client (a rule for every client "
                                  "and device is policy.default)")
        device = (_device_selector(doc, (*path, "device"), rule["device"], names)
                  if "device" in rule else DeviceSelector())
        client = (_client_selector(doc, (*path, "client"), rule["client"])
                  if "client" in rule else ClientSelector())
        rules.append(Rule(action, device, client, where=doc.where(path).replace(
            f"{doc.path}:", f"{doc.path.name} line "), number=index + 1, grant=grant))
    default_where = doc.where(("policy", "default")).replace(
        f"{doc.path}:", f"{doc.path.name} line ")
    return Policy(tuple(rules), default, f"the default ({default.value}, {default_where})")


def _interface_classes(doc: Document, path: KeyPath, value: Any) -> tuple[int, ...]:
    values = value if isinstance(value, list) else [value]
    classes = []
    for item in values:
        if isinstance(item, bool) or not isinstance(item, int) or not 0 <= item <= 0xFF:
            raise doc.error(path, f"{shown(item)} is not a class code, 0 to 255 (0x08: mass "
                                  "storage, 0xff: vendor specific)")
        if item == UsbClass.HUB:
            raise doc.error(path, "0x09 is the hub class: a hub cannot be exported (its "
                                  "devices can)")
        classes.append(item)
    if not classes:
        raise doc.error(path, "is empty")
    return tuple(classes)


def _exports(doc: Document, value: Any, names: dict[str, DeviceSelector],
             present: Sequence[PluggedDevice], protected: Mapping[str, str]) -> ExportRules:
    if not isinstance(value, list):
        raise doc.error(("export",), "is not a list of rules: write [[export]]")
    rules = []
    for index, item in enumerate(value):
        path: KeyPath = ("export", index)
        table = _table(doc, path, item)
        for key in table:
            if key not in _EXPORT_KEYS:
                raise _unknown(doc, (*path, key), _EXPORT_KEYS)
        device_fields = {k: v for k, v in table.items() if k in _DEVICE_KEYS}
        classes = (_interface_classes(doc, (*path, "interface_class"), table["interface_class"])
                   if "interface_class" in table else ())
        if not device_fields and not classes:
            raise doc.error(path, "names no device (give busid, vid_pid, serial, name or "
                                  "interface_class)")
        device = (_device_selector(doc, path, device_fields, names) if device_fields
                  else DeviceSelector())
        via = Via(check_choice(*(v.value for v in Via))(
            doc, (*path, "via"), table.get("via", Via.USBIP_HOST.value)))
        rule = ExportRule(device, via, classes,
                          where=doc.where(path).replace(f"{doc.path}:", f"{doc.path.name} line "))
        for device_now in present:
            if not rule.matches(device_now):
                continue
            if device_now.is_hub:
                raise doc.error(path, f"would export the hub at {device_now}: a hub cannot "
                                      "be exported (name its devices, not the hub)")
            if device_now.busid in protected:
                raise doc.error(path, f"would export {device_now}, which holds "
                                      f"{rootdev.holds(protected[device_now.busid])}, that "
                                      "this machine runs from")
        rules.append(rule)
    return ExportRules(rules)


def present_devices() -> tuple[list[PluggedDevice], dict[str, str]]:
    """What is plugged in here (every USB device, hubs too), and the devices that hold
    the file systems this machine runs from: what [[export]] rules are checked
    against."""
    from ..exports.admin import present

    return present(hubs=True), rootdev.root_busids()


def warnings(policy: Policy, tls: bool, *, written: bool,
             http: tuple[str, int] | None = None) -> list[str]:
    """What a policy (``written`` in a file, or none) lets through or can never match;
    ``http``: where the status listener is (its grant rules' only use)."""
    found = []
    grants = [rule for rule in policy.rules if rule.grant is not None]
    on_network = http is not None and not is_loopback(http[0])
    if grants and not on_network:
        found.append(f"{grants[0]} grants the status page, which is served on loopback "
                     "only, to every local user (or not at all): grant rules apply to "
                     "[diagnostics] http on an address other than loopback")
    if on_network and not grants:
        found.append("the status page is on the network and no rule grants it: every "
                     "client gets 403 (add grant = \"view\" or \"admin\" to a policy rule)")
    if tls and not written:
        found.append("mutual TLS and no [policy] in a configuration file: every client whose "
                     "certificate the CA signed may list and import every device")
    if not tls:
        for rule in policy.rules:
            client = rule.client
            if client.cn or client.san or client.ca:
                found.append(f"{rule} names a certificate, but TLS is not configured "
                             "here: it matches no client unless --tls-cert/--tls-key/"
                             "--tls-ca are given")
    return found


def parse(doc: Document) -> DaemonConfig:
    """Check every key of ``doc``; ConfigError for the first thing wrong."""
    config = DaemonConfig(path=doc.path)
    data = doc.data
    names: dict[str, DeviceSelector] = {}
    if "names" in data:
        names = _names(doc, data["names"])
    top = TABLES[""]
    for key, value in data.items():
        if key in top:
            setting = top[key]
            assert setting.kind is not None
            config.options[setting.dest] = setting.kind.check(doc, (key,), value)
            config.origins[setting.dest] = f"{doc.where((key,))}: {key}"
        elif key and key in TABLES:  # (not "": that is the top, with its own keys)
            for path, item in doc.items((key,), _table(doc, (key,), value)):
                setting = TABLES[key].get(str(path[-1]))  # type: ignore[assignment]
                if setting is None:
                    raise _unknown(doc, path, TABLES[key])
                assert setting.kind is not None
                checked = setting.kind.check(doc, path, item)
                if key == "limits":
                    config.limits[setting.dest] = checked
                else:
                    config.options[setting.dest] = checked
                    config.origins[setting.dest] = f"{doc.where(path)}: {dotted(path)}"
        elif key == "policy":
            config.policy = _policy(doc, value, names)
        elif key == "export":
            config.exports = _exports(doc, value, names, *present_devices())
        elif key != "names":
            raise _unknown(doc, (key,), [*top, *(t for t in TABLES if t), *_RULE_TABLES])
    return config


def load(path: str | Path) -> DaemonConfig:
    """Read and check the file at ``path``."""
    return parse(Document.read(path))


__all__ = ["DEFAULT_PATH", "ConfigError", "DaemonConfig", "dotted", "load", "parse"]
