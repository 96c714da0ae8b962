"""``/api/v1/debug``: the database's statistics and locks, and stack dumps of live workers.

Mounted only when ``api.debug_routes`` is true (off by default): otherwise these paths do not exist
and answer 404, to an admin too (after the key check, like every other path). Every route needs
``admin``.
"""

from __future__ import annotations

import asyncio
import time
from datetime import datetime
from typing import Annotated, Any
from uuid import UUID

from fastapi import APIRouter, Path, Query, Request
from pydantic import BaseModel, Field

from conveyor.api.auth import Scope
from conveyor.api.deps import require
from conveyor.api.errors import PROBLEM_JSON, ApiProblem
from conveyor.api.operations import OpsDep
from conveyor.api.routes import problems

router = APIRouter(prefix="/debug", tags=["debug"])

_ADMIN = [require(Scope.ADMIN)]

#: Longest a stack dump request waits for the worker (seconds).
MAX_STACKS_WAIT_S = 10.0
_POLL_S = 0.05

_TIMEOUT: dict[int | str, dict[str, Any]] = {
    504: {
        "description": "The worker did not answer in time.",
        "content": {PROBLEM_JSON: {"schema": {"$ref": "#/components/schemas/Problem"}}},
    }
}


class PoolOut(BaseModel):
    size: int = Field(description="Connections the pool keeps.")
    checked_out: int = Field(description="In use now.")
    checked_in: int = Field(description="Idle in the pool.")
    overflow: int = Field(description="Opened beyond `size` (negative: not yet opened up to it).")


class DatabaseOut(BaseModel):
    server: dict[str, Any] = Field(description="version, max_connections, database_bytes, connections.")
    pool: PoolOut = Field(description="This API process's connection pool.")
    tables: list[dict[str, Any]] = Field(description="pg_stat_user_tables of the conveyor tables, with sizes.")
    connections: list[dict[str, Any]] = Field(description="Sessions on this database by state and application.")


class LocksOut(BaseModel):
    total: int = Field(description="Locks held or awaited on this database (other than this request's).")
    items: list[dict[str, Any]] = Field(description="Waiting locks first, then by transaction age.")


class StacksOut(BaseModel):
    worker_id: UUID
    answered_at: datetime
    dump: dict[str, Any] = Field(
        description="pid, host, taken_at; threads (name, stack); asyncio tasks (name, coroutine, await chain)."
    )


@router.get("/db", dependencies=_ADMIN)
async def debug_database(ops: OpsDep) -> DatabaseOut:
    """Server facts, this process's pool, per-table statistics (live and dead rows, scans, vacuums,
    sizes) of Conveyor's tables, and the sessions on the database."""
    stats = await ops.debug.database()
    pool: Any = ops.app.runtime().engine.pool
    return DatabaseOut(
        server=stats.server,
        pool=PoolOut(
            size=int(pool.size()),
            checked_out=int(pool.checkedout()),
            checked_in=int(pool.checkedin()),
            overflow=int(pool.overflow()),
        ),
        tables=stats.tables,
        connections=stats.connections,
    )


@router.get("/locks", dependencies=_ADMIN)
async def debug_locks(
    ops: OpsDep, limit: Annotated[int, Query(ge=1, le=1000, description="Locks to list.")] = 100
) -> LocksOut:
    """Locks on this database (pg_locks with the sessions holding or awaiting them), waiting ones
    first, with what blocks them. Query text is shown for Conveyor's own sessions only."""
    locks = await ops.debug.locks(limit)
    return LocksOut(total=locks.total, items=locks.items)


@router.get("/workers/{worker_id}/stacks", dependencies=_ADMIN, responses={**problems(404, 409), **_TIMEOUT})
async def debug_worker_stacks(
    request: Request,
    ops: OpsDep,
    worker_id: Annotated[UUID, Path(description="The worker id.")],
    timeout_s: Annotated[
        float,
        Query(gt=0, le=MAX_STACKS_WAIT_S, allow_inf_nan=False, description="Seconds to wait for the worker."),
    ] = 5.0,
) -> StacksOut:
    """Every thread's stack and every asyncio task's await chain of a live worker process. The request
    goes through the database: the worker sees it at its next heartbeat and writes its dump back; this
    waits up to `timeout_s` seconds for it (504 past that)."""
    worker = await ops.app.runtime().workers.get(str(worker_id))
    if worker is None:
        raise ApiProblem(404, f"no worker with id {worker_id}", kind="worker-not-found")
    lease_s = ops.app.settings.worker.lease_timeout_s
    if worker.state == "stopped":
        raise ApiProblem(409, f"worker {worker_id} has stopped", kind="worker-stopped")
    if worker.heartbeat_age_s is not None and worker.heartbeat_age_s > lease_s:
        detail = f"worker {worker_id} has not sent a heartbeat for {worker.heartbeat_age_s:.0f} s: it cannot answer"
        raise ApiProblem(409, detail, kind="worker-silent")
    request_id = await ops.debug.request(str(worker_id), "stacks", ttl_s=timeout_s + 1.0)
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            answer = await ops.debug.answer_of(request_id)
            if answer is not None:
                answered_at, dump = answer
                return StacksOut(worker_id=worker_id, answered_at=answered_at, dump=dump)
            if time.monotonic() >= deadline or await request.is_disconnected():
                break
            await asyncio.sleep(_POLL_S)
    finally:
        await ops.debug.discard(request_id)
    detail = f"worker {worker_id} did not answer within {timeout_s:g} s (it answers at its next heartbeat)"
    raise ApiProblem(504, detail, kind="worker-timeout")
