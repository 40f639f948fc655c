"""The USB/IP state machine, as data: (role, phase, message) -> next phase.

One table for both roles and both directions. Every message kind has one
sender (``SENDER``); a connection that sends or receives a message looks the
move up here, and a move the table lacks is a protocol error that names the
role, the phase and the message::

    OP --OP_REQ_DEVLIST--> DEVLIST --OP_REP_DEVLIST--> CLOSED
    OP --OP_REQ_IMPORT---> IMPORT  --OP_REP_IMPORT(OK)--> URB
                                   --OP_REP_IMPORT(error)--> CLOSED
    URB --CMD_SUBMIT, CMD_UNLINK, RET_SUBMIT, RET_UNLINK--> URB
    OP --OP_REQ_RESUME---> RESUME  --OP_REP_RESUME(OK)--> RESUMED
                                   --OP_REP_RESUME(error)--> CLOSED

OP_REQ/REP_RESUME are usbipy's (:mod:`.resume`): after OP_REP_RESUME(OK) the
connection carries the frames of a resumable stream, whose payload continues
the USB/IP stream of an earlier connection; this connection has no messages
of its own any more (RESUMED).

Both roles walk the same graph: the client sends the requests and receives
the replies, the server the other way round.

ERROR is sticky: a connection that raised a protocol error, either way, stays there.
"""

from __future__ import annotations

from enum import Enum, auto
from typing import Final


class _FastHash(Enum):
    # Members are singletons compared by identity, so identity is their hash:
    # Enum's own __hash__ (hash of the name, in Python) was a third of the cost
    # of sending a URB, which looks up (role, phase, kind) in TRANSITIONS.
    __hash__ = object.__hash__


class Role(_FastHash):
    CLIENT = auto()
    SERVER = auto()


class Phase(_FastHash):
    OP = auto()
    DEVLIST = auto()  # OP_REQ_DEVLIST is sent, its reply is not
    IMPORT = auto()  # OP_REQ_IMPORT is sent, its reply is not
    URB = auto()
    RESUME = auto()  # OP_REQ_RESUME is sent, its reply is not
    RESUMED = auto()  # the stream of an earlier connection carries on here
    CLOSED = auto()  # the OP exchange is over and the connection ends here
    ERROR = auto()


class Kind(_FastHash):
    """Message kinds as the state machine tells them apart."""

    OP_REQ_DEVLIST = auto()
    OP_REP_DEVLIST = auto()
    OP_REQ_IMPORT = auto()
    OP_REP_IMPORT_OK = auto()
    OP_REP_IMPORT_ERROR = auto()
    CMD_SUBMIT = auto()
    CMD_UNLINK = auto()
    RET_SUBMIT = auto()
    RET_UNLINK = auto()
    OP_REQ_RESUME = auto()
    OP_REP_RESUME_OK = auto()
    OP_REP_RESUME_ERROR = auto()

    @property
    def label(self) -> str:
        name, _, outcome = self.name.rpartition("_")
        if outcome == "OK":
            return f"{name}(OK)"
        if outcome == "ERROR":
            return f"{name}(error)"
        return self.name


_C, _S = Role.CLIENT, Role.SERVER

#: Who sends each kind of message.
SENDER: Final = {
    Kind.OP_REQ_DEVLIST: _C, Kind.OP_REQ_IMPORT: _C, Kind.CMD_SUBMIT: _C, Kind.CMD_UNLINK: _C,
    Kind.OP_REP_DEVLIST: _S, Kind.OP_REP_IMPORT_OK: _S, Kind.OP_REP_IMPORT_ERROR: _S,
    Kind.RET_SUBMIT: _S, Kind.RET_UNLINK: _S,
    Kind.OP_REQ_RESUME: _C, Kind.OP_REP_RESUME_OK: _S, Kind.OP_REP_RESUME_ERROR: _S,
}

_GRAPH: Final = {
    (Phase.OP, Kind.OP_REQ_DEVLIST): Phase.DEVLIST,
    (Phase.OP, Kind.OP_REQ_IMPORT): Phase.IMPORT,
    (Phase.DEVLIST, Kind.OP_REP_DEVLIST): Phase.CLOSED,
    (Phase.IMPORT, Kind.OP_REP_IMPORT_OK): Phase.URB,
    (Phase.IMPORT, Kind.OP_REP_IMPORT_ERROR): Phase.CLOSED,
    (Phase.URB, Kind.CMD_SUBMIT): Phase.URB,
    (Phase.URB, Kind.CMD_UNLINK): Phase.URB,
    (Phase.URB, Kind.RET_SUBMIT): Phase.URB,
    (Phase.URB, Kind.RET_UNLINK): Phase.URB,
    (Phase.OP, Kind.OP_REQ_RESUME): Phase.RESUME,
    (Phase.RESUME, Kind.OP_REP_RESUME_OK): Phase.RESUMED,
    (Phase.RESUME, Kind.OP_REP_RESUME_ERROR): Phase.CLOSED,
}

#: (role, phase, message kind) -> the phase after it, whether sent or received.
TRANSITIONS: Final[dict[tuple[Role, Phase, Kind], Phase]] = {
    (role, phase, kind): after for role in Role for (phase, kind), after in _GRAPH.items()
}


def next_phase(role: Role, phase: Phase, kind: Kind) -> Phase | None:
    """The phase after ``kind`` in ``phase``; None when the move is illegal."""
    return TRANSITIONS.get((role, phase, kind))


def describe(role: Role, phase: Phase, kind: Kind, *, sending: bool) -> str:
    """An illegal move in words: the role, the phase and the message."""
    verb = "cannot send" if sending else "did not expect"
    if sending and SENDER[kind] is not role:
        return f"a {role.name.lower()} never sends {kind.label}"
    if not sending and SENDER[kind] is role:
        return (f"{role.name.lower()} received {kind.label}, which only a "
                f"{role.name.lower()} sends (phase {phase.name})")
    return f"{role.name.lower()} {verb} {kind.label} in phase {phase.name}"
