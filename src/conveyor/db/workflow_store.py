"""The workflow repository: every read and write of workflows, their steps and edges.

How a workflow runs, in one place. A step is an ordinary task with ``workflow_id`` set. Submission
writes the workflow, its steps (through the core enqueue path) and its edges in one transaction, and
moves every step that waits for others to ``blocked`` before commit: no worker ever sees it queued.
From then on the database trigger ``conveyor_workflow_step_changed`` (migration 0004, where its SQL is
explained line by line) advances the graph in the same transaction as each step's state change,
whoever makes it: a worker's FINISH, the rescuer, an operator. It counts the step off, releases the
children it was the last dependency of (prepending inputs, waking their queue), cancels the dependents
that can no longer run, stops the rest under ``on_failure='stop'``, and settles the workflow when its
last step finishes. A step whose attempt will be retried goes back to scheduled/queued, which the
trigger ignores: dependents are judged on a step's last attempt only.

Cancel and retry here are guarded statements like every other state change, and they take their locks
in the trigger's order (step rows, then the workflow row), so they cannot deadlock with a FINISH in the
common case; the rare deadlock PostgreSQL still detects is retried (:func:`_retrying`).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

import psycopg
import sqlalchemy.exc
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from conveyor.core.records import EnqueueRequest
from conveyor.core.states import TaskState
from conveyor.core.workflow import WorkflowSpec
from conveyor.core.workflow_records import (
    WorkflowEdge,
    WorkflowGraph,
    WorkflowNotFound,
    WorkflowPage,
    WorkflowRecord,
    WorkflowState,
    WorkflowStateError,
    WorkflowStep,
    WorkflowSubmitted,
)
from conveyor.db import task_sql
from conveyor.db.errors import translated
from conveyor.db.executors import Row, execute_async
from conveyor.db.task_store import TaskStore
from conveyor.errors import DatabaseError

T = TypeVar("T")

_INSERT_WORKFLOW = """
INSERT INTO conveyor_workflows (name, kind, on_failure, steps_total, steps_remaining, metadata)
VALUES (%(name)s, %(kind)s, %(on_failure)s, %(steps)s, %(steps)s, %(metadata)s::jsonb)
RETURNING id
"""

# Steps and edges in one round trip, then the step tasks are tied to the workflow; those with
# dependencies become blocked here, before commit. (queued -> blocked does not fire the trigger.)
# Data-modifying CTEs always run to completion, read or not; foreign keys are checked at the end of
# the statement, when the steps the edges refer to exist.
_INSERT_GRAPH = """
WITH step AS (
    SELECT * FROM unnest(%(task_ids)s::bigint[], %(names)s::text[], %(modes)s::text[], %(deps)s::int[],
                         %(base_args)s::text[]::jsonb[])
        AS s(task_id, name, result_mode, deps_pending, base_args)
),
steps_in AS (
    INSERT INTO conveyor_workflow_steps (task_id, workflow_id, name, result_mode, deps_pending, base_args)
    SELECT task_id, %(workflow_id)s, name, result_mode, deps_pending, base_args FROM step
),
edges_in AS (
    INSERT INTO conveyor_workflow_edges (workflow_id, parent_task_id, child_task_id, position, needs_result)
    SELECT %(workflow_id)s, parent, child, position, needs
    FROM unnest(%(parents)s::bigint[], %(children)s::bigint[], %(positions)s::int[], %(needs)s::bool[])
        AS e(parent, child, position, needs)
)
UPDATE conveyor_tasks t
SET workflow_id = %(workflow_id)s,
    state = CASE WHEN step.deps_pending > 0 THEN 'blocked' ELSE t.state END
FROM step
WHERE t.id = step.task_id
"""

_WORKFLOW_COLUMNS = """
w.id, w.name, w.kind, w.state, w.on_failure, w.steps_total, w.steps_remaining, w.cancel_requested,
w.stop_reason, w.created_at, w.finished_at, w.metadata
"""

_GET = f"SELECT {_WORKFLOW_COLUMNS} FROM conveyor_workflows w WHERE w.id = %(id)s"

_STEPS = """
SELECT s.task_id, s.name, s.result_mode, s.deps_pending, t.name AS task, t.queue, t.state, t.attempt,
       t.max_attempts, t.cancel_requested, t.result, t.last_error, t.created_at, t.started_at, t.finished_at
FROM conveyor_workflow_steps s JOIN conveyor_tasks t ON t.id = s.task_id
WHERE s.workflow_id = %(id)s
ORDER BY s.task_id
"""

_EDGES = """
SELECT e.parent_task_id, e.child_task_id, e.position, e.needs_result, p.name AS parent, c.name AS child
FROM conveyor_workflow_edges e
JOIN conveyor_workflow_steps p ON p.task_id = e.parent_task_id
JOIN conveyor_workflow_steps c ON c.task_id = e.child_task_id
WHERE e.workflow_id = %(id)s
ORDER BY e.child_task_id, e.position
"""

# Keyset pagination, newest first: each page is an index range scan however deep it is. The filters
# present are spliced in (fixed texts, bound values) rather than written as "(%(x)s IS NULL OR ...)",
# which a generic plan could not match to the (state, id) and (name, id) indexes.
_PAGE = f"""
SELECT {_WORKFLOW_COLUMNS} FROM conveyor_workflows w
WHERE {{where}}
ORDER BY w.id DESC
LIMIT %(limit)s
"""
_PAGE_FILTERS = {
    "before": "w.id < %(before)s",
    "states": "w.state = ANY(%(states)s::text[])",
    "name": "w.name = %(name)s",
}

_OUTPUT = """
SELECT s.name, t.id, t.state, t.result, t.last_error
FROM conveyor_workflow_steps s JOIN conveyor_tasks t ON t.id = s.task_id
WHERE s.workflow_id = %(id)s AND (%(all)s OR s.name = ANY(%(names)s::text[]) OR t.state <> 'succeeded')
ORDER BY s.task_id
"""

# Cancel, step 1: lock the unfinished steps in id order (the trigger's order: step rows before the
# workflow row, and parents, which have lower ids, before children).
_LOCK_UNFINISHED = """
SELECT id FROM conveyor_tasks
WHERE workflow_id = %(id)s AND state IN ('blocked', 'queued', 'scheduled', 'running')
ORDER BY id
FOR UPDATE
"""

# Cancel, step 2: the workflow row. Setting stop_reason first means the trigger runs that the
# cancellations below fire do not try to stop the workflow again.
_FLAG_CANCEL = """
UPDATE conveyor_workflows
SET cancel_requested = true, stop_reason = COALESCE(stop_reason, 'cancelled by request')
WHERE id = %(id)s AND state = 'running'
RETURNING id
"""

# Cancel, step 3: waiting steps are cancelled, running ones asked to stop (as TaskStore.cancel does for
# one task). The last step to finish makes the workflow 'cancelled' (cancel_requested is set).
_CANCEL_STEPS = """
WITH changed AS (
    UPDATE conveyor_tasks t
    SET state = CASE WHEN t.state = 'running' THEN t.state ELSE 'cancelled' END,
        finished_at = CASE WHEN t.state = 'running' THEN t.finished_at ELSE now() END,
        cancel_requested = (t.state = 'running')
    WHERE t.id = ANY(%(ids)s::bigint[])
      AND (t.state IN ('blocked', 'queued', 'scheduled') OR (t.state = 'running' AND NOT t.cancel_requested))
    RETURNING t.id, t.attempt, t.state
)
INSERT INTO conveyor_task_events (task_id, kind, attempt, detail)
SELECT id, CASE WHEN state = 'running' THEN 'cancel_requested' ELSE 'cancelled' END, attempt,
       '{"reason": "workflow cancelled"}'::jsonb
FROM changed
"""

_LOCK_WORKFLOW = "SELECT state FROM conveyor_workflows WHERE id = %(id)s FOR UPDATE"

_REOPEN_WORKFLOW = """
UPDATE conveyor_workflows
SET state = 'running', finished_at = NULL, stop_reason = NULL, cancel_requested = false
WHERE id = %(id)s AND state IN ('failed', 'cancelled')
"""

# Retry: every step that did not succeed starts again, with at least one attempt left (as
# TaskStore.retry). The trigger fires for each: it counts the step as unfinished again, blocks it if a
# dependency is still unresolved (the dependents of a failed step wait for its new outcome) and
# rebuilds its inputs otherwise. Succeeded steps keep their results and are not run again.
_RETRY_STEPS = """
WITH target AS (
    SELECT id, state FROM conveyor_tasks
    WHERE workflow_id = %(id)s AND state IN ('dead', 'cancelled')
    ORDER BY id FOR UPDATE
),
retried AS (
    UPDATE conveyor_tasks t
    SET state = 'queued', run_at = now(), finished_at = NULL, result = NULL, worker_losses = 0,
        cancel_requested = false, max_attempts = GREATEST(t.max_attempts, t.attempt + 1)
    FROM target
    WHERE t.id = target.id AND t.state = target.state
    RETURNING t.id, t.attempt, target.state AS previous_state
),
events AS (
    INSERT INTO conveyor_task_events (task_id, kind, attempt, detail)
    SELECT id, 'retried', attempt,
           jsonb_build_object('previous_state', previous_state, 'workflow', %(id)s::bigint)
    FROM retried
)
SELECT count(*) AS retried FROM retried
"""

_WAKE_QUEUED = f"""
SELECT pg_notify('{task_sql.WAKEUP_CHANNEL}', queue)
FROM (SELECT DISTINCT queue FROM conveyor_tasks WHERE workflow_id = %(id)s AND state = 'queued') q
"""

#: Attempts of an operation that PostgreSQL chose as a deadlock victim (or a serialisation failure).
_ATTEMPTS = 5


class WorkflowStore:
    """Reads and writes of workflows. Every method runs in its own transaction."""

    def __init__(self, engine: AsyncEngine, tasks: TaskStore) -> None:
        self.engine = engine
        self.tasks = tasks

    @translated
    async def submit(self, spec: WorkflowSpec, requests: Sequence[EnqueueRequest]) -> WorkflowSubmitted:
        """Store ``spec`` with one enqueue request per step (in ``spec.steps`` order), all or nothing."""
        if len(requests) != len(spec.steps):
            raise ValueError("one enqueue request per step is needed")
        async with self.engine.begin() as conn:
            return await self.submit_in(conn, spec, requests)

    async def submit_in(
        self, conn: AsyncConnection, spec: WorkflowSpec, requests: Sequence[EnqueueRequest]
    ) -> WorkflowSubmitted:
        """As :meth:`submit`, inside the caller's transaction on one of our connections."""
        metadata = json.dumps({"output": list(spec.output), "output_mode": spec.output_mode})
        [row] = await execute_async(
            conn,
            _INSERT_WORKFLOW,
            {
                "name": spec.name,
                "kind": spec.kind,
                "on_failure": spec.on_failure,
                "steps": len(spec.steps),
                "metadata": metadata,
            },
        )
        workflow_id = int(row["id"])
        # The core enqueue path (COPY for large workflows): validation, defaults and wake-ups as for any task.
        results = await self.tasks.enqueue_in(conn, requests)
        ids = {step.name: result.id for step, result in zip(spec.steps, results, strict=True)}
        if any(not result.created for result in results):  # impossible without keys, which specs refuse
            raise ValueError("a workflow step resolved to an existing task")
        deps = {step.name: 0 for step in spec.steps}
        for edge in spec.edges:
            deps[edge.child] += 1
        await execute_async(
            conn,
            _INSERT_GRAPH,
            {
                "workflow_id": workflow_id,
                "task_ids": [ids[s.name] for s in spec.steps],
                "names": [s.name for s in spec.steps],
                "modes": [s.result_mode for s in spec.steps],
                "deps": [deps[s.name] for s in spec.steps],
                "base_args": [
                    None if step.result_mode == "none" else request.args_json
                    for step, request in zip(spec.steps, requests, strict=True)
                ],
                "parents": [ids[e.parent] for e in spec.edges],
                "children": [ids[e.child] for e in spec.edges],
                "positions": [e.position for e in spec.edges],
                "needs": [e.needs_result for e in spec.edges],
            },
        )
        return WorkflowSubmitted(workflow_id, ids)

    @translated
    async def get(self, workflow_id: int) -> WorkflowRecord:
        async with self.engine.connect() as conn:
            return await self._get(conn, workflow_id)

    @translated
    async def graph(self, workflow_id: int) -> WorkflowGraph:
        """The workflow with every step (state, attempts, result) and every edge."""
        # One snapshot for the three reads, so steps and edges agree with the workflow row.
        async with self.engine.connect() as conn, conn.begin():
            await conn.exec_driver_sql("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
            workflow = await self._get(conn, workflow_id)
            steps = await execute_async(conn, _STEPS, {"id": workflow_id})
            edges = await execute_async(conn, _EDGES, {"id": workflow_id})
        return WorkflowGraph(
            workflow=workflow,
            steps=[_step(row) for row in steps],
            edges=[
                WorkflowEdge(
                    parent=row["parent"],
                    child=row["child"],
                    parent_task_id=int(row["parent_task_id"]),
                    child_task_id=int(row["child_task_id"]),
                    position=row["position"],
                    needs_result=row["needs_result"],
                )
                for row in edges
            ],
        )

    @translated
    async def page(
        self,
        *,
        states: Sequence[WorkflowState] = (),
        name: str | None = None,
        limit: int = 50,
        before: int | None = None,
    ) -> WorkflowPage:
        """Workflows newest first; pass ``next_before`` back as ``before`` for the next page."""
        params = {"states": [s.value for s in states], "name": name, "limit": limit + 1, "before": before}
        where = " AND ".join(clause for key, clause in _PAGE_FILTERS.items() if params[key]) or "true"
        async with self.engine.connect() as conn:
            rows = await execute_async(conn, _PAGE.format(where=where), params)
        items = [_workflow(row) for row in rows[:limit]]
        return WorkflowPage(items, items[-1].id if len(rows) > limit else None)

    @translated
    async def outcomes(self, workflow_id: int, names: Sequence[str] | None = None) -> list[Row]:
        """Name, id, state, result and last error of the steps named (all if ``None``), and of every
        step that did not succeed."""
        async with self.engine.connect() as conn:
            await self._get(conn, workflow_id)
            params = {"id": workflow_id, "all": names is None, "names": list(names or ())}
            return await execute_async(conn, _OUTPUT, params)

    @translated
    async def cancel(self, workflow_id: int) -> WorkflowRecord:
        """Cancel every waiting step, ask the running ones to stop; the workflow ends ``cancelled`` when
        the last of them finishes. Raises :class:`WorkflowStateError` if it has already finished."""

        async def attempt(conn: AsyncConnection) -> WorkflowRecord:
            locked = await execute_async(conn, _LOCK_UNFINISHED, {"id": workflow_id})
            flagged = await execute_async(conn, _FLAG_CANCEL, {"id": workflow_id})
            if not flagged:
                current = await self._get(conn, workflow_id)
                raise WorkflowStateError(workflow_id, current.state.value, "cancel")
            await execute_async(conn, _CANCEL_STEPS, {"ids": [int(r["id"]) for r in locked]})
            return await self._get(conn, workflow_id)

        return await self._retrying(attempt)

    @translated
    async def retry(self, workflow_id: int) -> WorkflowRecord:
        """Run again every step of a failed or cancelled workflow that did not succeed (the failed ones
        and what they stopped); the rest keep their results. Raises :class:`WorkflowStateError` for a
        workflow that is running or succeeded."""

        async def attempt(conn: AsyncConnection) -> WorkflowRecord:
            rows = await execute_async(conn, _LOCK_WORKFLOW, {"id": workflow_id})
            if not rows:
                raise WorkflowNotFound(workflow_id)
            state = rows[0]["state"]
            if state not in (WorkflowState.FAILED, WorkflowState.CANCELLED):
                raise WorkflowStateError(workflow_id, state, "retry")
            await execute_async(conn, _REOPEN_WORKFLOW, {"id": workflow_id})
            await execute_async(conn, _RETRY_STEPS, {"id": workflow_id})
            await execute_async(conn, _WAKE_QUEUED, {"id": workflow_id})
            return await self._get(conn, workflow_id)

        return await self._retrying(attempt)

    async def _retrying(self, operation: Callable[[AsyncConnection], Awaitable[T]]) -> T:
        """Run ``operation`` in a transaction, again if PostgreSQL chose it as a deadlock victim."""
        for attempt in range(1, _ATTEMPTS + 1):
            try:
                async with self.engine.begin() as conn:
                    return await operation(conn)
            except (DatabaseError, sqlalchemy.exc.DBAPIError) as exc:
                if attempt == _ATTEMPTS or not _rolled_back(exc):
                    raise
            await asyncio.sleep(0.01 * attempt)
        raise AssertionError("unreachable")

    async def _get(self, conn: AsyncConnection, workflow_id: int) -> WorkflowRecord:
        rows = await execute_async(conn, _GET, {"id": workflow_id})
        if not rows:
            raise WorkflowNotFound(workflow_id)
        return _workflow(rows[0])


def _rolled_back(exc: BaseException) -> bool:
    """Whether PostgreSQL rolled the transaction back to break a deadlock or a serialisation conflict
    (SQLSTATE class 40): the one kind of failure that running the same statements again can cure."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, psycopg.errors.TransactionRollback):
            return True
        if isinstance(seen, sqlalchemy.exc.DBAPIError) and isinstance(seen.orig, psycopg.errors.TransactionRollback):
            return True
        seen = seen.__cause__
    return False


def _workflow(row: Row) -> WorkflowRecord:
    meta: dict[str, Any] = row["metadata"] or {}
    return WorkflowRecord(
        id=int(row["id"]),
        name=row["name"],
        kind=row["kind"],
        state=WorkflowState(row["state"]),
        on_failure=row["on_failure"],
        steps_total=row["steps_total"],
        steps_remaining=row["steps_remaining"],
        cancel_requested=row["cancel_requested"],
        stop_reason=row["stop_reason"],
        created_at=row["created_at"],
        finished_at=row["finished_at"],
        output=tuple(meta.get("output", ())),
        output_mode=str(meta.get("output_mode", "dict")),
    )


def _step(row: Row) -> WorkflowStep:
    return WorkflowStep(
        task_id=int(row["task_id"]),
        name=row["name"],
        task=row["task"],
        queue=row["queue"],
        state=TaskState(row["state"]),
        result_mode=row["result_mode"],
        deps_pending=row["deps_pending"],
        attempt=row["attempt"],
        max_attempts=row["max_attempts"],
        cancel_requested=row["cancel_requested"],
        result=row["result"],
        last_error=row["last_error"],
        created_at=row["created_at"],
        started_at=row["started_at"],
        finished_at=row["finished_at"],
    )
