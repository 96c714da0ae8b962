"""Task states and the transitions the store allows between them.

The store enforces each transition with a guarded ``UPDATE ... WHERE state = ...``; this module is the
one place that names which states count as what, so SQL and Python agree.
"""

from __future__ import annotations

from enum import StrEnum


class TaskState(StrEnum):
    SCHEDULED = "scheduled"  # waiting for its run time (delay, ETA or a retry backoff)
    QUEUED = "queued"  # ready to be claimed
    RUNNING = "running"  # claimed under a lease by one worker
    SUCCEEDED = "succeeded"
    DEAD = "dead"  # failed for good: attempts exhausted, non-retryable, or killed its worker too often
    CANCELLED = "cancelled"
    BLOCKED = "blocked"  # a workflow step waiting for the steps it depends on


#: States a task never leaves except by an explicit retry.
TERMINAL_STATES: frozenset[TaskState] = frozenset({TaskState.SUCCEEDED, TaskState.DEAD, TaskState.CANCELLED})

#: States in which a task still holds its ``unique_key``.
UNIQUE_HOLDING_STATES: frozenset[TaskState] = frozenset(
    {TaskState.SCHEDULED, TaskState.QUEUED, TaskState.RUNNING, TaskState.BLOCKED}
)

#: States a worker may claim from (a scheduled task is claimable once its run time has come).
CLAIMABLE_STATES: frozenset[TaskState] = frozenset({TaskState.SCHEDULED, TaskState.QUEUED})

#: States that may be cancelled without asking a worker.
CANCELLABLE_AT_REST: frozenset[TaskState] = frozenset({TaskState.SCHEDULED, TaskState.QUEUED, TaskState.BLOCKED})

#: States from which an explicit retry starts a task again.
RETRYABLE_STATES: frozenset[TaskState] = frozenset({TaskState.DEAD, TaskState.CANCELLED, TaskState.SUCCEEDED})


class EventKind(StrEnum):
    """Entries of a task's append-only history."""

    ENQUEUED = "enqueued"
    CLAIMED = "claimed"
    SUCCEEDED = "succeeded"
    FAILED = "failed"  # an attempt failed; the task was rescheduled or went to dead
    RETRIED = "retried"  # an operator (or API) started a finished task again
    RESCUED = "rescued"  # its lease expired; the worker was lost
    RELEASED = "released"  # a shutting-down worker gave it back unrun; not counted as a failure
    CANCEL_REQUESTED = "cancel_requested"
    CANCELLED = "cancelled"
    UPDATED = "updated"
