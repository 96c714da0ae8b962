"""``/health/live`` and ``/health/ready``: the only routes that answer without an API key.

Readiness also names the scheduler's overall status (``ok``, ``degraded``, ``no-leader``), read from the
rows scheduler processes keep about themselves: two small reads of tiny tables, under their own short
timeout. It is information only and never turns readiness red: the API serves requests whether or not a
scheduler runs (an API-only deployment runs none), and taking API replicas out of a load balancer would
not bring a scheduler back. Only the one word is shown here, without a key; the details (hosts, clock
skew) are at ``GET /api/v1/scheduler``.
"""

from __future__ import annotations

import asyncio
from typing import Literal

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from conveyor.api.deps import conveyor_app
from conveyor.api.errors import problem_response
from conveyor.api.routes import problems
from conveyor.api.schemas import LiveOut, ReadyOut
from conveyor.app import App
from conveyor.db.health import schema_revision
from conveyor.db.scheduler_process_store import SchedulerProcessStore
from conveyor.errors import DatabaseError

router = APIRouter(prefix="/health", tags=["health"])

#: Seconds the readiness probe waits for the database before answering 503.
READY_TIMEOUT_S = 3.0
#: Seconds it waits for the scheduler's status before calling it "unknown" (and answering 200 anyway).
SCHEDULER_STATUS_TIMEOUT_S = 1.0


@router.get("/live", responses=problems(500))
async def live() -> LiveOut:
    """The process is up and serving (no dependency is checked)."""
    return LiveOut()


@router.get("/ready", responses=problems(500, 503), response_model=ReadyOut)
async def ready(request: Request) -> ReadyOut | JSONResponse:
    """The database answers and its schema is the one this Conveyor needs; 503 otherwise."""
    app = conveyor_app(request)
    head = request.app.state.schema_head
    try:
        async with asyncio.timeout(READY_TIMEOUT_S):
            current = await schema_revision(app.runtime().engine)
    except (DatabaseError, TimeoutError):
        return problem_response(503, "the database is unreachable", kind="not-ready", headers={"Retry-After": "5"})
    if current != head:
        detail = f"the database schema is at {current or 'nothing'}, this Conveyor needs {head}"
        return problem_response(503, detail, kind="not-ready", headers={"Retry-After": "5"})
    return ReadyOut(schema_revision=current, scheduler=await _scheduler_status(app))


async def _scheduler_status(app: App) -> Literal["ok", "degraded", "no-leader", "unknown"]:
    try:
        async with asyncio.timeout(SCHEDULER_STATUS_TIMEOUT_S):
            overview = await SchedulerProcessStore(app.runtime().engine).overview()
    except (DatabaseError, TimeoutError):
        return "unknown"
    return overview.status
