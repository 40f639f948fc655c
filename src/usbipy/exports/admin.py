"""What `usbipy bind`, `unbind` and `list -l` do with export rules, on this machine:
the rules in force (usbipyd's configuration and the store), a rule recorded and
applied to what is plugged in now, a rule removed and its devices given back.

A running usbipyd sees the store change (inotify) and applies it too; with the
C usbipd, or none, what is done here is what happens now, and `usbipyd
--rules-only` applies the rules as devices come and go.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from ..errors import UsbipError
from ..linux import rootdev, sysfs, usbip_host
from .rules import ExportRule, ExportRules, PluggedDevice, Via, parse_device_spec
from .store import RuleStore


@dataclass
class LocalRules:
    """The rules in force here: the configuration's (with its path), the store's."""

    configured: ExportRules
    config: Path | None
    store: RuleStore

    @classmethod
    def read(cls, config: str | None, state: str | None) -> LocalRules:
        """usbipyd's configuration (``config``, or the default file when it exists) and
        the store in ``state`` (or the default state folder). UsbipError for a file
        that cannot be read: one line, naming it."""
        from .. import config as configuration

        path = configuration.config_path(config)
        configured = configuration.file.load(path).exports if path is not None else ExportRules()
        return cls(configured, path, RuleStore(Path(state) if state else None))

    def all(self) -> ExportRules:
        return self.configured + self.store.load().rules

    def rule_for(self, device: PluggedDevice) -> ExportRule | None:
        return self.all().rule_for(device)


def present(*, hubs: bool = False) -> list[PluggedDevice]:
    """Every device plugged in here that could be exported (nothing vhci-hcd attached;
    no hubs, unless ``hubs``: what a rule is checked against)."""
    return [PluggedDevice.of(d) for d in sysfs.usb_devices()
            if not d.on_vhci and (hubs or not d.is_hub)]


def rules_of(rules: ExportRules, busids: Iterable[str]) -> dict[str, str]:
    """busid -> where the rule that exports it is written ("usbipyd.toml line 4"), for
    the devices plugged in here among ``busids`` (sysfs reads: not on the loop)."""
    wanted = set(busids)
    return {device.busid: rule.where or str(rule) for device in present()
            if device.busid in wanted and (rule := rules.rule_for(device)) is not None}


def refuse_protected(rule: ExportRule) -> None:
    """UsbipError if ``rule`` matches a device this machine runs from (it is never
    exported; a rule that names it is a mistake to say now)."""
    protected = rootdev.root_busids()
    for device in present():
        if device.busid in protected and rule.matches(device):
            mount = rootdev.holds(protected[device.busid])
            raise UsbipError(f"{device} holds {mount}, that this machine runs from: it is "
                             "never exported")


def bind_matching(rule: ExportRule, rules: LocalRules) -> list[str]:
    """The devices plugged in now that ``rule`` exports through usbip-host (the first
    rule to match them), bound; their busids. Already bound ones count."""
    bound = []
    everything = rules.all()
    unbound = rules.store.load().unbound
    protected = rootdev.root_busids()
    for device in present():
        if everything.rule_for(device) != rule or unbound.get(device.busid) == device.devnum:
            continue
        if device.busid in protected:
            continue
        if device.driver != usbip_host.DRIVER:
            try:
                usbip_host.bind(device.busid)
            except UsbipError:
                # (a running usbipyd may have bound it meanwhile: that is the same)
                again = sysfs.driver_of(sysfs.usb_devices_dir() / device.busid)
                if again != usbip_host.DRIVER:
                    raise
        bound.append(device.busid)
    return bound


def give_back(rule: ExportRule, rules: LocalRules) -> list[str]:
    """The devices ``rule`` (removed from ``rules``) matched that are bound to
    usbip-host and that no other rule exports through it, unbound and given back
    to their drivers; their busids."""
    given = []
    remaining = rules.all()
    for device in present():
        if not rule.matches(device) or device.driver != usbip_host.DRIVER:
            continue
        still = remaining.rule_for(device)
        if still is not None and still.via is Via.USBIP_HOST:
            continue  # (another rule exports it: its session goes on)
        try:
            usbip_host.unbind(device.busid)
        except UsbipError:
            # (a running usbipyd may have given it back meanwhile: that is the same)
            if sysfs.driver_of(sysfs.usb_devices_dir() / device.busid) == usbip_host.DRIVER:
                raise
        given.append(device.busid)
    return given


def find_recorded(rules: LocalRules, spec: str | None, busid: str | None,
                  via: Via | None = None) -> ExportRule | None:
    """The rule the store holds for ``spec`` (VID:PID[:SERIAL]) or ``busid``."""
    for rule in rules.store.load().rules:
        if via is not None and rule.via is not via:
            continue
        if spec is not None and rule.spec is not None and _same_spec(rule.spec, spec):
            return rule
        if busid is not None and rule.device.busid == (busid,) and rule.spec is None:
            return rule
    return None


def _same_spec(a: str, b: str) -> bool:
    try:
        return parse_device_spec(a) == parse_device_spec(b)
    except ValueError:
        return False


def find_recorded_spec(rule: ExportRule, spec: str) -> bool:
    """Whether ``rule`` is the one `bind --device SPEC` would write."""
    return rule.spec is not None and _same_spec(rule.spec, spec)
