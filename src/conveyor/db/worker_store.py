"""The worker registry: who is running, where, on what; read by operators, written by workers."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import delete, func, select, update
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.ext.asyncio import AsyncEngine

from conveyor.db.models import tasks, workers


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


class WorkerStore:
    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine

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

    async def mark_stopped(self, worker_id: str) -> None:
        async with self.engine.begin() as conn:
            await conn.execute(
                update(workers).where(workers.c.id == worker_id).values(state="stopped", stopped_at=func.now())
            )

    async def list(self) -> list[WorkerRecord]:
        running = (
            select(tasks.c.worker_id, func.array_agg(tasks.c.id).label("ids"))
            .where(tasks.c.state == "running")
            .group_by(tasks.c.worker_id)
            .subquery()
        )
        query = (
            select(workers, running.c.ids)
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

    async def forget(self, worker_id: str) -> bool:
        async with self.engine.begin() as conn:
            result = await conn.execute(delete(workers).where(workers.c.id == worker_id))
        return bool(result.rowcount)
