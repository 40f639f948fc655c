"""The settings in force: the configuration file's, with the options given over it."""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..exports.rules import ExportRules
from ..policy import OPEN, Policy
from ..tls import TlsError, TlsFiles
from . import file as config_file
from .file import DaemonConfig, warnings
from .limits import Limits
from .options import DEFAULTS, LIMIT_SETTINGS


@dataclass
class Settings:
    """The configuration in force: the file's, with the options given over it."""

    file: Path | None
    #: Every setting but the limits, by its dest (argparse's names).
    options: argparse.Namespace
    limits: Limits
    policy: Policy
    warnings: list[str]
    #: dest -> "FILE:LINE: key", for the options whose value is the file's.
    origins: dict[str, str] = dataclasses.field(default_factory=dict)
    #: What the command line gave (dest -> value; None: not given), kept for a
    #: reload, where it wins over the file again.
    given: dict[str, Any] = dataclasses.field(default_factory=dict)
    #: The file's [[export]] rules.
    exports: ExportRules = dataclasses.field(default_factory=ExportRules)


def config_path(named: str | None) -> Path | None:
    """The file to read: the one named (--config), else the default one when it exists."""
    if named is not None:
        return Path(named)
    default = config_file.DEFAULT_PATH
    return default if default.exists() else None


def read_settings(path: Path | None, given: Mapping[str, Any] | None = None) -> Settings:
    """The file at ``path`` (None: no file) with ``given`` (dest -> value, None for
    an option not given) over it; UsbipError for anything wrong."""
    given = {dest: value for dest, value in (given or {}).items() if value is not None}
    config = config_file.load(path) if path is not None else DaemonConfig()
    options = dict(DEFAULTS)
    options.update(config.options)
    options.update({dest: value for dest, value in given.items() if dest in DEFAULTS})
    # (the file and the options together: each may give a part)
    try:
        tls = TlsFiles.from_options(options["tls_cert"], options["tls_key"],
                                    options["tls_ca"])
    except TlsError as exc:
        if path is None:
            raise
        raise TlsError(f"{exc} ([tls] cert, key and ca in {path})") from None
    limits = dataclasses.replace(config.limits_over(Limits()), **{
        s.dest: given[s.dest] for s in LIMIT_SETTINGS if s.dest in given})
    policy = config.policy if config.policy is not None else OPEN
    origins = {dest: where for dest, where in config.origins.items() if dest not in given}
    return Settings(path, argparse.Namespace(**options), limits, policy,
                    warnings(policy, tls is not None, written=config.policy is not None,
                             http=options.get("http") or options.get("metrics")),
                    origins, given, config.exports)


def describe(settings: Settings) -> list[str]:
    """The policy and limits in words: what --check-config says, and the server
    logs at start and at a reload."""
    lines = []
    policy = settings.policy
    if policy.open and policy.default_reason == OPEN.default_reason:
        lines.append("access policy: none: every client may list and import every device")
    else:
        n = len(policy.rules)
        lines.append(f"access policy: {n} rule{'' if n == 1 else 's'}, then "
                     f"{policy.default_reason}")
        lines += [f"  {rule}" for rule in policy.rules]
    if len(settings.exports):
        n = len(settings.exports)
        lines.append(f"export rules: {n} in the configuration file (and what 'usbipy bind' "
                     "recorded)")
        lines += [f"  {rule}" for rule in settings.exports]
    limits = settings.limits
    lines.append(
        f"limits: {limits.max_connections} connections, {limits.max_connections_per_address} "
        f"per address, {limits.accept_rate:g} new a second per address (bursts of "
        f"{limits.accept_burst}); a request within {limits.request_timeout:g} s, "
        f"silence at most {limits.idle_timeout:g} s; a peer silent for "
        f"{limits.dead_peer_timeout:g} s is dead")
    return lines
