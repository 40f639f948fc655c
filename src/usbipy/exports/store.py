"""The export rules `usbipy bind` records, and the devices an admin unbound by hand:
a small JSON file in the state directory, next to usbipyd's configuration.

usbipyd's own rules are the configuration's [[export]] tables, which an admin
edits and usbipyd reloads on SIGHUP; the command line never rewrites that
file. What `usbipy bind --device` (or `bind --libusb`) asks for is kept here
instead, and usbipyd reads it afresh whenever a device appears and on every
device list, so a running server needs no signal. A device unbound by hand
is recorded with its address (devnum) and this boot's id, and stays unbound
until it is unplugged or plugged in again (a new address), or the machine
restarts, whatever the rules say.

Written atomically: a server reading meanwhile sees the old file or the new.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import UsbipError
from ..policy import DeviceSelector
from ..statedir import state_dir
from .rules import ExportRule, ExportRules, Via

#: Where `usbipy bind --libusb` kept its bindings before there were export rules;
#: read (as rules through libusb) while the new file does not exist.
LEGACY_NAME = "libusb-bindings.json"
NAME = "exports.json"
#: How the file names its rules (as `usbipy list -l` shows them).
WHERE = "usbipy bind"


#: This boot's id (Linux): a hold recorded in another boot is void.
BOOT_ID = Path("/proc/sys/kernel/random/boot_id")


def boot_id() -> str | None:
    try:
        return BOOT_ID.read_text().strip() or None
    except OSError:
        return None


class StoreError(UsbipError):
    """The rules file cannot be read or written, or a change to it cannot be made."""


@dataclass(frozen=True)
class Recorded:
    """What the file says: its rules, and the devices unbound by hand (busid -> devnum)."""

    rules: ExportRules
    unbound: dict[str, int]


def _rule_from(entry: dict[str, Any]) -> ExportRule:
    via = Via(entry.get("via", Via.USBIP_HOST.value))
    return ExportRule(DeviceSelector(
        busid=(entry["busid"],) if entry.get("busid") else (),
        vid_pid=(entry["vid_pid"],) if entry.get("vid_pid") else (),
        serial=(entry["serial"],) if entry.get("serial") else ()), via, where=WHERE)


def _entry_of(rule: ExportRule) -> dict[str, str]:
    d = rule.device
    entry = {"busid": d.busid[0] if d.busid else None,
             "vid_pid": d.vid_pid[0] if d.vid_pid else None,
             "serial": d.serial[0] if d.serial else None,
             "via": rule.via.value}
    return {k: v for k, v in entry.items() if v is not None}


def _legacy_rule(entry: dict[str, Any]) -> ExportRule:
    """A binding of the old file: {"busid"} or {"vid", "pid", "serial"}, via libusb."""
    if entry.get("busid"):
        return _rule_from({"busid": entry["busid"], "via": "libusb"})
    return _rule_from({"vid_pid": f"{int(entry['vid']):04x}:{int(entry['pid']):04x}",
                       "serial": entry.get("serial"), "via": "libusb"})


class RuleStore:
    """The file; reads are cached until it changes."""

    def __init__(self, directory: Path | None = None) -> None:
        where = directory if directory is not None else state_dir()
        self.path = where / NAME
        self.legacy = where / LEGACY_NAME
        self._cache: tuple[object, Recorded] = (None, Recorded(ExportRules(), {}))

    def _stamp(self) -> object:
        for path in (self.path, self.legacy):
            try:
                st = path.stat()
            except FileNotFoundError:
                continue
            return (path, st.st_mtime_ns, st.st_size, st.st_ino)
        return None

    def load(self) -> Recorded:
        stamp = self._stamp()
        if stamp == self._cache[0]:
            return self._cache[1]
        recorded = Recorded(ExportRules(), {})
        if stamp is not None:
            path = stamp[0]  # type: ignore[index]
            try:
                raw = json.loads(Path(path).read_text())
                if path == self.legacy:
                    recorded = Recorded(ExportRules(_legacy_rule(e) for e in raw.get("libusb", [])),
                                        {})
                else:
                    boot = boot_id()
                    # (a hold is for the device as it was plugged in: not after a reboot,
                    # where the same port may well give it the same address again)
                    recorded = Recorded(
                        ExportRules(_rule_from(e) for e in raw.get("export", [])),
                        {str(e["busid"]): int(e["devnum"]) for e in raw.get("unbound", [])
                         if e.get("boot") in (None, boot)})
            except (OSError, ValueError, TypeError, KeyError) as exc:
                raise StoreError(f"cannot read {path}: {exc}") from exc
        self._cache = (stamp, recorded)
        return recorded

    def _save(self, recorded: Recorded) -> None:
        boot = boot_id()
        data = {"export": [_entry_of(rule) for rule in recorded.rules],
                "unbound": [{"busid": busid, "devnum": devnum,
                             **({"boot": boot} if boot is not None else {})}
                            for busid, devnum in sorted(recorded.unbound.items())]}
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".exports-")
            with os.fdopen(fd, "w") as f:
                f.write(json.dumps(data, indent=2) + "\n")
            os.replace(tmp, self.path)
            if self.legacy.exists():  # (its bindings are rules in the new file now)
                self.legacy.unlink()
        except OSError as exc:
            raise StoreError(f"cannot write {self.path}: {exc.strerror or exc}") from exc

    def add(self, rule: ExportRule) -> None:
        recorded = self.load()
        if rule in recorded.rules:
            raise StoreError(f"{_shown(rule)} is already a rule (see 'usbipy list -l')")
        self._save(Recorded(ExportRules((*recorded.rules, rule)), recorded.unbound))

    def remove(self, rule: ExportRule) -> None:
        recorded = self.load()
        if rule not in recorded.rules:
            raise StoreError(f"{_shown(rule)} is not a rule 'usbipy bind' recorded")
        self._save(Recorded(ExportRules(r for r in recorded.rules if r != rule),
                            recorded.unbound))

    def hold(self, busid: str, devnum: int) -> None:
        """The device at ``busid`` (address ``devnum``) was unbound by hand: no rule takes
        it until it is plugged in again."""
        recorded = self.load()
        self._save(Recorded(recorded.rules, {**recorded.unbound, busid: devnum}))

    def release(self, busid: str) -> None:
        """Bound by hand again, or gone: the rules apply to ``busid`` again."""
        recorded = self.load()
        if busid in recorded.unbound:
            self._save(Recorded(recorded.rules,
                                {b: n for b, n in recorded.unbound.items() if b != busid}))


def _shown(rule: ExportRule) -> str:
    what = rule.spec or str(rule.device)
    return f"export {what} via {rule.via.value}"
