"""Task lists, edits and bulk actions for operators (the HTTP API, the dashboard).

Lists are keyset-paginated: a page continues after the ``(sort value, id)`` of the previous page's last
row, so page 1,000 costs what page 1 costs, and the sort column comes from :data:`SORT_COLUMNS`, never
from request text. Every filter value is a bound parameter. Edits are guarded ``UPDATE``s (the state is
part of the ``WHERE``), so a task a worker claims meanwhile is left alone and reported as a conflict.
Bulk actions run in batches, each its own short transaction.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import ColumnElement, Interval, case, delete, func, literal, select, text, tuple_
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from conveyor.core.records import TaskRecord
from conveyor.core.states import CANCELLABLE_AT_REST, RETRYABLE_STATES, UNIQUE_HOLDING_STATES, TaskState
from conveyor.db.errors import translate_errors
from conveyor.db.executors import execute_async
from conveyor.db.models import tasks
from conveyor.db.task_sql import WAKEUP_CHANNEL
from conveyor.db.task_store import record_from_row
from conveyor.errors import InvalidTransition, TaskNotFound

#: The columns a list may be sorted by, each paired with ``id`` so the order is total, and each backed
#: by an index so a page is an index walk, never a sort of every matching row:
#:
#: * ``id``: creation order (``created_at`` has a BRIN index: it filters time ranges, it cannot order);
#: * ``finished_at``: finished tasks only (``ix_conveyor_tasks_finished_at``);
#: * ``run_at``: waiting tasks only, so the filter must name scheduled and/or queued
#:   (``ix_conveyor_tasks_waiting_run_at``).
SORT_COLUMNS: Mapping[str, Any] = {
    "id": tasks.c.id,
    "finished_at": tasks.c.finished_at,
    "run_at": tasks.c.run_at,
}
_WAITING = frozenset({TaskState.SCHEDULED, TaskState.QUEUED})
_WAITING_PREDICATE = "state IN ('scheduled', 'queued')"  # ix_conveyor_tasks_waiting_run_at's

#: Rows changed per transaction by bulk actions: large enough to amortise round trips, small enough
#: that locks are held briefly and a failure loses little.
BULK_BATCH = 1000

_EDITABLE = (TaskState.SCHEDULED.value, TaskState.QUEUED.value)
_CANCELLABLE = [s.value for s in (*CANCELLABLE_AT_REST, TaskState.RUNNING)]
_AT_REST = [s.value for s in CANCELLABLE_AT_REST]
_RETRYABLE = [s.value for s in RETRYABLE_STATES]
_HOLDING = [s.value for s in UNIQUE_HOLDING_STATES]


@dataclass(frozen=True)
class TaskFilter:
    """Which tasks: every given criterion must hold (values within one criterion are alternatives)."""

    states: tuple[TaskState, ...] = ()
    queues: tuple[str, ...] = ()
    names: tuple[str, ...] = ()
    created_after: datetime | None = None
    created_before: datetime | None = None
    worker_id: str | None = None

    def is_empty(self) -> bool:
        return not (
            self.states or self.queues or self.names or self.created_after or self.created_before or self.worker_id
        )

    def clauses(self) -> list[ColumnElement[bool]]:
        where: list[ColumnElement[bool]] = []
        if self.states:
            where.append(tasks.c.state.in_([s.value for s in self.states]))
        if self.queues:
            where.append(tasks.c.queue.in_(self.queues))
        if self.names:
            where.append(tasks.c.name.in_(self.names))
        if self.created_after is not None:
            where.append(tasks.c.created_at >= self.created_after)
        if self.created_before is not None:
            where.append(tasks.c.created_at < self.created_before)
        if self.worker_id is not None:
            where.append(tasks.c.worker_id == self.worker_id)
        return where


@dataclass(frozen=True)
class Sort:
    field: str  # a key of SORT_COLUMNS
    descending: bool = True

    def __post_init__(self) -> None:
        if self.field not in SORT_COLUMNS:
            raise ValueError(f"cannot sort by {self.field!r}; choose one of {', '.join(SORT_COLUMNS)}")


@dataclass(frozen=True)
class Keyset:
    """Where the previous page ended: its last row's sort value and id."""

    value: int | datetime
    id: int  # ties on value are broken by id


@dataclass(frozen=True)
class TaskSummary:
    """A task as lists show it: no arguments, result or traceback (they can be large)."""

    id: int
    name: str
    queue: str
    state: TaskState
    priority: int
    attempt: int
    max_attempts: int
    worker_id: str | None
    cancel_requested: bool
    error_type: str | None
    run_at: datetime
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None


@dataclass(frozen=True)
class TaskPage:
    items: list[TaskSummary]
    next: Keyset | None  # None: this is the last page


@dataclass(frozen=True)
class BulkCancelReport:
    matched: int  # tasks selected (ids given, or tasks matching the filter)
    cancelled: int  # stopped at once (they were not running)
    cancel_requested: int  # running: their worker was asked to stop them
    more: bool = False  # the filter matched `limit` tasks: there may be more (call again)


@dataclass(frozen=True)
class BulkRetryReport:
    matched: int
    retried: int
    more: bool = False


@dataclass
class _Progress:
    matched: int = 0
    counts: dict[str, int] = field(default_factory=dict)

    def add(self, row: Mapping[str, Any]) -> None:
        for key, value in row.items():
            self.counts[key] = self.counts.get(key, 0) + int(value)


_SUMMARY_COLUMNS = (
    tasks.c.id,
    tasks.c.name,
    tasks.c.queue,
    tasks.c.state,
    tasks.c.priority,
    tasks.c.attempt,
    tasks.c.max_attempts,
    tasks.c.worker_id,
    tasks.c.cancel_requested,
    tasks.c.last_error["type"].astext.label("error_type"),
    tasks.c.run_at,
    tasks.c.created_at,
    tasks.c.started_at,
    tasks.c.finished_at,
)


class TaskQueries:
    """Operator reads and actions on tasks. Hot-path statements (claim, finish) live in ``task_sql``."""

    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine

    # -- lists -----------------------------------------------------------------------------------

    async def page(self, task_filter: TaskFilter, sort: Sort, limit: int, after: Keyset | None = None) -> TaskPage:
        """One page of at most ``limit`` tasks in ``sort`` order, continuing after ``after``.

        Raises ``ValueError`` for a sort the filter does not allow (see :data:`SORT_COLUMNS`)."""
        column = SORT_COLUMNS[sort.field]
        query = select(*_SUMMARY_COLUMNS).where(*task_filter.clauses())
        if sort.field == "run_at":
            if not task_filter.states or not set(task_filter.states) <= _WAITING:
                raise ValueError("sorting by run_at needs a state filter of scheduled and/or queued (waiting tasks)")
            # The partial index's own predicate, as constant text: a bound IN list would leave a generic
            # plan unable to prove that the index applies.
            query = query.where(text(_WAITING_PREDICATE))
        elif sort.field == "finished_at":
            query = query.where(tasks.c.finished_at.is_not(None))
        if after is not None:
            query = query.where(_after(column, sort, after))
        order = [column.desc(), tasks.c.id.desc()] if sort.descending else [column.asc(), tasks.c.id.asc()]
        query = query.order_by(*(order[1:] if sort.field == "id" else order)).limit(limit + 1)
        with translate_errors():
            async with self.engine.connect() as conn:
                rows = (await conn.execute(query)).mappings().all()
        items = [_summary(dict(row)) for row in rows[:limit]]
        next_key = None
        if len(rows) > limit:
            last = items[-1]
            next_key = Keyset(getattr(last, sort.field), last.id)
        return TaskPage(items, next_key)

    # -- edits -----------------------------------------------------------------------------------

    async def update(
        self,
        task_id: int,
        *,
        priority: int | None = None,
        run_at: datetime | None = None,
        delay_s: float | None = None,
    ) -> TaskRecord:
        """Change the priority and/or run time of a task that is not running yet (scheduled or queued).

        A run time in the future makes the task scheduled; one that has come makes it queued (and
        wakes the workers). Raises :class:`InvalidTransition` in any other state, changing nothing."""
        values: dict[str, Any] = {}
        if priority is not None:
            values["priority"] = priority
        new_run_at: Any = None
        if run_at is not None:
            new_run_at = literal(run_at, tasks.c.run_at.type)
        elif delay_s is not None:
            # On the database clock, as enqueue's delays are.
            new_run_at = func.now() + literal(timedelta(seconds=delay_s), Interval())
        if new_run_at is not None:
            values["run_at"] = new_run_at
            values["state"] = case((new_run_at > func.now(), TaskState.SCHEDULED.value), else_=TaskState.QUEUED.value)
        if not values:
            raise ValueError("nothing to change: give a priority, a run time or a delay")
        statement = (
            tasks.update()
            .where(tasks.c.id == task_id, tasks.c.state.in_(_EDITABLE))
            .values(**values)
            .returning(tasks.c.id, tasks.c.state, tasks.c.queue, tasks.c.attempt, tasks.c.priority, tasks.c.run_at)
        )
        with translate_errors():
            async with self.engine.begin() as conn:
                before = await _current(conn, task_id)
                row = (await conn.execute(statement)).mappings().first()
                if row is None:
                    raise InvalidTransition(task_id, before["state"], "change")
                detail = {
                    "previous": {"state": before["state"], "priority": before["priority"]},
                    "priority": row["priority"],
                    "run_at": row["run_at"].isoformat(),
                    "state": row["state"],
                }
                await execute_async(
                    conn,
                    "INSERT INTO conveyor_task_events (task_id, kind, attempt, detail) "
                    "VALUES (%(id)s, 'updated', %(attempt)s, %(detail)s::jsonb)",
                    {"id": task_id, "attempt": row["attempt"], "detail": _json(detail)},
                )
                if row["state"] == TaskState.QUEUED.value:
                    await _wake(conn, [row["queue"]])
                result = (await conn.execute(tasks.select().where(tasks.c.id == task_id))).mappings().one()
                return record_from_row(dict(result))

    async def delete(self, task_id: int) -> None:
        """Delete a task and its history. A running task cannot be deleted (cancel it first)."""
        with translate_errors():
            async with self.engine.begin() as conn:
                before = await _current(conn, task_id)
                result = await conn.execute(
                    delete(tasks)
                    .where(tasks.c.id == task_id, tasks.c.state != TaskState.RUNNING.value)
                    .returning(tasks.c.id)
                )
                if result.first() is None:
                    raise InvalidTransition(task_id, before["state"], "delete")

    # -- bulk ------------------------------------------------------------------------------------

    async def bulk_cancel(
        self, *, ids: Sequence[int] = (), task_filter: TaskFilter | None = None, limit: int = 10_000
    ) -> BulkCancelReport:
        """Cancel the given tasks, or up to ``limit`` tasks matching ``task_filter``.

        Tasks at rest are cancelled at once; running ones are asked to stop (their worker cancels
        them at its next heartbeat); finished ones are left as they are."""
        progress = await self._bulk(_BULK_CANCEL, _CANCELLABLE, ids, task_filter, limit)
        return BulkCancelReport(
            matched=progress.matched,
            cancelled=progress.counts.get("cancelled", 0),
            cancel_requested=progress.counts.get("requested", 0),
            more=progress.matched >= limit and task_filter is not None,
        )

    async def bulk_retry(
        self, *, ids: Sequence[int] = (), task_filter: TaskFilter | None = None, limit: int = 10_000
    ) -> BulkRetryReport:
        """Start finished tasks again (dead, cancelled or succeeded), as :meth:`TaskStore.retry` does.

        A task whose unique key another unfinished task now holds is skipped, and of several retried
        tasks sharing a unique key only the newest is started."""
        states = _RETRYABLE
        if task_filter is not None and not task_filter.states:
            states = [TaskState.DEAD.value]  # a filter without states means "the dead ones"
        progress = await self._bulk(_BULK_RETRY, states, ids, task_filter, limit)
        return BulkRetryReport(
            matched=progress.matched,
            retried=progress.counts.get("retried", 0),
            more=progress.matched >= limit and task_filter is not None,
        )

    async def _bulk(
        self,
        statement: str,
        states: list[str],
        ids: Sequence[int],
        task_filter: TaskFilter | None,
        limit: int,
    ) -> _Progress:
        progress = _Progress()
        if task_filter is None:
            unique_ids = sorted(set(ids))
            progress.matched = len(unique_ids)
            for start in range(0, len(unique_ids), BULK_BATCH):
                batch = unique_ids[start : start + BULK_BATCH]
                progress.add(await self._run_batch(statement, batch, states))
            return progress
        wanted = [s for s in states if not task_filter.states or TaskState(s) in task_filter.states]
        if not wanted:
            return progress
        last_id = 0
        while progress.matched < limit:
            size = min(BULK_BATCH, limit - progress.matched)
            # Walk the matches in id order, so a task left in place (a running task asked to cancel) is
            # not selected again, and each batch is found by an index range scan.
            query = (
                select(tasks.c.id)
                .where(*task_filter.clauses(), tasks.c.state.in_(wanted), tasks.c.id > last_id)
                .order_by(tasks.c.id)
                .limit(size)
            )
            with translate_errors():
                async with self.engine.connect() as conn:
                    batch = list((await conn.execute(query)).scalars())
            if not batch:
                break
            progress.matched += len(batch)
            last_id = batch[-1]
            progress.add(await self._run_batch(statement, batch, wanted))
            if len(batch) < size:
                break
        return progress

    async def _run_batch(self, statement: str, ids: list[int], states: list[str]) -> dict[str, Any]:
        params = {
            "ids": ids,
            "states": states,
            "at_rest": _AT_REST,
            "holding": _HOLDING,
            "channel": WAKEUP_CHANNEL,
        }
        # A concurrent enqueue can take a unique key between our check and our update; the batch is
        # then simply run again, and the check leaves that task out.
        for attempt in range(3):
            try:
                with translate_errors():
                    async with self.engine.begin() as conn:
                        rows = await execute_async(conn, statement, params)
                return {k: v for k, v in rows[0].items() if k != "woken"} if rows else {}
            except IntegrityError:
                if attempt == 2:
                    raise InvalidTransition(-1, "contended", "retry (unique keys kept changing hands)") from None
        return {}  # pragma: no cover - the loop always returns or raises


def _after(column: Any, sort: Sort, after: Keyset) -> ColumnElement[bool]:
    if sort.field == "id":
        return tasks.c.id < after.id if sort.descending else tasks.c.id > after.id
    if sort.descending:
        return tuple_(column, tasks.c.id) < tuple_(after.value, after.id)
    return tuple_(column, tasks.c.id) > tuple_(after.value, after.id)


async def _current(conn: AsyncConnection, task_id: int) -> dict[str, Any]:
    row = (
        (await conn.execute(select(tasks.c.state, tasks.c.priority).where(tasks.c.id == task_id).with_for_update()))
        .mappings()
        .first()
    )
    if row is None:
        raise TaskNotFound(task_id)
    return dict(row)


async def _wake(conn: AsyncConnection, queues: Sequence[str]) -> None:
    for queue in sorted(set(queues)):
        await execute_async(
            conn, "SELECT pg_notify(%(channel)s, %(queue)s)", {"channel": WAKEUP_CHANNEL, "queue": queue}
        )


def _summary(row: Mapping[str, Any]) -> TaskSummary:
    return TaskSummary(
        id=int(row["id"]),
        name=row["name"],
        queue=row["queue"],
        state=TaskState(row["state"]),
        priority=row["priority"],
        attempt=row["attempt"],
        max_attempts=row["max_attempts"],
        worker_id=None if row["worker_id"] is None else str(row["worker_id"]),
        cancel_requested=row["cancel_requested"],
        error_type=row["error_type"],
        run_at=row["run_at"],
        created_at=row["created_at"],
        started_at=row["started_at"],
        finished_at=row["finished_at"],
    )


def _json(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"))


# Cancel a batch of tasks by id, in one statement: those at rest are cancelled, running ones are asked
# to stop, finished ones are untouched. The state guards sit on the updated rows themselves, so a
# row that changed state after the batch was chosen is re-checked as it is locked (READ COMMITTED
# re-evaluates the WHERE on the newest version) and left alone if it no longer qualifies.
_BULK_CANCEL = """
WITH target AS (
    SELECT id, state FROM conveyor_tasks WHERE id = ANY(%(ids)s::bigint[]) AND state = ANY(%(states)s::text[])
    ORDER BY id FOR UPDATE
),
cancelled AS (
    UPDATE conveyor_tasks t SET state = 'cancelled', finished_at = now()
    FROM target WHERE t.id = target.id AND t.state = ANY(%(at_rest)s::text[])
    RETURNING t.id, t.attempt, target.state AS previous_state
),
requested AS (
    UPDATE conveyor_tasks t SET cancel_requested = true
    FROM target WHERE t.id = target.id AND t.state = 'running' AND NOT t.cancel_requested
    RETURNING t.id, t.attempt
),
events AS (
    INSERT INTO conveyor_task_events (task_id, kind, attempt, detail)
    SELECT id, 'cancelled', attempt, jsonb_build_object('previous_state', previous_state, 'bulk', true) FROM cancelled
    UNION ALL
    SELECT id, 'cancel_requested', attempt, '{"bulk": true}'::jsonb FROM requested
)
SELECT (SELECT count(*) FROM cancelled) AS cancelled, (SELECT count(*) FROM requested) AS requested
"""

# Retry a batch of finished tasks by id (what TaskStore.retry does for one). A task is left out when
# another unfinished task holds its unique key, and of several in the batch sharing a key only the
# newest goes: the partial unique index would refuse the rest.
_BULK_RETRY = """
WITH locked AS (
    SELECT id, state, unique_key FROM conveyor_tasks
    WHERE id = ANY(%(ids)s::bigint[]) AND state = ANY(%(states)s::text[])
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
    FROM eligible, locked
    WHERE t.id = eligible.id AND locked.id = eligible.id AND t.state = ANY(%(states)s::text[])
    RETURNING t.id, t.attempt, t.queue, locked.state AS previous_state
),
events AS (
    INSERT INTO conveyor_task_events (task_id, kind, attempt, detail)
    SELECT id, 'retried', attempt, jsonb_build_object('previous_state', previous_state, 'bulk', true) FROM retried
),
woken AS (
    SELECT pg_notify(%(channel)s, queue) FROM (SELECT DISTINCT queue FROM retried) q
)
SELECT count(*) AS retried, (SELECT count(*) FROM woken) AS woken FROM retried
"""

__all__ = [
    "BULK_BATCH",
    "SORT_COLUMNS",
    "BulkCancelReport",
    "BulkRetryReport",
    "Keyset",
    "Sort",
    "TaskFilter",
    "TaskPage",
    "TaskQueries",
    "TaskSummary",
]
