"""The reads behind the event stream: task events and new tasks by id, and the worker registry.

Not every change NOTIFYs (and NOTIFY payloads are small and lost while nobody listens), so the stream
polls: rows of ``conveyor_task_events`` and ``conveyor_tasks`` after the last id seen, walking their
primary keys (an enqueue writes no event row; the new task row is the "enqueued" event). Each read is
bounded by a page size, and an event's ``detail`` loses its traceback on the way (the task keeps it).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy.ext.asyncio import AsyncEngine

from conveyor.db.errors import translate_errors
from conveyor.db.executors import Row, execute_async

#: Larger than any id: "no upper bound".
NO_LIMIT_ID = 2**63 - 1

_HIGH_WATER = """
SELECT COALESCE((SELECT max(id) FROM conveyor_task_events), 0) AS event_id,
       COALESCE((SELECT max(id) FROM conveyor_tasks), 0) AS task_id
"""

_EVENT_COLUMNS = """
SELECT e.id, e.task_id, e.kind, e.at, e.attempt, e.worker_id::text AS worker_id,
       e.detail #- '{error,traceback}' AS detail, t.queue, t.name, t.state
FROM conveyor_task_events e JOIN conveyor_tasks t ON t.id = e.task_id
"""
_EVENTS_AFTER = _EVENT_COLUMNS + "WHERE e.id > %(after)s AND e.id <= %(upto)s ORDER BY e.id LIMIT %(limit)s"
_EVENTS_BY_ID = _EVENT_COLUMNS + "WHERE e.id = ANY(%(ids)s::bigint[]) ORDER BY e.id"

_TASK_COLUMNS = "SELECT id, name, queue, state, priority, created_at FROM conveyor_tasks "
_TASKS_AFTER = _TASK_COLUMNS + "WHERE id > %(after)s AND id <= %(upto)s ORDER BY id LIMIT %(limit)s"
_TASKS_BY_ID = _TASK_COLUMNS + "WHERE id = ANY(%(ids)s::bigint[]) ORDER BY id"

# Live workers, and those that stopped recently (so their stop is seen); not the whole history.
_WORKERS = """
SELECT id::text AS id, name, host, pid, queues, state, paused, drain_requested,
       last_heartbeat_at > now() - make_interval(secs => %(stale_s)s) AS alive,
       last_heartbeat_at, stopped_at
FROM conveyor_workers
WHERE state <> 'stopped' OR stopped_at > now() - interval '10 minutes'
"""


@dataclass(frozen=True)
class TaskEventRow:
    id: int
    task_id: int
    kind: str
    at: datetime
    attempt: int
    worker_id: str | None
    detail: Any
    queue: str
    name: str
    state: str


@dataclass(frozen=True)
class NewTaskRow:
    id: int
    name: str
    queue: str
    state: str
    priority: int
    created_at: datetime


@dataclass(frozen=True)
class WorkerRow:
    id: str
    name: str
    host: str
    pid: int
    queues: list[str]
    state: str
    paused: bool
    drain_requested: bool
    alive: bool
    last_heartbeat_at: datetime
    stopped_at: datetime | None


class EventFeed:
    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine

    async def high_water(self) -> tuple[int, int]:
        """The newest task event id and task id (0 when there are none)."""
        rows = await self._rows(_HIGH_WATER, {})
        return int(rows[0]["event_id"]), int(rows[0]["task_id"])

    async def events(self, after: int, limit: int, upto: int = NO_LIMIT_ID) -> list[TaskEventRow]:
        rows = await self._rows(_EVENTS_AFTER, {"after": after, "upto": upto, "limit": limit})
        return [TaskEventRow(**r) for r in rows]

    async def events_by_id(self, ids: Sequence[int]) -> list[TaskEventRow]:
        return [TaskEventRow(**r) for r in await self._rows(_EVENTS_BY_ID, {"ids": list(ids)})] if ids else []

    async def new_tasks(self, after: int, limit: int, upto: int = NO_LIMIT_ID) -> list[NewTaskRow]:
        rows = await self._rows(_TASKS_AFTER, {"after": after, "upto": upto, "limit": limit})
        return [NewTaskRow(**r) for r in rows]

    async def new_tasks_by_id(self, ids: Sequence[int]) -> list[NewTaskRow]:
        return [NewTaskRow(**r) for r in await self._rows(_TASKS_BY_ID, {"ids": list(ids)})] if ids else []

    async def workers(self, stale_after_s: float) -> list[WorkerRow]:
        return [WorkerRow(**r) for r in await self._rows(_WORKERS, {"stale_s": stale_after_s})]

    async def _rows(self, sql: str, params: dict[str, Any]) -> list[Row]:
        with translate_errors():
            async with self.engine.connect() as conn:
                return await execute_async(conn, sql, params)
