"""Plain values that cross the boundary between the store and everything else."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from conveyor.core.states import TaskState


@dataclass(frozen=True)
class EnqueueRequest:
    """One task to insert, already validated and JSON-encoded."""

    name: str
    queue: str
    priority: int
    args_json: str
    kwargs_json: str
    metadata_json: str
    max_attempts: int
    timeout_s: float | None
    delay_s: float | None
    eta: datetime | None
    idempotency_key: str | None
    payload_hash: str | None
    unique_key: str | None


@dataclass(frozen=True)
class EnqueueResult:
    id: int
    created: bool  # False: an existing task was returned (same idempotency key, or unique key held)
    state: TaskState


@dataclass(frozen=True)
class ClaimedTask:
    """A task a worker holds under a lease; ``(id, attempt, lease_token)`` fences every write about it."""

    id: int
    name: str
    queue: str
    priority: int
    args: list[Any]
    kwargs: dict[str, Any]
    metadata: dict[str, Any]
    attempt: int
    max_attempts: int
    lease_token: str
    timeout_s: float | None
    worker_losses: int


@dataclass(frozen=True)
class TaskRecord:
    id: int
    name: str
    queue: str
    state: TaskState
    priority: int
    args: list[Any]
    kwargs: dict[str, Any]
    metadata: dict[str, Any]
    result: Any
    last_error: dict[str, Any] | None
    attempt: int
    max_attempts: int
    worker_losses: int
    worker_id: str | None
    cancel_requested: bool
    timeout_s: float | None
    idempotency_key: str | None
    unique_key: str | None
    run_at: datetime
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    lease_expires_at: datetime | None


@dataclass(frozen=True)
class TaskEvent:
    id: int
    task_id: int
    at: datetime
    kind: str
    attempt: int
    worker_id: str | None
    detail: dict[str, Any] | None


@dataclass(frozen=True)
class Outcome:
    """How one attempt ended, as the worker reports it.

    ``state`` is the task's next state: succeeded, dead, cancelled, or scheduled/queued for a retry
    after ``delay_s``.
    """

    task_id: int
    lease_token: str
    state: TaskState
    result_json: str | None = None
    error: dict[str, Any] | None = None
    delay_s: float | None = None


@dataclass(frozen=True)
class LeaseRenewal:
    held: frozenset[int]  # ids this worker still owns (renewed or not)
    renewed: frozenset[int]  # of those, the ones whose lease was extended (locked rows wait a round)
    cancel_requested: frozenset[int]  # of those, the ones an operator asked to cancel
    worker_paused: bool = False
    drain_requested: bool = False
    worker_known: bool = True


@dataclass(frozen=True)
class RescueReport:
    requeued: list[int] = field(default_factory=list)
    dead: list[int] = field(default_factory=list)
    cancelled: list[int] = field(default_factory=list)
