"""The worker registry: who is running, where, on what; read by operators, written by workers."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Double, Interval, delete, func, literal, select, update
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.ext.asyncio import AsyncEngine

from conveyor.db.errors import translated
from conveyor.db.models import tasks, workers

# clock_timestamp(), not now(): now() is this transaction's start, and a heartbeat committed after it (but
# before this statement's snapshot) would come out with a negative age.
_HEARTBEAT_AGE_S = (
    func.greatest(0.0, func.extract("epoch", func.clock_timestamp() - workers.c.last_heartbeat_at))
    .cast(Double)
    .label("heartbeat_age_s")
)


@dataclass(frozen=True)
class WorkerRecord:
    id: str
    name: str
    host: str
    pid: int
    queues: list[str]
    concurrency: int
    task_names: list[str]
    state: str
    paused: bool
    drain_requested: bool
    started_at: datetime
    last_heartbeat_at: datetime
    stopped_at: datetime | None
    metadata: dict[str, Any]
    running_task_ids: list[int]
    heartbeat_age_s: float | None = None  # seconds since the last heartbeat, on the database clock


class WorkerStore:
    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine

    @translated
    async def register(
        self,
        *,
        worker_id: str,
        name: str,
        host: str,
        pid: int,
        queues: Sequence[str],
        concurrency: int,
        task_names: Sequence[str],
        metadata: dict[str, Any],
    ) -> None:
        values = {
            "id": worker_id,
            "name": name,
            "host": host,
            "pid": pid,
            "queues": list(queues),
            "concurrency": concurrency,
            "task_names": list(task_names),
            "metadata": metadata,
            "state": "running",
        }
        async with self.engine.begin() as conn:
            await conn.execute(
                insert(workers).values(**values).on_conflict_do_update(index_elements=["id"], set_=values)
            )

    @translated
    async def mark_stopped(self, worker_id: str) -> None:
        async with self.engine.begin() as conn:
            await conn.execute(
                update(workers).where(workers.c.id == worker_id).values(state="stopped", stopped_at=func.now())
            )

    @translated
    async def list(self) -> list[WorkerRecord]:
        running = (
            select(tasks.c.worker_id, func.array_agg(tasks.c.id).label("ids"))
            .where(tasks.c.state == "running")
            .group_by(tasks.c.worker_id)
            .subquery()
        )
        query = (
            select(workers, running.c.ids, _HEARTBEAT_AGE_S)
            .select_from(workers.outerjoin(running, running.c.worker_id == workers.c.id))
            .order_by(workers.c.started_at.desc())
        )
        async with self.engine.connect() as conn:
            rows = (await conn.execute(query)).mappings().all()
        return [
            WorkerRecord(
                **{k: v for k, v in row.items() if k != "ids" and k in WorkerRecord.__dataclass_fields__},
                running_task_ids=sorted(row["ids"] or []),
            )
            for row in rows
        ]

    @translated
    async def forget(self, worker_id: str) -> bool:
        async with self.engine.begin() as conn:
            result = await conn.execute(delete(workers).where(workers.c.id == worker_id))
        return bool(result.rowcount)

    # -- operator actions (the HTTP API) ---------------------------------------------------------

    async def get(self, worker_id: str) -> WorkerRecord | None:
        """One worker with the ids of the tasks it is running; ``None`` if there is no such worker."""
        async with self.engine.connect() as conn:
            row = (await conn.execute(select(workers, _HEARTBEAT_AGE_S).where(workers.c.id == worker_id))).mappings()
            found = row.first()
            if found is None:
                return None
            running = await conn.execute(
                select(tasks.c.id)
                .where(tasks.c.state == "running", tasks.c.worker_id == worker_id)
                .order_by(tasks.c.id)
            )
            ids = [int(i) for i in running.scalars()]
        fields = {k: v for k, v in found.items() if k in WorkerRecord.__dataclass_fields__}
        return WorkerRecord(**{**fields, "running_task_ids": ids})

    async def set_paused(self, worker_id: str, paused: bool) -> bool:
        """Ask a worker to stop (or start again) claiming; it sees this at its next heartbeat.
        False if there is no such worker."""
        return await self._set(worker_id, paused=paused)

    async def request_drain(self, worker_id: str) -> bool:
        """Ask a worker to finish what it runs and exit; it sees this at its next heartbeat."""
        return await self._set(worker_id, drain_requested=True)

    async def forget_if_gone(self, worker_id: str, stale_after_s: float) -> bool:
        """Delete a worker that stopped, or whose heartbeat is older than ``stale_after_s`` seconds
        (database clock); a live worker is kept. True if it was deleted.

        Its tasks are unaffected: recovery follows task leases, not worker rows."""
        stale = workers.c.last_heartbeat_at < func.now() - literal(timedelta(seconds=stale_after_s), Interval())
        async with self.engine.begin() as conn:
            result = await conn.execute(
                delete(workers).where(workers.c.id == worker_id, (workers.c.state == "stopped") | stale)
            )
        return bool(result.rowcount)

    async def _set(self, worker_id: str, **values: Any) -> bool:
        async with self.engine.begin() as conn:
            result = await conn.execute(update(workers).where(workers.c.id == worker_id).values(**values))
        return bool(result.rowcount)
