"""``/api/v1/resilience``: what works right now (dependencies, circuit breakers, degradation), the last
recovery pass, and the operator's levers: reset a breaker, run a recovery pass.

These routes are never refused by the ``database`` breaker, so an operator can look at it (and reset
it) while it is open.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal

from fastapi import APIRouter, Path
from pydantic import BaseModel, Field

from conveyor.api.auth import Scope
from conveyor.api.deps import require
from conveyor.api.errors import ApiProblem
from conveyor.api.operations import REDIS_BREAKER, Ops, OpsDep
from conveyor.api.routes import problems
from conveyor.db.health import schema_revision
from conveyor.resilience.circuit_breaker import BreakerSnapshot, BreakerState
from conveyor.resilience.degradation import DependencyStatus, check_dependency, overall, redis_status
from conveyor.resilience.recovery import RecoveryReport

router = APIRouter(prefix="/resilience", tags=["resilience"])

_READ = [require(Scope.TASKS_READ)]
_ADMIN = [require(Scope.ADMIN)]

#: Seconds each dependency check may take.
CHECK_TIMEOUT_S = 2.0

BreakerName = Annotated[str, Path(pattern=r"^[a-z][a-z0-9_.-]{0,49}$", description="The breaker's name.")]


class BreakerOut(BaseModel):
    name: str
    state: BreakerState
    failure_threshold: int = Field(description="Failures in a row that open it.")
    reset_timeout_s: float = Field(description="How long it stays open before letting a trial through.")
    consecutive_failures: int
    total_calls: int
    total_failures: int
    total_rejected: int = Field(description="Calls refused at once while it was open.")
    times_opened: int
    since_change_s: float = Field(description="Seconds in the current state.")
    retry_after_s: float | None = Field(description="While open: seconds until a trial call is let through.")
    last_error: str | None


class BreakersOut(BaseModel):
    items: list[BreakerOut]


class DependencyOut(BaseModel):
    name: str
    required: bool = Field(description="Conveyor cannot work without it (PostgreSQL); Redis is optional.")
    status: Literal["ok", "unavailable", "not configured"]
    breaker: BreakerState | None
    latency_ms: float | None
    detail: str | None


class RecoveryOut(BaseModel):
    started_at: datetime
    duration_s: float
    requeued: int = Field(description="Tasks whose lease expired, queued again.")
    dead: int = Field(description="Tasks whose lease expired, gone dead (attempts or worker losses used up).")
    cancelled: int = Field(description="Tasks whose lease expired with a cancellation pending.")
    promoted: int = Field(description="Scheduled tasks whose time had come, made queued.")
    workers_stopped: int = Field(description="Silent workers marked stopped.")
    requeued_ids: list[int] = Field(description="The first 100 of each kind.")
    dead_ids: list[int]
    cancelled_ids: list[int]
    stopped_workers: list[str]
    errors: list[str] = Field(description="Steps that failed, with the reason (the others still ran).")
    ok: bool


class ResilienceOut(BaseModel):
    status: Literal["ok", "degraded", "unavailable"] = Field(
        description="unavailable: PostgreSQL is; degraded: an optional dependency is; ok otherwise."
    )
    dependencies: list[DependencyOut]
    breakers: list[BreakerOut]
    last_recovery: RecoveryOut | None = Field(description="The last recovery pass run by this API process.")
    silent_worker_after_s: float = Field(description="A worker silent this long is marked stopped by recovery.")


@router.get("", dependencies=_READ)
async def get_resilience(ops: OpsDep) -> ResilienceOut:
    """The live state: each dependency checked now (through its circuit breaker), every breaker, the
    degradation state, and the last recovery pass."""
    dependencies = [await _database(ops), await _redis(ops)]
    last = ops.recovery.last_report
    return ResilienceOut(
        status=overall(dependencies),
        dependencies=[DependencyOut.model_validate(d, from_attributes=True) for d in dependencies],
        breakers=_breakers(ops),
        last_recovery=None if last is None else _recovery_out(last),
        silent_worker_after_s=ops.recovery.silent_after_s,
    )


@router.get("/breakers", dependencies=_READ)
async def list_breakers(ops: OpsDep) -> BreakersOut:
    """Every circuit breaker of this API process, with its state and counters."""
    return BreakersOut(items=_breakers(ops))


@router.post("/breakers/{name}/reset", dependencies=_ADMIN, responses=problems(404))
async def reset_breaker(name: BreakerName, ops: OpsDep) -> BreakerOut:
    """Close a breaker now and forget its failures (if the dependency is still down, the next
    failures open it again)."""
    breaker = ops.breakers.get(name)
    if breaker is None:
        raise ApiProblem(404, f"no circuit breaker named {name!r}", kind="breaker-not-found")
    breaker.reset()
    return _breaker_out(breaker.snapshot())


@router.post("/recovery/run", dependencies=_ADMIN)
async def run_recovery(ops: OpsDep) -> RecoveryOut:
    """Run one recovery pass now: rescue tasks whose lease expired, promote scheduled tasks that are
    due, and mark stopped the workers silent for longer than `silent_worker_after_s`. Returns its
    report (also shown by `GET /resilience`)."""
    return _recovery_out(await ops.recovery.run_once(ops.tasks, ops.admin))


# -- helpers -----------------------------------------------------------------------------------------


async def _database(ops: Ops) -> DependencyStatus:
    engine = ops.app.runtime().engine
    return await check_dependency(
        "database", lambda: schema_revision(engine), ops.database_breaker, required=True, timeout_s=CHECK_TIMEOUT_S
    )


async def _redis(ops: Ops) -> DependencyStatus:
    breaker = ops.breakers.get_or_create(REDIS_BREAKER)
    return await redis_status(ops.app.settings.redis_url, breaker, timeout_s=CHECK_TIMEOUT_S / 2)


def _breakers(ops: Ops) -> list[BreakerOut]:
    return [_breaker_out(snapshot) for snapshot in ops.breakers.snapshots()]


def _breaker_out(snapshot: BreakerSnapshot) -> BreakerOut:
    return BreakerOut.model_validate(snapshot, from_attributes=True)


def _recovery_out(report: RecoveryReport) -> RecoveryOut:
    return RecoveryOut.model_validate(report, from_attributes=True)
