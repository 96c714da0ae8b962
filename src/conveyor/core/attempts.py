"""A task's attempts, read from its history: who ran it, when, and how each run ended.

Each ``claimed`` event opens an execution; the next ``succeeded``, ``failed``, ``cancelled``,
``rescued`` or ``released`` event with the same attempt number closes it. A released execution (its
worker shut down before finishing it) gives its attempt number back, so the next claim reuses it: the
list is of executions, and two entries may share a number.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any

from conveyor.core.records import TaskEvent
from conveyor.core.states import EventKind

_ENDINGS = {
    EventKind.SUCCEEDED.value,
    EventKind.FAILED.value,
    EventKind.CANCELLED.value,
    EventKind.RESCUED.value,
    EventKind.RELEASED.value,
}


@dataclass(frozen=True)
class Attempt:
    number: int
    worker_id: str | None
    started_at: datetime
    ended_at: datetime | None = None  # None: still running
    outcome: str | None = None  # the closing event's kind: succeeded, failed, cancelled, rescued, released
    error: dict[str, Any] | None = None  # the error the attempt failed with, if any
    next_state: str | None = None  # where the task went afterwards (e.g. scheduled for a retry, dead)
    cancel_requested: bool = False


def attempts_from_events(events: Sequence[TaskEvent]) -> list[Attempt]:
    """The executions recorded in ``events`` (a task's history, oldest first), oldest first."""
    attempts: list[Attempt] = []
    open_index: int | None = None
    for event in events:
        if event.kind == EventKind.CLAIMED.value:
            attempts.append(Attempt(number=event.attempt, worker_id=event.worker_id, started_at=event.at))
            open_index = len(attempts) - 1
            continue
        if open_index is None or attempts[open_index].number != event.attempt:
            continue  # not about a run (e.g. a task cancelled while queued)
        current = attempts[open_index]
        if event.kind == EventKind.CANCEL_REQUESTED.value:
            attempts[open_index] = replace(current, cancel_requested=True)
        elif event.kind in _ENDINGS:
            detail = event.detail or {}
            error = detail.get("error")
            if error is None and event.kind == EventKind.RESCUED.value:
                error = {"type": "conveyor.WorkerLost", "message": detail.get("reason")}
            attempts[open_index] = replace(
                current,
                ended_at=event.at,
                outcome=event.kind,
                error=error if isinstance(error, dict) else None,
                next_state=detail.get("next_state"),
            )
            open_index = None
    return attempts
