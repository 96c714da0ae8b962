"""``/api/v1/schedules``: periodic tasks managed at run time (list, create, change, delete, pause, resume,
trigger, runs); and ``/api/v1/scheduler``: the scheduler processes' health, whichever process runs them.

A thin adapter over :class:`~conveyor.db.schedule_store.ScheduleStore`, which decides what is allowed.
Schedules declared in code (``@app.periodic``) are listed and can be paused, resumed and triggered here,
but are changed in code: the next scheduler start would overwrite an edit made here.

Scopes: reading (the scheduler's health too) needs ``tasks:read``, triggering (an enqueue) ``tasks:write``,
and everything that changes what runs by itself (create, change, delete, pause, resume) ``admin``, like
queue settings.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Awaitable
from datetime import datetime
from typing import Annotated, Any, Literal, TypeVar

from fastapi import APIRouter, Path, Query, Request, Response
from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, model_validator

from conveyor.api.auth import Scope
from conveyor.api.deps import ServicesDep, require
from conveyor.api.errors import ApiProblem, invalid_field
from conveyor.api.routes import problems
from conveyor.api.schemas import INT64_MAX, JsonArray, JsonObject, Priority, QueueName, TaskName
from conveyor.api.schemas_scheduler import SchedulerOut
from conveyor.core.schedule import ScheduleDefinition, Timing
from conveyor.core.schedule_records import ScheduleConflict, ScheduleNotFound, ScheduleRecord, ScheduleRun
from conveyor.db.schedule_store import ScheduleStore
from conveyor.db.scheduler_process_store import SchedulerProcessStore
from conveyor.scheduler.runs import build_run_request

T = TypeVar("T")

router = APIRouter(tags=["schedules"])

SCHEDULE_NAME_PATTERN = r"^[A-Za-z_][A-Za-z0-9_.:-]{0,199}$"

ScheduleId = Annotated[int, Path(ge=1, le=INT64_MAX, description="The schedule id.")]
ScheduleName = Annotated[
    str, Field(pattern=SCHEDULE_NAME_PATTERN, max_length=200, description="A unique schedule name.")
]
MisfirePolicy = Literal["skip", "once", "all"]

_READ = [require(Scope.TASKS_READ)]
_WRITE = [require(Scope.TASKS_WRITE)]
_ADMIN = [require(Scope.ADMIN)]


# -- bodies -----------------------------------------------------------------------------------------


class ScheduleBody(BaseModel):
    """A schedule's definition: exactly one of ``cron`` and ``interval_s``."""

    model_config = ConfigDict(extra="forbid")  # a misspelt option is an error, not a silent default

    name: ScheduleName
    task: TaskName = Field(description="The task to enqueue, by its registered name.")
    cron: str | None = Field(
        default=None,
        max_length=200,
        description="5 fields (minute hour day month weekday), or 6 with seconds first; "
        "wall-clock time in `timezone`. Aliases such as `@hourly` work.",
        examples=["*/5 * * * *", "0 30 9 * * MON-FRI"],
    )
    interval_s: int | None = Field(
        default=None, ge=1, le=10 * 365 * 86400, description="Whole seconds between runs, aligned to the Unix epoch."
    )
    timezone: str = Field(default="UTC", max_length=64, description="IANA time zone of the cron expression.")
    args: JsonArray = Field(default_factory=list, description="Positional arguments of every run (JSON).")
    kwargs: JsonObject = Field(default_factory=dict, description="Keyword arguments of every run (JSON).")
    queue: QueueName | None = Field(default=None, description="Default: the task's queue.")
    priority: Priority | None = Field(default=None, description="Default: the task's priority.")
    misfire: MisfirePolicy = Field(
        default="once",
        description="Fire times missed while no scheduler ran: `skip` them, run `once` to catch up, or run `all`.",
    )
    max_lateness_s: float | None = Field(
        default=None, gt=0, le=10 * 365 * 86400, description="A run later than this is dropped; null: no limit."
    )

    @model_validator(mode="after")
    def _one_timing(self) -> ScheduleBody:
        if (self.cron is None) == (self.interval_s is None):
            raise ValueError("give exactly one of cron and interval_s")
        return self

    def definition(self) -> ScheduleDefinition:
        try:
            timing = Timing(cron=self.cron, interval_s=self.interval_s, timezone=self.timezone)
        except ValueError as exc:
            field = "body.timezone" if "timezone" in str(exc) else "body.cron"
            raise invalid_field(field, str(exc)) from None
        try:
            return ScheduleDefinition(
                name=self.name,
                task_name=self.task,
                timing=timing,
                args=tuple(self.args),
                kwargs=self.kwargs,
                queue=self.queue,
                priority=self.priority,
                misfire=self.misfire,
                max_lateness_s=self.max_lateness_s,
            )
        except ValueError as exc:
            raise invalid_field("body", str(exc)) from None


class ScheduleOut(BaseModel):
    # extra="forbid" also keeps the pydantic mypy plugin's __init__ free of the **kwargs that the field
    # named `kwargs` would otherwise clash with.
    model_config = ConfigDict(extra="forbid")

    id: int
    name: str
    task: str
    cron: str | None
    interval_s: int | None
    timezone: str
    args: list[Any]
    kwargs: dict[str, Any]
    queue: str | None = Field(description="null: the task's queue.")
    priority: int | None = Field(description="null: the task's priority.")
    misfire: MisfirePolicy
    max_lateness_s: float | None
    enabled: bool
    disabled_reason: Literal["paused", "removed"] | None = Field(
        description="`paused` by an operator, or `removed` from the code that declared it."
    )
    next_fire_at: datetime = Field(description="The next fire time the scheduler will deal with.")
    last_fire_at: datetime | None = Field(description="The latest fire time enqueued.")
    source: Literal["code", "api"] = Field(description="`code`: declared with @app.periodic; change it there.")
    created_at: datetime
    updated_at: datetime


class SchedulesOut(BaseModel):
    items: list[ScheduleOut]


class ScheduleRunOut(BaseModel):
    schedule_id: int
    fire_at: datetime = Field(description="The fire time (for a manual run, the moment it was triggered).")
    task_id: int | None = Field(description="null once the task has been deleted.")
    enqueued_at: datetime
    kind: Literal["schedule", "manual"]
    fencing_token: int | None = Field(description="The leader term that enqueued it; null for a manual run.")
    task_state: str | None = Field(default=None, description="The task's current state.")


class ScheduleRunsOut(BaseModel):
    items: list[ScheduleRunOut]
    next_cursor: str | None = Field(description="Pass as `cursor` for the next page; null on the last page.")


# -- routes -----------------------------------------------------------------------------------------


@router.get("/schedules", dependencies=_READ)
async def list_schedules(services: ServicesDep) -> SchedulesOut:
    """Every schedule, by name, with its cursor and state."""
    return SchedulesOut(items=[_out(r) for r in await _store(services).list_all()])


@router.post("/schedules", dependencies=_ADMIN, status_code=201, responses=problems(409))
async def create_schedule(
    body: ScheduleBody, request: Request, response: Response, services: ServicesDep
) -> ScheduleOut:
    """Create a schedule. It first fires at its first fire time after now (nothing before is caught up)."""
    record = await _call(_store(services).create(body.definition()))
    response.headers["Location"] = str(request.url_for("get_schedule", schedule_id=record.id))
    return _out(record)


@router.get("/schedules/{schedule_id}", dependencies=_READ, responses=problems(404))
async def get_schedule(schedule_id: ScheduleId, services: ServicesDep) -> ScheduleOut:
    """One schedule."""
    return _out(await _call(_store(services).get(schedule_id)))


@router.put("/schedules/{schedule_id}", dependencies=_ADMIN, responses=problems(404, 409))
async def update_schedule(schedule_id: ScheduleId, body: ScheduleBody, services: ServicesDep) -> ScheduleOut:
    """Replace a schedule's definition (not one declared in code: change that in code). A new timing
    starts from now; the cursor of an unchanged one is kept."""
    return _out(await _call(_store(services).update(schedule_id, body.definition())))


@router.delete("/schedules/{schedule_id}", dependencies=_ADMIN, status_code=204, responses=problems(404, 409))
async def delete_schedule(schedule_id: ScheduleId, services: ServicesDep) -> Response:
    """Delete a schedule and its run history (its tasks stay). A schedule declared in code can only be
    deleted once it has been removed from the code; pause it instead."""
    await _call(_store(services).delete(schedule_id))
    return Response(status_code=204)


@router.post("/schedules/{schedule_id}/pause", dependencies=_ADMIN, responses=problems(404))
async def pause_schedule(schedule_id: ScheduleId, services: ServicesDep) -> ScheduleOut:
    """Stop the schedule firing. The pause is stored: it outlasts restarts and code syncs."""
    return _out(await _call(_store(services).pause(schedule_id)))


@router.post("/schedules/{schedule_id}/resume", dependencies=_ADMIN, responses=problems(404))
async def resume_schedule(schedule_id: ScheduleId, services: ServicesDep) -> ScheduleOut:
    """Let the schedule fire again from its next fire time; fire times passed while paused are not run."""
    return _out(await _call(_store(services).resume(schedule_id)))


@router.post("/schedules/{schedule_id}/trigger", dependencies=_WRITE, status_code=201, responses=problems(404))
async def trigger_schedule(schedule_id: ScheduleId, services: ServicesDep) -> ScheduleRunOut:
    """Enqueue one run now, outside the cadence (also for a paused schedule). Needs no scheduler running."""
    app = services.app
    run = await _call(_store(services).trigger(schedule_id, lambda schedule, at: build_run_request(app, schedule, at)))
    return _run_out(run)


@router.get("/schedules/{schedule_id}/runs", dependencies=_READ, responses=problems(404))
async def list_schedule_runs(
    schedule_id: ScheduleId,
    services: ServicesDep,
    limit: Annotated[int, Query(ge=1, le=500, description="Runs per page.")] = 50,
    cursor: Annotated[str | None, Query(max_length=200, description="`next_cursor` of the previous page.")] = None,
) -> ScheduleRunsOut:
    """The schedule's runs, latest fire time first, with each task's current state."""
    before = _decode_cursor(cursor) if cursor is not None else None
    runs = await _call(_store(services).runs(schedule_id, limit=limit, before=before))
    next_cursor = _encode_cursor(runs[-1].fire_at) if len(runs) == limit else None
    return ScheduleRunsOut(items=[_run_out(r) for r in runs], next_cursor=next_cursor)


@router.get("/scheduler", dependencies=_READ)
async def get_scheduler(services: ServicesDep) -> SchedulerOut:
    """The scheduler's health, as its processes report it in the database (they usually run apart from
    the API): who leads under which fencing token, every scheduler process with its clock skew and
    warning, and which of them vanished without stopping (stale). `status` sums it up; it is `no-leader`
    in a deployment that runs no scheduler."""
    return SchedulerOut.of(await SchedulerProcessStore(services.app.runtime().engine).overview())


# -- helpers ----------------------------------------------------------------------------------------


def _store(services: ServicesDep) -> ScheduleStore:
    return ScheduleStore(services.app.runtime().engine)


async def _call(operation: Awaitable[T]) -> T:
    try:
        return await operation
    except ScheduleNotFound as exc:
        raise ApiProblem(404, str(exc), kind="schedule-not-found") from None
    except ScheduleConflict as exc:
        raise ApiProblem(409, str(exc), kind="schedule-conflict") from None


def _out(record: ScheduleRecord) -> ScheduleOut:
    d = record.definition
    return ScheduleOut(
        id=record.id,
        name=d.name,
        task=d.task_name,
        cron=d.timing.cron,
        interval_s=d.timing.interval_s,
        timezone=d.timing.timezone,
        args=list(d.args),
        kwargs=dict(d.kwargs),
        queue=d.queue,
        priority=d.priority,
        misfire=d.misfire,
        max_lateness_s=d.max_lateness_s,
        enabled=record.enabled,
        disabled_reason=record.disabled_reason,
        next_fire_at=record.next_fire_at,
        last_fire_at=record.last_fire_at,
        source=record.source,
        created_at=record.created_at,
        updated_at=record.updated_at,
    )


def _run_out(run: ScheduleRun) -> ScheduleRunOut:
    return ScheduleRunOut(
        schedule_id=run.schedule_id,
        fire_at=run.fire_at,
        task_id=run.task_id,
        enqueued_at=run.enqueued_at,
        kind=run.kind,
        fencing_token=run.fencing_token,
        task_state=run.task_state,
    )


def _encode_cursor(fire_at: datetime) -> str:
    return base64.urlsafe_b64encode(fire_at.isoformat().encode()).decode().rstrip("=")


class _Cursor(BaseModel):
    fire_at: AwareDatetime


def _decode_cursor(cursor: str) -> datetime:
    try:
        text = base64.urlsafe_b64decode(cursor.encode("ascii") + b"=" * (-len(cursor) % 4)).decode()
        return _Cursor(fire_at=datetime.fromisoformat(text)).fire_at
    except (ValueError, UnicodeError, binascii.Error):
        raise invalid_field("query.cursor", "is not a cursor this API returned") from None
