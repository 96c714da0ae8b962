"""Dead letters: tasks that failed for good, retried or deleted in bulk by a filter.

The filter is the search filter (queue, name, error type or text, time ranges, JSON conditions), always
narrowed to ``state = 'dead'``. Matches are walked in id order a batch at a time, each batch its own
short transaction whose statement re-checks ``state = 'dead'`` on the rows it locks, so a task retried
or deleted by someone else in between is left alone rather than acted on twice.
"""

from __future__ import annotations

from dataclasses import dataclass

import sqlalchemy.exc
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncEngine

from conveyor.core.states import UNIQUE_HOLDING_STATES, TaskState
from conveyor.db.errors import translate_errors
from conveyor.db.executors import execute_async
from conveyor.db.models import tasks
from conveyor.db.search_store import REJECTED_INPUT, InvalidSearch, SearchFilter, first_line
from conveyor.db.task_sql import WAKEUP_CHANNEL
from conveyor.errors import InvalidTransition

#: Tasks acted on per transaction.
DEAD_BATCH = 1_000

_HOLDING = [s.value for s in UNIQUE_HOLDING_STATES]

# Retry a batch of dead tasks (what TaskStore.retry does for one): queued again now, with at least one
# attempt left. A task whose unique key another unfinished task holds is left dead, and of several in
# the batch sharing a key only the newest goes (the partial unique index would refuse the others).
_RETRY_DEAD = """
WITH locked AS (
    SELECT id, unique_key FROM conveyor_tasks
    WHERE id = ANY(%(ids)s::bigint[]) AND state = 'dead'
    ORDER BY id FOR UPDATE
),
eligible AS (
    SELECT id FROM locked WHERE unique_key IS NULL
    UNION ALL
    (SELECT DISTINCT ON (unique_key) id FROM locked l
     WHERE unique_key IS NOT NULL
       AND NOT EXISTS (SELECT 1 FROM conveyor_tasks h
                       WHERE h.unique_key = l.unique_key AND h.state = ANY(%(holding)s::text[]))
     ORDER BY unique_key, id DESC)
),
retried AS (
    UPDATE conveyor_tasks t
    SET state = 'queued', run_at = now(), finished_at = NULL, result = NULL, worker_losses = 0,
        cancel_requested = false, max_attempts = GREATEST(t.max_attempts, t.attempt + 1)
    FROM eligible WHERE t.id = eligible.id AND t.state = 'dead'
    RETURNING t.id, t.attempt, t.queue
),
events AS (
    INSERT INTO conveyor_task_events (task_id, kind, attempt, detail)
    SELECT id, 'retried', attempt, '{"previous_state": "dead", "bulk": true}'::jsonb FROM retried
),
woken AS (
    SELECT pg_notify(%(channel)s, queue) FROM (SELECT DISTINCT queue FROM retried) q
)
SELECT count(*) AS n, (SELECT count(*) FROM woken) AS woken FROM retried
"""

_DELETE_DEAD = """
WITH doomed AS (
    SELECT id FROM conveyor_tasks WHERE id = ANY(%(ids)s::bigint[]) AND state = 'dead'
    ORDER BY id FOR UPDATE SKIP LOCKED
),
deleted AS (
    DELETE FROM conveyor_tasks t USING doomed WHERE t.id = doomed.id AND t.state = 'dead' RETURNING t.id
)
SELECT count(*) AS n FROM deleted
"""


@dataclass(frozen=True)
class DeadReport:
    matched: int  # dead tasks the filter selected
    acted: int  # retried (or deleted)
    more: bool  # the filter matched more than the limit: call again for the rest


class DeadStore:
    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine

    async def retry(self, task_filter: SearchFilter, *, limit: int) -> DeadReport:
        """Queue again up to ``limit`` dead tasks matching ``task_filter``."""
        return await self._each_batch(task_filter, limit, _RETRY_DEAD)

    async def delete(self, task_filter: SearchFilter, *, limit: int) -> DeadReport:
        """Delete up to ``limit`` dead tasks matching ``task_filter``, with their history."""
        return await self._each_batch(task_filter, limit, _DELETE_DEAD)

    async def _each_batch(self, task_filter: SearchFilter, limit: int, statement: str) -> DeadReport:
        matched = acted = 0
        last_id = 0
        more = False
        while matched < limit:
            size = min(DEAD_BATCH, limit - matched)
            # In id order, so a task left dead (its unique key is held) is not selected again.
            query = (
                select(tasks.c.id)
                .where(*task_filter.clauses(), tasks.c.state == TaskState.DEAD.value, tasks.c.id > last_id)
                .order_by(tasks.c.id)
                .limit(size)
            )
            try:
                async with self.engine.connect() as conn:
                    batch = [int(i) for i in (await conn.execute(query)).scalars()]
            except sqlalchemy.exc.DBAPIError as exc:
                if isinstance(exc.orig, REJECTED_INPUT):
                    raise InvalidSearch("body.filter", first_line(exc.orig)) from None
                with translate_errors():
                    raise
            except OSError:
                with translate_errors():
                    raise
            if not batch:
                break
            matched += len(batch)
            last_id = batch[-1]
            acted += await self._run(statement, batch)
            if len(batch) < size:
                break
            more = matched >= limit
        return DeadReport(matched=matched, acted=acted, more=more)

    async def _run(self, statement: str, ids: list[int]) -> int:
        params = {"ids": ids, "holding": _HOLDING, "channel": WAKEUP_CHANNEL}
        # A concurrent enqueue can take a unique key between the check and the update; the batch is then
        # run again, and the check leaves that task out.
        for attempt in range(3):
            try:
                with translate_errors():
                    async with self.engine.begin() as conn:
                        rows = await execute_async(conn, statement, params)
                return int(rows[0]["n"]) if rows else 0
            except IntegrityError:
                if attempt == 2:
                    raise InvalidTransition(-1, "contended", "retry (unique keys kept changing hands)") from None
        return 0  # pragma: no cover - the loop always returns or raises
