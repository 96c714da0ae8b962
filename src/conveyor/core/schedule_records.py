"""Plain values and errors of the scheduler that cross the store boundary (the math is in ``schedule``)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Literal

from conveyor.core.schedule import ScheduleDefinition
from conveyor.errors import ConveyorError

__all__ = [
    "DisabledReason",
    "LeadershipLost",
    "Lease",
    "ScheduleConflict",
    "ScheduleError",
    "ScheduleNotFound",
    "ScheduleRecord",
    "ScheduleRun",
    "ScheduleSource",
]

ScheduleSource = Literal["code", "api"]
DisabledReason = Literal["paused", "removed"]


@dataclass(frozen=True)
class ScheduleRecord:
    """A stored schedule: its definition and the scheduler's state for it."""

    id: int
    definition: ScheduleDefinition
    enabled: bool
    disabled_reason: DisabledReason | None  # "paused" by an operator, or "removed" from the code
    next_fire_at: datetime  # the cursor: every fire time before it has been dealt with
    last_fire_at: datetime | None  # the latest fire time enqueued
    source: ScheduleSource
    created_at: datetime
    updated_at: datetime

    @property
    def name(self) -> str:
        return self.definition.name


@dataclass(frozen=True)
class ScheduleRun:
    """One enqueue made for a schedule: a tick of its cadence (``kind="schedule"``) or a manual trigger."""

    schedule_id: int
    fire_at: datetime
    task_id: int | None  # None once the task was deleted
    enqueued_at: datetime
    kind: Literal["schedule", "manual"]
    fencing_token: int | None  # the leader term that enqueued a tick; None for a manual run
    task_state: str | None = None


@dataclass(frozen=True)
class Lease:
    """A row of ``conveyor_leases``: who leads, under which fencing token, until when (database clock)."""

    name: str
    holder: str
    fencing_token: int
    expires_at: datetime
    acquired_at: datetime
    renewed_at: datetime


class ScheduleError(ConveyorError):
    """A request about a schedule that cannot be carried out."""


class ScheduleNotFound(ScheduleError):
    def __init__(self, ref: int | str) -> None:
        super().__init__(f"schedule {ref!r} does not exist")
        self.ref = ref


class ScheduleConflict(ScheduleError):
    """The schedule's name is taken, or the change is not allowed for it (e.g. it is declared in code)."""


class LeadershipLost(ConveyorError):
    """This scheduler no longer holds the leader lease under its fencing token; it wrote nothing."""
