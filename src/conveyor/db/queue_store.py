"""Queues: their statistics, and the settings operators give them (pause, limits), plus purge.

Statistics must stay cheap at millions of rows (a dashboard that times out is no dashboard):

* depth per state is one ``count(*) GROUP BY queue, state`` answered by an index-only scan of
  ``ix_conveyor_tasks_state_queue``, never by reading task rows;
* the oldest waiting task per queue comes from the partial claim index, which holds waiting tasks only;
* throughput reads the last minute of ``ix_conveyor_tasks_finished_at``;
* the queries run concurrently, each on its own pooled connection.

A pause is a row in ``conveyor_queues``: it survives restarts, and the claim statement leaves paused
queues out, so every worker honours it at its next claim. Limits live on the same row; workers enforce
them together (:mod:`conveyor.db.limit_sql`) and notice a change within about a second.
"""

from __future__ import annotations

import asyncio
import enum
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Final

from sqlalchemy import func
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.ext.asyncio import AsyncEngine

from conveyor.core.states import TaskState
from conveyor.db.errors import translate_errors
from conveyor.db.executors import Row, execute_async
from conveyor.db.models import queues


class _Keep(enum.Enum):
    KEEP = "keep"


#: For :meth:`QueueStore.set_limits`: leave this limit as it is.
KEEP: Final = _Keep.KEEP

#: Seconds of history that "recent throughput" covers.
THROUGHPUT_WINDOW_S = 60.0

#: States a purge may delete. Running tasks belong to a worker, blocked ones to a workflow.
PURGEABLE_STATES = frozenset(
    {TaskState.SCHEDULED, TaskState.QUEUED, TaskState.SUCCEEDED, TaskState.DEAD, TaskState.CANCELLED}
)


@dataclass(frozen=True)
class QueueStats:
    name: str
    paused: bool = False
    concurrency_limit: int | None = None
    rate_limit_per_s: float | None = None
    counts: dict[str, int] = field(default_factory=lambda: {s.value: 0 for s in TaskState})
    oldest_waiting_age_s: float | None = None  # how long the longest-waiting due task has waited
    succeeded_last_minute: int = 0
    dead_last_minute: int = 0
    workers: int = 0  # live workers consuming this queue


# The `(%(queue)s::text IS NULL OR ...)` form is not used: each statement comes in an all-queues and a
# one-queue spelling so that the planner sees a plain equality and picks the index for it.
_COUNTS = "SELECT queue, state, count(*) AS n FROM conveyor_tasks {where} GROUP BY queue, state"
_OLDEST = (
    "SELECT queue, EXTRACT(EPOCH FROM now() - min(run_at))::float8 AS age_s FROM conveyor_tasks "
    "WHERE state IN ('scheduled', 'queued') AND run_at <= now() {and_queue} GROUP BY queue"
)
_RECENT = (
    "SELECT queue, state, count(*) AS n FROM conveyor_tasks "
    "WHERE finished_at IS NOT NULL AND finished_at > now() - make_interval(secs => %(window_s)s) "
    "AND state IN ('succeeded', 'dead') {and_queue} GROUP BY queue, state"
)
_CONFIG = "SELECT name, paused, concurrency_limit, rate_limit_per_s FROM conveyor_queues {where}"
_WORKERS = (
    "SELECT q AS queue, count(*) AS n FROM conveyor_workers w, unnest(w.queues) AS q "
    "WHERE w.state <> 'stopped' AND w.last_heartbeat_at > now() - make_interval(secs => %(stale_s)s) "
    "{and_queue} GROUP BY q"
)

_PURGE = """
WITH doomed AS (
    SELECT id FROM conveyor_tasks
    WHERE queue = %(queue)s AND state = ANY(%(states)s::text[])
    ORDER BY id LIMIT %(limit)s
    FOR UPDATE SKIP LOCKED
)
DELETE FROM conveyor_tasks t USING doomed
WHERE t.id = doomed.id AND t.state = ANY(%(states)s::text[])
RETURNING t.id
"""


class QueueStore:
    def __init__(self, engine: AsyncEngine, *, worker_stale_after_s: float = 30.0) -> None:
        self.engine = engine
        #: A worker whose last heartbeat is older than this is not counted as consuming its queues.
        self.worker_stale_after_s = worker_stale_after_s

    async def stats(self, name: str | None = None) -> list[QueueStats]:
        """Statistics of every known queue (``name``: of that queue only; empty if it is unknown).

        A queue is known when it holds tasks, has settings, or a live worker consumes it."""
        where = "" if name is None else "WHERE queue = %(queue)s"
        and_queue = "" if name is None else "AND queue = %(queue)s"
        params: dict[str, Any] = {
            "queue": name,
            "window_s": THROUGHPUT_WINDOW_S,
            "stale_s": self.worker_stale_after_s,
        }
        counts, oldest, recent, config, consumers = await asyncio.gather(
            self._rows(_COUNTS.format(where=where), params),
            self._rows(_OLDEST.format(and_queue=and_queue), params),
            self._rows(_RECENT.format(and_queue=and_queue), params),
            self._rows(_CONFIG.format(where="" if name is None else "WHERE name = %(queue)s"), params),
            self._rows(_WORKERS.format(and_queue="" if name is None else "AND q = %(queue)s"), params),
        )
        found: dict[str, dict[str, Any]] = {}

        def entry(queue: str) -> dict[str, Any]:
            return found.setdefault(queue, {"name": queue, "counts": {s.value: 0 for s in TaskState}})

        for row in counts:
            entry(row["queue"])["counts"][row["state"]] = int(row["n"])
        for row in oldest:
            entry(row["queue"])["oldest_waiting_age_s"] = max(0.0, float(row["age_s"]))
        for row in recent:
            key = "succeeded_last_minute" if row["state"] == TaskState.SUCCEEDED else "dead_last_minute"
            entry(row["queue"])[key] = int(row["n"])
        for row in config:
            entry(row["name"]).update(
                paused=row["paused"],
                concurrency_limit=row["concurrency_limit"],
                rate_limit_per_s=row["rate_limit_per_s"],
            )
        for row in consumers:
            entry(row["queue"])["workers"] = int(row["n"])
        return [QueueStats(**found[queue]) for queue in sorted(found)]

    async def get(self, name: str) -> QueueStats | None:
        found = await self.stats(name)
        return found[0] if found else None

    async def set_paused(self, name: str, paused: bool) -> None:
        """Pause or resume a queue (known or not yet: a queue can be paused before its first task)."""
        await self._upsert(name, {"paused": paused})

    async def set_limits(
        self,
        name: str,
        *,
        concurrency_limit: int | _Keep | None = KEEP,
        rate_limit_per_s: float | _Keep | None = KEEP,
    ) -> None:
        """Set the queue's limits, enforced by all workers together: at most ``concurrency_limit``
        tasks running at once, and task starts at ``rate_limit_per_s`` on average (bursts of up to
        max(1, rate) at once). None removes a limit; :data:`KEEP` (the default) leaves it as it is."""
        given = {"concurrency_limit": concurrency_limit, "rate_limit_per_s": rate_limit_per_s}
        values = {column: value for column, value in given.items() if value is not KEEP}
        if values:
            await self._upsert(name, values)

    async def purge(self, name: str, states: Sequence[TaskState], batch: int = 1000) -> int:
        """Delete the queue's tasks in ``states`` (with their history), in batches; returns how many.

        Tasks a worker is claiming at this moment are skipped: they are about to run."""
        wanted = [s.value for s in states if s in PURGEABLE_STATES]
        if not wanted:
            return 0
        total = 0
        while True:
            async with self.engine.begin() as conn:
                with translate_errors():
                    rows = await execute_async(conn, _PURGE, {"queue": name, "states": wanted, "limit": batch})
            total += len(rows)
            if len(rows) < batch:
                return total

    async def _upsert(self, name: str, values: dict[str, Any]) -> None:
        statement = (
            insert(queues)
            .values(name=name, **values)
            .on_conflict_do_update(index_elements=[queues.c.name], set_={**values, "updated_at": func.now()})
        )
        with translate_errors():
            async with self.engine.begin() as conn:
                await conn.execute(statement)

    async def _rows(self, sql: str, params: dict[str, Any]) -> list[Row]:
        with translate_errors():
            async with self.engine.connect() as conn:
                return await execute_async(conn, sql, params)
