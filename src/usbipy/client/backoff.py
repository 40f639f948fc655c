"""Exponential backoff with jitter, for re-connecting to a server that went away.

Many clients that lost the same server at the same moment (a restart) must
not come back in lockstep: each delay is drawn at random from the upper part
of its step ("equal jitter"), so the delays still grow and never collapse
to zero.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field


@dataclass
class Backoff:
    """Delays of 1, 2, 4 ... up to ``maximum`` seconds, each with up to half of it
    taken off at random; at most ``retries`` delays (None: forever)."""

    initial: float = 1.0
    maximum: float = 60.0
    factor: float = 2.0
    retries: int | None = None
    #: Draws the jitter: seeded in tests.
    rng: random.Random = field(default_factory=random.Random, repr=False)
    #: Delays handed out since the last reset or reset_count: what ``retries`` counts.
    attempts: int = 0
    #: The step the next delay is drawn from (0: ``initial``).
    step: int = 0

    def __post_init__(self) -> None:
        if not 0 < self.initial <= self.maximum:
            raise ValueError(f"backoff from {self.initial:g} s to {self.maximum:g} s: "
                             "the first delay must be more than 0 and at most the longest")
        if self.factor < 1:
            raise ValueError(f"backoff factor {self.factor:g} is below 1")
        if self.retries is not None and self.retries < 0:
            raise ValueError(f"{self.retries} retries: not a count")

    @property
    def exhausted(self) -> bool:
        return self.retries is not None and self.attempts >= self.retries

    def next_delay(self) -> float:
        """The next delay, in seconds; StopIteration once ``retries`` are used up."""
        if self.exhausted:
            raise StopIteration
        step = min(self.maximum, self.initial * self.factor ** min(self.step, 64))
        self.attempts += 1
        self.step += 1
        return step / 2 + self.rng.uniform(0, step / 2)

    def reset_count(self) -> None:
        """After a success: ``retries`` counts again from 0 (failures in a row), but
        the delays go on from where they were."""
        self.attempts = 0

    def reset(self) -> None:
        """After a success that lasted: the next delay is ``initial`` again."""
        self.attempts = 0
        self.step = 0
