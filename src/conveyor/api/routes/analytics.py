"""``/api/v1/analytics``: overview, throughput, latency percentiles, top errors, per-task numbers.

Every window is bounded (at most 7 days) and so is every series (at most 1,000 buckets); a request
outside the bounds is a 422 naming the parameter. Counts come from the statistics rollup (cheap at
any table size); percentiles and error groups from a bounded sample of the most recent tasks, which
the answer reports (``sample_size``, ``sampled``).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable
from datetime import datetime
from typing import Annotated, Literal, TypeVar

from fastapi import APIRouter, Query
from pydantic import BaseModel, Field

from conveyor.api.auth import Scope
from conveyor.api.deps import require
from conveyor.api.errors import invalid_field
from conveyor.api.operations import Ops, OpsDep
from conveyor.api.schemas import QueueName, TaskName
from conveyor.db.analytics_store import (
    MAX_BUCKETS,
    MAX_FINE_WINDOW_S,
    MAX_WINDOW_S,
    Counts,
    Percentiles,
    WindowError,
)
from conveyor.errors import DatabaseError

log = logging.getLogger("conveyor.api")

T = TypeVar("T")

router = APIRouter(prefix="/analytics", tags=["analytics"])

_READ = [require(Scope.TASKS_READ)]

#: Seconds a read may spend bringing the rollup up to date before it answers.
_ROLLUP_BUDGET_S = 0.3


WindowParam = Annotated[
    int, Query(ge=1, le=MAX_WINDOW_S, description=f"How far back, in seconds (at most {MAX_WINDOW_S}: 7 days).")
]
MinuteWindowParam = Annotated[
    int,
    Query(ge=60, le=MAX_WINDOW_S, description=f"How far back, in seconds (60 to {MAX_WINDOW_S}: whole minutes)."),
]
BucketParam = Annotated[
    int,
    Query(
        ge=1,
        le=MAX_WINDOW_S,
        description=f"Bucket length in seconds: at most the window, at most {MAX_BUCKETS} buckets; "
        f"buckets that are not whole minutes allow windows up to {MAX_FINE_WINDOW_S} s.",
    ),
]
QueueParam = Annotated[QueueName | None, Query(description="Only this queue.")]
NameParam = Annotated[TaskName | None, Query(description="Only this task name.")]


# -- bodies ------------------------------------------------------------------------------------------


class CountsOut(BaseModel):
    enqueued: int
    succeeded: int
    dead: int
    cancelled: int
    finished: int = Field(description="succeeded + dead + cancelled")
    avg_run_s: float | None = Field(description="Mean run time of the finished tasks that ran.")
    avg_wait_s: float | None = Field(description="Mean time from due to claimed of those tasks.")


class BucketOut(BaseModel):
    start: datetime
    counts: CountsOut


class ThroughputOut(BaseModel):
    since: datetime = Field(description="Start of the first bucket.")
    until: datetime = Field(description="Now (database clock); the last bucket is still filling.")
    bucket_s: int
    buckets: list[BucketOut]


class BacklogOut(BaseModel):
    scheduled: int
    queued: int
    running: int
    blocked: int
    dead: int = Field(description="Dead letters waiting for someone (GET /dead).")


class OverviewOut(BaseModel):
    since: datetime
    until: datetime
    window_s: int
    counts: CountsOut
    throughput_per_s: float = Field(description="Finished tasks per second over the window.")
    success_rate: float | None = Field(description="succeeded / (succeeded + dead); null with neither.")
    now: BacklogOut = Field(description="Tasks in each unfinished state (and dead) right now.")
    oldest_waiting_age_s: float | None
    live_workers: int
    silent_workers: int = Field(description="Not stopped, but no heartbeat within the lease timeout.")
    worker_slots: int = Field(description="Sum of the live workers' concurrency.")
    paused_queues: int


class PercentilesOut(BaseModel):
    p50: float | None
    p90: float | None
    p95: float | None
    p99: float | None
    avg: float | None
    max: float | None


class LatencyOut(BaseModel):
    since: datetime
    until: datetime
    sample_size: int = Field(description="Finished tasks the percentiles are computed over.")
    sampled: bool = Field(description="True: more tasks finished in the window; these are the most recent.")
    wait_s: PercentilesOut = Field(description="From due (run_at) to claimed, in seconds.")
    run_s: PercentilesOut = Field(description="From claimed to finished, in seconds (the last attempt).")


class ErrorGroupOut(BaseModel):
    error_type: str
    message: str = Field(description="The message's first 200 characters.")
    count: int
    first_seen: datetime
    last_seen: datetime
    example_task_id: int
    queues: list[str]
    names: list[str]


class FailuresOut(BaseModel):
    since: datetime
    until: datetime
    dead: int = Field(description="Tasks that went dead in the window (exact).")
    sample_size: int = Field(description="Dead tasks the groups are computed over (the most recent).")
    sampled: bool
    items: list[ErrorGroupOut]


class TaskNameOut(BaseModel):
    name: str
    counts: CountsOut
    now: dict[str, int] = Field(description="Tasks of this name per unfinished state right now.")
    run_p50_s: float | None
    run_p95_s: float | None


class TaskNamesOut(BaseModel):
    since: datetime
    until: datetime
    sample_size: int = Field(description="Finished tasks the run time percentiles are computed over.")
    sampled: bool
    items: list[TaskNameOut]


# -- routes ------------------------------------------------------------------------------------------


@router.get("/overview", dependencies=_READ)
async def analytics_overview(ops: OpsDep, queue: QueueParam = None, window_s: MinuteWindowParam = 3600) -> OverviewOut:
    """The last `window_s` seconds at a glance (whole minutes): enqueued, succeeded, dead and
    cancelled tasks, throughput, success rate, mean run and wait time; and the backlog, the oldest
    waiting task and the workers right now."""
    await _roll_up(ops)
    overview = await _checked(ops.analytics.overview(window_s, queue=queue))
    counts = overview.counts
    decided = counts.succeeded + counts.dead
    span_s = max(1.0, (overview.until - overview.since).total_seconds())
    return OverviewOut(
        since=overview.since,
        until=overview.until,
        window_s=window_s,
        counts=_counts(counts),
        throughput_per_s=round(counts.finished / span_s, 6),
        success_rate=None if decided == 0 else round(counts.succeeded / decided, 6),
        now=BacklogOut(**overview.current),
        oldest_waiting_age_s=overview.oldest_waiting_age_s,
        live_workers=overview.live_workers,
        silent_workers=overview.silent_workers,
        worker_slots=overview.worker_slots,
        paused_queues=overview.paused_queues,
    )


@router.get("/throughput", dependencies=_READ)
async def analytics_throughput(
    ops: OpsDep,
    queue: QueueParam = None,
    name: NameParam = None,
    window_s: WindowParam = 3600,
    bucket_s: BucketParam = 60,
) -> ThroughputOut:
    """Enqueued and finished tasks per bucket over the last `window_s` seconds. Buckets are aligned
    to multiples of `bucket_s` since the Unix epoch; every bucket is listed, empty ones as zeros."""
    await _roll_up(ops)
    series = await _checked(ops.analytics.series(window_s, bucket_s, queue=queue, name=name))
    return ThroughputOut(
        since=series.since,
        until=series.until,
        bucket_s=series.bucket_s,
        buckets=[BucketOut(start=b.start, counts=_counts(b.counts)) for b in series.buckets],
    )


@router.get("/latency", dependencies=_READ)
async def analytics_latency(
    ops: OpsDep,
    queue: QueueParam = None,
    name: NameParam = None,
    window_s: WindowParam = 3600,
    state: Annotated[
        list[Literal["succeeded", "dead", "cancelled"]] | None,
        Query(max_length=3, description="Finished in these states (default succeeded and dead)."),
    ] = None,
) -> LatencyOut:
    """Wait time (due to claimed) and run time (claimed to finished) percentiles, in seconds, over the
    most recent tasks (up to 20,000) that finished in the window."""
    latency = await _checked(
        ops.analytics.latency(window_s, queue=queue, name=name, states=tuple(state or ("succeeded", "dead")))
    )
    return LatencyOut(
        since=latency.since,
        until=latency.until,
        sample_size=latency.sample_size,
        sampled=latency.sampled,
        wait_s=_percentiles(latency.wait),
        run_s=_percentiles(latency.run),
    )


@router.get("/failures", dependencies=_READ)
async def analytics_failures(
    ops: OpsDep,
    queue: QueueParam = None,
    name: NameParam = None,
    window_s: MinuteWindowParam = 86_400,
    limit: Annotated[int, Query(ge=1, le=100, description="Error groups to list.")] = 20,
) -> FailuresOut:
    """The most frequent errors (type and message) that sent tasks to dead in the window, most
    frequent first, over the most recent dead tasks (up to 10,000); and how many went dead in all."""
    await _roll_up(ops)
    failures = await _checked(ops.analytics.failures(window_s, queue=queue, name=name, limit=limit))
    return FailuresOut(
        since=failures.since,
        until=failures.until,
        dead=failures.dead,
        sample_size=failures.sample_size,
        sampled=failures.sampled,
        items=[ErrorGroupOut.model_validate(g, from_attributes=True) for g in failures.groups],
    )


@router.get("/tasks", dependencies=_READ)
async def analytics_tasks(
    ops: OpsDep,
    queue: QueueParam = None,
    window_s: MinuteWindowParam = 86_400,
    limit: Annotated[int, Query(ge=1, le=500, description="Task names to list (busiest first).")] = 100,
) -> TaskNamesOut:
    """Per task name: enqueued, succeeded, dead and cancelled in the window, mean run and wait time,
    the backlog right now, and run time percentiles over the most recent finished tasks."""
    await _roll_up(ops)
    per_name = await _checked(ops.analytics.per_name(window_s, queue=queue, limit=limit))
    return TaskNamesOut(
        since=per_name.since,
        until=per_name.until,
        sample_size=per_name.sample_size,
        sampled=per_name.sampled,
        items=[
            TaskNameOut(
                name=item.name,
                counts=_counts(item.counts),
                now=item.current,
                run_p50_s=item.run_p50_s,
                run_p95_s=item.run_p95_s,
            )
            for item in per_name.items
        ],
    )


# -- helpers -----------------------------------------------------------------------------------------


async def _roll_up(ops: Ops) -> None:
    """Bring the rollup up to date, briefly. Reads are correct without it (they count what is not
    rolled up from the tasks themselves), so a failure here is logged, not returned."""
    try:
        await ops.analytics.roll_up(budget_s=_ROLLUP_BUDGET_S)
    except DatabaseError as exc:
        log.warning("analytics: could not update the statistics rollup: %s", exc)


async def _checked(pending: Awaitable[T]) -> T:
    """Await a store read; a window or bucket it refuses is a 422 naming the parameter."""
    try:
        return await pending
    except WindowError as exc:
        raise invalid_field(f"query.{exc.field}", exc.message) from None


def _counts(counts: Counts) -> CountsOut:
    return CountsOut(
        enqueued=counts.enqueued,
        succeeded=counts.succeeded,
        dead=counts.dead,
        cancelled=counts.cancelled,
        finished=counts.finished,
        avg_run_s=None if counts.avg_run_s is None else round(counts.avg_run_s, 6),
        avg_wait_s=None if counts.avg_wait_s is None else round(counts.avg_wait_s, 6),
    )


def _percentiles(found: Percentiles) -> PercentilesOut:
    return PercentilesOut.model_validate(found, from_attributes=True)
