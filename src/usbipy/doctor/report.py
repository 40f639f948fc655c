"""A check's outcome, and the report of them all: a line each, or JSON."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from ..escape import printable


class Status(Enum):
    OK = "ok"
    WARN = "warning"
    FAIL = "fail"
    INFO = "info"

    @property
    def mark(self) -> str:
        return {"ok": "✔", "warning": "!", "fail": "✘", "info": "·"}[self.value]


@dataclass(frozen=True)
class Check:
    """One thing looked at: what, how it stands, and what to do when it fails."""

    name: str
    status: Status
    detail: str
    fix: str = ""

    def lines(self) -> list[str]:
        """The check as lines of text: only the "\n"s the checks put in break a line;
        every other control, line or paragraph separator (a peer's busid may hold
        any) is escaped, so no peer can forge a line of the report."""
        head, *more = self.detail.split("\n")
        rest = [*more, *self.fix.split("\n")] if self.fix else more
        return [f"{self.status.mark} {printable(self.name)}: {printable(head)}",
                *(f"    {printable(line)}" for line in rest)]

    def as_json(self) -> dict[str, Any]:
        return {"check": self.name, "status": self.status.value, "detail": self.detail,
                "fix": self.fix or None}


@dataclass
class Report:
    checks: list[Check] = field(default_factory=list)

    def add(self, name: str, status: Status, detail: str, fix: str = "") -> Check:
        check = Check(name, status, detail, fix)
        self.checks.append(check)
        return check

    @property
    def passed(self) -> bool:
        """Whether nothing failed (warnings say what may bite later, and pass)."""
        return all(c.status is not Status.FAIL for c in self.checks)

    def text(self) -> str:
        return "\n".join(line for c in self.checks for line in c.lines())

    def as_json(self) -> dict[str, Any]:
        return {"passed": self.passed, "checks": [c.as_json() for c in self.checks]}
