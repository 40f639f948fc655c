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
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from ..policy import (
    Action,
    CertificateAuthority,
    ClientSelector,
    DeviceSelector,
    Policy,
    Rule,
)
from ..policy.rules import IPNetwork
from ..server.limits import Limits
from .toml import ConfigError, Document, KeyPath, dotted

#: Where usbipyd looks when --config is not given.
DEFAULT_PATH = Path("/etc/usbipy/usbipyd.toml")

#: Four hex digits a side (as devices are compared: "046d:c52b"), or a pattern with a
#: wildcard (* ? [...]); "46d:c52b" would never match anything.
_HEX4 = re.compile(r"[0-9a-f]{4}", re.IGNORECASE)
_ID_PATTERN = re.compile(r"[0-9a-f*?\[\]!-]+", re.IGNORECASE)
_BUSID = re.compile(r"[0-9a-z.*?:\[\]!\-]+", re.IGNORECASE)

#: The ranges a value may take, in the file and as an option.
PORTS = (0, 65535)
COUNTS = (1, 1 << 20)
DISK_SIZES = (512, 1 << 50)
#: A capture file's size in MB, and how many files the ring keeps.
CAPTURE_SIZES = (1, 1 << 20)
CAPTURE_FILES = (1, 1000)
MAX_SECONDS = 3600.0
MAX_RATE = 1e6


def vid_pid_valid(pattern: str) -> bool:
    sides = pattern.split(":")
    return len(sides) == 2 and all(
        _HEX4.fullmatch(side) or (any(c in side for c in "*?[") and _ID_PATTERN.fullmatch(side))
        for side in sides)


@dataclass(frozen=True)
class _Option:
    """A key that sets what a usbipyd option sets (``dest`` in argparse)."""

    dest: str
    check: Callable[[Document, KeyPath, Any], Any]


def _string(doc: Document, path: KeyPath, value: Any) -> str:
    if not isinstance(value, str):
        raise doc.error(path, f"{_shown(value)} is not a string")
    if not value:
        raise doc.error(path, "empty")
    return value


def _file(doc: Document, path: KeyPath, value: Any) -> str:
    return str(doc.path.parent / _string(doc, path, value))



def _bool(doc: Document, path: KeyPath, value: Any) -> bool:
    if not isinstance(value, bool):
        raise doc.error(path, f"{_shown(value)} is not true or false")
    return value


def _int(low: int, high: int) -> Callable[[Document, KeyPath, Any], int]:
    def check(doc: Document, path: KeyPath, value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise doc.error(path, f"{_shown(value)} is not a whole number")
        if not low <= value <= high:
            raise doc.error(path, f"{value} is out of range ({low} to {high})")
        return value
    return check


def _seconds(high: float) -> Callable[[Document, KeyPath, Any], float]:
    def check(doc: Document, path: KeyPath, value: Any) -> float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise doc.error(path, f"{_shown(value)} is not a number of seconds")
        if not 0 < value <= high:
            raise doc.error(path, f"{value:g} is out of range (more than 0, at most {high:g})")
        return float(value)
    return check


def _hertz(doc: Document, path: KeyPath, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value <= 20000:
        raise doc.error(path, f"{_shown(value)} is not a frequency of 20000 Hz or less")
    return float(value)


def _rate(doc: Document, path: KeyPath, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
        raise doc.error(path, f"{_shown(value)} is not a positive number")
    if not value <= MAX_RATE:
        raise doc.error(path, f"{value:g} is out of range (at most {MAX_RATE:g})")
    return float(value)


def _choice(*choices: str) -> Callable[[Document, KeyPath, Any], str]:
    def check(doc: Document, path: KeyPath, value: Any) -> str:
        if value not in choices:
            raise doc.error(path, f"{_shown(value)} is not one of {', '.join(choices)}")
        return str(value)
    return check


def _strings(doc: Document, path: KeyPath, value: Any) -> tuple[str, ...]:
    """A string or a list of strings, none empty."""
    values = value if isinstance(value, list) else [value]
    if not values:
        raise doc.error(path, "an empty list")
    return tuple(_string(doc, path, v) for v in values)


def host_port(text: str, default_host: str = "127.0.0.1") -> tuple[str, int]:
    """``ADDR:PORT``, ``[V6ADDR]:PORT`` or ``PORT`` (on ``default_host``); ValueError
    naming what is wrong (argparse shows it as the option's error)."""
    host, port_text = default_host, text
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        if not rest.startswith(":"):
            raise ValueError(f"{text!r}: expected [ADDRESS]:PORT")
        port_text = rest[1:]
    elif ":" in text:
        if text.count(":") > 1:
            raise ValueError(f"{text!r}: write an IPv6 address in brackets: [ADDRESS]:PORT")
        host, _, port_text = text.partition(":")
        host = host or default_host
    if not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise ValueError(f"{text!r}: the port must be a number from 0 to 65535")
    return host, int(port_text)


def _host_port(doc: Document, path: KeyPath, value: Any) -> tuple[str, int]:
    if isinstance(value, int) and not isinstance(value, bool):  # (metrics = 9240)
        value = str(value)
    text = _string(doc, path, value)
    try:
        return host_port(text)
    except ValueError as exc:
        raise doc.error(path, str(exc)) from None


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def key_of(dest: str) -> str:
    """The file's key for an option's ``dest``: "listen" for "address", "tls.cert"..."""
    for table, options in OPTIONS.items():
        for key, option in options.items():
            if option.dest == dest:
                return f"{table}.{key}" if table else key
    return dest


#: Keys at the top of the file and in [devices] and [tls], and the option each sets.
OPTIONS: dict[str, dict[str, _Option]] = {
    "": {
        "listen": _Option("address", lambda d, p, v: list(_strings(d, p, v))),
        "port": _Option("tcp_port", _int(*PORTS)),
        "family": _Option("family", _choice("any", "ipv4", "ipv6")),
        "state_dir": _Option("state_dir", _file),
        "usbip_host": _Option("usbip_host", _bool),
        "libusb": _Option("libusb", _bool),
        "loop": _Option("loop", _choice("auto", "asyncio", "uvloop")),
        "debug": _Option("debug", _bool),
        "pid_file": _Option("pid", _file),
    },
    "devices": {
        "demo": _Option("demo", _bool),
        "disk": _Option("disk", _file),
        "read_only": _Option("read_only", _bool),
        "disk_size": _Option("disk_size", _int(*DISK_SIZES)),
        "serial": _Option("serial", _choice("echo", "pty")),
        "audio": _Option("audio", _bool),
        "tone": _Option("tone", _hertz),
        "microphone": _Option("microphone", _file),
        "speaker": _Option("speaker", _file),
        "webcam": _Option("webcam", _choice("iso", "bulk")),
    },
    "diagnostics": {
        "capture": _Option("capture", _file),
        "capture_size": _Option("capture_size", _int(*CAPTURE_SIZES)),
        "capture_files": _Option("capture_files", _int(*CAPTURE_FILES)),
        "metrics": _Option("metrics", _host_port),
    },
    "tls": {
        "cert": _Option("tls_cert", _file),
        "key": _Option("tls_key", _file),
        "ca": _Option("tls_ca", _file),
        "ktls": _Option("ktls", _choice("auto", "on", "off")),
        "handshake_timeout": _Option("tls_handshake_timeout", _seconds(MAX_SECONDS)),
        "plaintext_port": _Option("plaintext_port", _int(*PORTS)),
    },
}

#: [limits] keys: Limits fields, and their checks.
LIMIT_CHECKS: dict[str, Callable[[Document, KeyPath, Any], Any]] = {
    "max_connections": _int(*COUNTS),
    "max_connections_per_address": _int(*COUNTS),
    "accept_rate": _rate,
    "accept_burst": _int(*COUNTS),
    "request_timeout": _seconds(MAX_SECONDS),
    "idle_timeout": _seconds(MAX_SECONDS),
    "dead_peer_timeout": _seconds(MAX_SECONDS),
}
assert set(LIMIT_CHECKS) == {f.name for f in fields(Limits)}

_TABLES = ("devices", "diagnostics", "tls", "limits", "names", "policy")
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
    #: argparse dest -> "FILE:LINE: key" where the file sets it, for errors found
    #: later (a certificate file that cannot be read, say).
    origins: dict[str, str] = field(default_factory=dict)

    def limits_over(self, base: Limits) -> Limits:
        return dataclasses.replace(base, **self.limits)


def _table(doc: Document, path: KeyPath, value: Any) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise doc.error(path, f"{_shown(value)} is not a table")
    return value


def _unknown(doc: Document, path: KeyPath, known: Any) -> ConfigError:
    return doc.error(path, f"unknown key (known: {', '.join(sorted(known))})")


def _selector_fields(doc: Document, path: KeyPath, table: dict[str, Any],
                     known: tuple[str, ...]) -> dict[str, tuple[str, ...]]:
    found: dict[str, tuple[str, ...]] = {}
    for key, value in table.items():
        if key not in known:
            raise _unknown(doc, (*path, key), known)
        found[key] = _strings(doc, (*path, key), value)
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
    default = Action(_choice("allow", "deny")(doc, ("policy", "default"), table["default"]))
    rules_value = table.get("rule", [])
    if not isinstance(rules_value, list):
        raise doc.error(("policy", "rule"), "is not a list of rules: write [[policy.rule]]")
    rules: list[Rule] = []
    for index, rule_value in enumerate(rules_value):
        path: KeyPath = ("policy", "rule", index)
        rule = _table(doc, path, rule_value)
        for key in rule:
            if key not in ("action", "device", "client"):
                raise _unknown(doc, (*path, key), ("action", "device", "client"))
        if "action" not in rule:
            raise doc.error(path, 'action: missing: say "allow" or "deny"')
        action = Action(_choice("allow", "deny")(doc, (*path, "action"), rule["action"]))
        if "device" not in rule and "client" not in rule:
            raise doc.error(path, "names no device and no client (a rule for every client "
                                  "and device is policy.default)")
        device = (_device_selector(doc, (*path, "device"), rule["device"], names)
                  if "device" in rule else DeviceSelector())
        client = (_client_selector(doc, (*path, "client"), rule["client"])
                  if "client" in rule else ClientSelector())
        rules.append(Rule(action, device, client, where=doc.where(path).replace(
            f"{doc.path}:", f"{doc.path.name} line "), number=index + 1))
    default_where = doc.where(("policy", "default")).replace(
        f"{doc.path}:", f"{doc.path.name} line ")
    return Policy(tuple(rules), default, f"the default ({default.value}, {default_where})")


def warnings(policy: Policy, tls: bool, *, written: bool) -> list[str]:
    """What a policy (``written`` in a file, or none) lets through or can never match."""
    found = []
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
    for key, value in data.items():
        top = OPTIONS[""].get(key)
        if top is not None:
            config.options[top.dest] = top.check(doc, (key,), value)
        elif key in ("devices", "diagnostics", "tls"):
            for path, item in doc.items((key,), _table(doc, (key,), value)):
                option = OPTIONS[key].get(str(path[-1]))
                if option is None:
                    raise _unknown(doc, path, OPTIONS[key])
                config.options[option.dest] = option.check(doc, path, item)
                config.origins[option.dest] = f"{doc.where(path)}: {dotted(path)}"
        elif key == "limits":
            for path, item in doc.items((key,), _table(doc, (key,), value)):
                check = LIMIT_CHECKS.get(str(path[-1]))
                if check is None:
                    raise _unknown(doc, path, LIMIT_CHECKS)
                config.limits[str(path[-1])] = check(doc, path, item)
        elif key == "policy":
            config.policy = _policy(doc, value, names)
        elif key != "names":
            raise _unknown(doc, (key,), [*OPTIONS[""], *_TABLES])
    return config


def load(path: str | Path) -> DaemonConfig:
    """Read and check the file at ``path``."""
    return parse(Document.read(path))


__all__ = ["DEFAULT_PATH", "ConfigError", "DaemonConfig", "dotted", "load", "parse"]
