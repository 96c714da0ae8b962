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
    "SchedulerOverview",
    "SchedulerProcess",
    "SchedulerStatus",
]

ScheduleSource = Literal["code", "api"]
DisabledReason = Literal["paused", "removed"]
SchedulerStatus = Literal["ok", "degraded", "no-leader"]


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


@dataclass(frozen=True)
class SchedulerProcess:
    """A row of ``conveyor_scheduler_processes``: one scheduler process as it last reported itself."""

    id: str  # its lease holder name
    host: str
    pid: int
    started_at: datetime
    last_seen_at: datetime  # database clock
    stale_after_s: float
    leading: bool  # as of its last report
    fencing_token: int | None
    clock_skew_s: float | None  # the database clock minus its host's, when last measured
    warning: str | None  # set while the skew is beyond its limit
    seen_age_s: float  # seconds since last_seen_at, on the database clock

    @property
    def stale(self) -> bool:
        """It stopped reporting without stopping (killed, frozen, cut off from the database)."""
        return self.seen_age_s > self.stale_after_s


@dataclass(frozen=True)
class SchedulerOverview:
    """Who leads and which scheduler processes run, as one consistent read on the database clock."""

    checked_at: datetime  # the database's now() when read
    lease: Lease | None  # the leader lease, expired or not; None if no scheduler ever ran
    processes: tuple[SchedulerProcess, ...]  # most recently seen first

    @property
    def leader_expired(self) -> bool:
        return self.lease is None or self.lease.expires_at <= self.checked_at

    @property
    def problems(self) -> list[str]:
        """What an operator should look at, one sentence each; empty when all is well."""
        found: list[str] = []
        if self.lease is None:
            found.append("no scheduler has ever held the leader lease")
        elif self.leader_expired:
            found.append(
                f"the leader lease expired at {self.lease.expires_at.isoformat()} (last held by "
                f"{self.lease.holder}): no scheduler leads, nothing is enqueued"
            )
        for process in self.processes:
            if process.stale:
                found.append(
                    f"scheduler {process.id} has not reported for {process.seen_age_s:.0f} s: it was killed or "
                    "lost the database without stopping"
                )
            elif process.warning is not None:
                found.append(f"scheduler {process.id}: {process.warning}")
        return found

    @property
    def status(self) -> SchedulerStatus:
        """``no-leader`` when the lease is missing or expired; ``degraded`` when a live scheduler's clock
        is off or a scheduler vanished without stopping (until its row is pruned); ``ok`` otherwise."""
        if self.leader_expired:
            return "no-leader"
        return "degraded" if self.problems else "ok"


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
