"""Queue limits as a worker sees them: which of its queues are limited, and when each is worth
claiming from again.

The limits themselves are enforced in the database (:mod:`conveyor.db.limit_sql`): this is only the
worker's routing and pacing. A queue without limits is claimed by the one-statement CLAIM and costs
nothing here beyond a dictionary look-up; a limited one goes through the serialised claim, and after
each such claim the worker learns from its :class:`QueueGate` whether to come back:

* concurrency limit reached with tasks still waiting: not before one of this worker's own tasks of
  that queue is finished, or ``recheck_s`` (the poll interval: another worker freed a slot) passes;
* out of tokens with tasks still waiting: not before the next token is due, as the database computed.

Without that a worker woken by every enqueue notification would run a claim that can take nothing.

Which queues are limited is read from ``conveyor_queues`` every second or so (and each limited claim
reports its queue's current limits too), so a limit set over the API applies within about a second.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from conveyor.core.records import ClaimedTask

#: Added to the database's "next token in" before claiming again: arriving a hair early finds 0.99
#: tokens, claims nothing and has to wait again.
_TOKEN_SLACK_S = 0.002


@dataclass(frozen=True, slots=True)
class QueueLimits:
    """A queue's limits; ``None`` means not limited in that way."""

    concurrency_limit: int | None = None  # tasks of the queue running at once, across all workers
    rate_limit_per_s: float | None = None  # task starts per second, across all workers

    @property
    def limited(self) -> bool:
        return self.concurrency_limit is not None or self.rate_limit_per_s is not None


@dataclass(frozen=True, slots=True)
class QueueGate:
    """How a limited queue stood right after a claim from it."""

    queue: str
    limits: QueueLimits
    paused: bool
    at_concurrency_limit: bool
    next_token_in_s: float | None  # None: at least one whole token is left (or no rate limit)
    waiting: bool  # due tasks were left behind


@dataclass(frozen=True, slots=True)
class LimitedClaim:
    tasks: list[ClaimedTask]
    gates: list[QueueGate]


class LimitGates:
    """Routing and pacing of one worker's claims over its ``queues`` (times are ``time.monotonic()``)."""

    def __init__(self, queues: Sequence[str]) -> None:
        self.queues = list(queues)
        #: False until limits were read once: before that no queue may be taken for unlimited.
        self.loaded = False
        self._limits: dict[str, QueueLimits] = {}
        self._full_until: dict[str, float] = {}
        self._token_at: dict[str, float] = {}

    @property
    def limited(self) -> dict[str, QueueLimits]:
        return dict(self._limits)

    def update(self, limits: Mapping[str, QueueLimits]) -> None:
        """Take the limits just read (queues not in ``limits`` have none). A queue whose limits
        changed is claimed at once: its waits were computed under the old ones."""
        for queue in self.queues:
            self._set(queue, limits.get(queue, QueueLimits()))
        self.loaded = True

    def claimable(self, now: float) -> tuple[list[str], list[str]]:
        """``(unlimited, limited)`` queues worth claiming from now."""
        if not self._limits:
            return self.queues, []
        unlimited = [q for q in self.queues if q not in self._limits]
        limited = [
            q
            for q in self.queues
            if q in self._limits and self._full_until.get(q, 0.0) <= now and self._token_at.get(q, 0.0) <= now
        ]
        return unlimited, limited

    def after_claim(self, gates: Sequence[QueueGate], now: float, recheck_s: float) -> None:
        for gate in gates:
            queue = gate.queue
            self._set(queue, gate.limits)
            # Paused, or a concurrency limit of 0, cannot change by waiting: those are polled like a
            # paused queue, without holding a burst worker back.
            held = gate.waiting and not gate.paused
            if held and gate.at_concurrency_limit and (gate.limits.concurrency_limit or 0) > 0:
                self._full_until[queue] = now + recheck_s
            else:
                self._full_until.pop(queue, None)
            if held and gate.next_token_in_s is not None:
                self._token_at[queue] = now + gate.next_token_in_s + _TOKEN_SLACK_S
            else:
                self._token_at.pop(queue, None)

    def slot_freed(self, queue: str) -> bool:
        """One of this worker's tasks of ``queue`` was finished: a concurrency slot is free. True if
        ``queue`` has limits (so the slot may be what a claim is waiting for)."""
        self._full_until.pop(queue, None)
        return queue in self._limits

    def ready_in_s(self, now: float) -> float | None:
        """Seconds until the first held-back queue is worth claiming from; None if none is held back."""
        waits = [
            max(self._full_until.get(q, 0.0), self._token_at.get(q, 0.0)) - now
            for q in self._full_until.keys() | self._token_at.keys()
        ]
        return max(0.0, min(waits)) if waits else None

    @property
    def holding_back(self) -> bool:
        """Some limited queue had due tasks left that its limits kept us from claiming (a burst
        worker must not take its queues for drained)."""
        return bool(self._full_until or self._token_at)

    def _set(self, queue: str, limits: QueueLimits) -> None:
        if limits == self._limits.get(queue, QueueLimits()):
            return
        self._full_until.pop(queue, None)
        self._token_at.pop(queue, None)
        if limits.limited:
            self._limits[queue] = limits
        else:
            self._limits.pop(queue, None)
