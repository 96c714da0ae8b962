"""Response bodies of the scheduler's health (``GET /api/v1/scheduler``).

Every time is on the database clock, as are the ages and the staleness derived from them: the API's own
host clock takes no part, so an API on a host with a wrong clock still reports correctly.
"""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import BaseModel, Field

from conveyor.core.schedule_records import Lease, SchedulerOverview, SchedulerProcess

SchedulerStatusOut = Literal["ok", "degraded", "no-leader"]


class SchedulerLeaderOut(BaseModel):
    """The leader lease (``conveyor_leases``), expired or not."""

    holder: str = Field(description="The scheduler process holding (or that last held) the lease.")
    fencing_token: int = Field(description="Its term; every tick it enqueues presents it.")
    acquired_at: datetime
    renewed_at: datetime
    expires_at: datetime
    expired: bool = Field(description="True: nobody leads now (the lease ran out or was released).")


class SchedulerProcessOut(BaseModel):
    """One scheduler process, as it last reported itself."""

    id: str = Field(description="Its lease holder name (host:pid:random).")
    host: str
    pid: int
    started_at: datetime
    last_seen_at: datetime = Field(description="Its latest report (once per lease renewal).")
    seen_age_s: float = Field(description="Seconds since its latest report.")
    stale: bool = Field(
        description="It stopped reporting without stopping (killed, frozen, or cut off from the database); "
        "the leader deletes its row after `scheduler.stale_retention_s`."
    )
    leading: bool = Field(description="Whether it held the leader lease at its latest report.")
    fencing_token: int | None = Field(description="Its term while leading; null otherwise.")
    clock_skew_s: float | None = Field(
        description="The database clock minus its host's clock, in seconds, as last measured (negative: the "
        "host is ahead); null until first measured."
    )
    warning: str | None = Field(description="Set while its clock skew is beyond `scheduler.max_clock_skew_s`.")


class SchedulerOut(BaseModel):
    status: SchedulerStatusOut = Field(
        description="`no-leader`: no scheduler leads (none runs, or the lease lapsed), nothing is enqueued; "
        "`degraded`: a scheduler's clock is off, or one vanished without stopping; `ok` otherwise."
    )
    checked_at: datetime = Field(description="The database's time of this answer.")
    leader: SchedulerLeaderOut | None = Field(description="null if no scheduler ever led.")
    processes: list[SchedulerProcessOut] = Field(
        description="Scheduler processes, most recently seen first (at most 100)."
    )
    problems: list[str] = Field(description="Why the status is not `ok`, one sentence each.")

    @classmethod
    def of(cls, overview: SchedulerOverview) -> SchedulerOut:
        return cls(
            status=overview.status,
            checked_at=overview.checked_at,
            leader=None if overview.lease is None else _leader(overview.lease, overview.leader_expired),
            processes=[_process(p) for p in overview.processes],
            problems=overview.problems,
        )


def _leader(lease: Lease, expired: bool) -> SchedulerLeaderOut:
    return SchedulerLeaderOut(
        holder=lease.holder,
        fencing_token=lease.fencing_token,
        acquired_at=lease.acquired_at,
        renewed_at=lease.renewed_at,
        expires_at=lease.expires_at,
        expired=expired,
    )


def _process(process: SchedulerProcess) -> SchedulerProcessOut:
    return SchedulerProcessOut(
        id=process.id,
        host=process.host,
        pid=process.pid,
        started_at=process.started_at,
        last_seen_at=process.last_seen_at,
        seen_age_s=process.seen_age_s,
        stale=process.stale,
        leading=process.leading,
        fencing_token=process.fencing_token,
        clock_skew_s=process.clock_skew_s,
        warning=process.warning,
    )
