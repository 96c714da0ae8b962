"""``/api/v1/admin``: retention (prune), the configuration in use (secrets masked), maintenance mode.
(API keys are under ``/admin/api-keys``, in ``admin_keys``.) Every route here needs ``admin``."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from fastapi import APIRouter
from pydantic import BaseModel, ConfigDict, Field

from conveyor.api.auth import Scope
from conveyor.api.deps import require
from conveyor.api.operations import OpsDep
from conveyor.api.schemas import MAX_DELAY_S, StrictFloat, StrictInt
from conveyor.api.schemas_search import StrictBool, Text
from conveyor.core.states import TaskState
from conveyor.db.admin_store import PRUNE_BATCH, MaintenanceState

router = APIRouter(prefix="/admin", tags=["admin"])

_ADMIN = [require(Scope.ADMIN)]

#: Longest one prune request works (seconds); past it the answer says `more` and the caller calls again.
PRUNE_BUDGET_S = 20.0

FinishedState = Literal["succeeded", "dead", "cancelled"]


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid")


def _finished_states() -> list[FinishedState]:
    return ["succeeded", "dead", "cancelled"]


class PruneBody(_Request):
    older_than_s: StrictFloat = Field(
        ge=60,
        le=MAX_DELAY_S,
        allow_inf_nan=False,
        description="Retention: delete tasks that finished more than this many seconds ago (at least 60).",
    )
    states: list[FinishedState] = Field(
        default_factory=_finished_states, min_length=1, max_length=3, description="Finished in these states."
    )
    limit: StrictInt = Field(default=1_000_000, ge=1, le=100_000_000, description="Delete at most this many.")
    batch_size: StrictInt = Field(default=PRUNE_BATCH, ge=100, le=10_000, description="Tasks deleted per statement.")
    schedule_runs: StrictBool = Field(
        default=False,
        description="Also delete schedule runs fired more than `older_than_s` ago, first; each schedule keeps "
        "its newest `scheduler.run_keep_newest` runs, and runs less than an hour behind a schedule's next "
        "fire time are never deleted. (The leading scheduler also does this by itself, see "
        "`scheduler.run_retention_s`.)",
    )


class PruneOut(BaseModel):
    deleted: int = Field(description="Tasks deleted, with their history.")
    schedule_runs_deleted: int = Field(description="Schedule runs deleted (0 unless `schedule_runs` was asked).")
    batches: int = Field(description="Delete statements run.")
    cutoff: datetime = Field(description="Tasks that finished before this (database clock) were eligible.")
    more: bool = Field(description="Stopped at `limit` or after 20 s with more to delete: call again.")


class ConfigOut(BaseModel):
    settings: dict[str, Any] = Field(description="Every setting in use; passwords and secrets are masked.")


class MaintenanceBody(_Request):
    action: Literal["pause", "resume"] = Field(
        description="pause: every known queue stops being claimed from (running tasks finish); "
        "resume: the queues maintenance paused are claimed from again."
    )
    reason: Text | None = Field(default=None, min_length=1, max_length=200, description="Shown to other operators.")


class MaintenanceOut(BaseModel):
    active: bool
    reason: str | None
    since: datetime | None = Field(description="When maintenance was last switched on or off.")
    paused_queues: list[str] = Field(description="The queues maintenance paused (resume un-pauses them).")
    unpaused_queues: list[str] = Field(
        description="Known queues not paused now (during maintenance: queues first used since; pause again)."
    )
    changed: list[str] = Field(description="Queues this request paused or resumed.")


@router.post("/prune", dependencies=_ADMIN)
async def prune_tasks(body: PruneBody, ops: OpsDep) -> PruneOut:
    """Retention: delete tasks that finished more than `older_than_s` seconds ago, with their history,
    in batches of `batch_size` (each its own short transaction). Waiting, running and blocked tasks are
    never pruned. With `schedule_runs`, old schedule runs go too (their tasks are not touched)."""
    report = await ops.admin.prune(
        body.older_than_s,
        states=[TaskState(s) for s in body.states],
        batch=body.batch_size,
        limit=body.limit,
        budget_s=PRUNE_BUDGET_S,
        schedule_runs_keep=ops.app.settings.scheduler.run_keep_newest if body.schedule_runs else None,
    )
    return PruneOut(
        deleted=report.deleted,
        schedule_runs_deleted=report.schedule_runs_deleted,
        batches=report.batches,
        cutoff=report.cutoff,
        more=report.more,
    )


@router.get("/config", dependencies=_ADMIN)
async def get_admin_config(ops: OpsDep) -> ConfigOut:
    """The settings this API process runs with, as the configuration file would hold them. Database
    and Redis URLs keep user, host, port and database, and lose their password."""
    return ConfigOut(settings=ops.app.settings.redacted())


@router.get("/maintenance", dependencies=_ADMIN)
async def get_maintenance(ops: OpsDep) -> MaintenanceOut:
    """Whether maintenance mode is on, and which queues it paused."""
    return _maintenance_out(await ops.admin.maintenance())


@router.post("/maintenance", dependencies=_ADMIN)
async def set_maintenance(body: MaintenanceBody, ops: OpsDep) -> MaintenanceOut:
    """Pause or resume everything. `pause` pauses every known queue (with tasks, with settings, or
    consumed by a live worker): the pause is stored in the database, so it survives restarts, and
    every worker honours it at its next claim; running tasks finish. Pausing again pauses queues that
    appeared since. `resume` un-pauses exactly the queues maintenance paused: a queue that was
    paused before stays paused."""
    if body.action == "pause":
        state = await ops.admin.pause_all(body.reason)
    else:
        state = await ops.admin.resume_all()
    return _maintenance_out(state)


def _maintenance_out(state: MaintenanceState) -> MaintenanceOut:
    return MaintenanceOut.model_validate(state, from_attributes=True)
