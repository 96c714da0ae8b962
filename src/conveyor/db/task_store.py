"""The task repository: every read and write of tasks and their history."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import psycopg
from sqlalchemy import func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from conveyor.core.queue_limits import LimitedClaim, QueueLimits
from conveyor.core.records import (
    ClaimedTask,
    EnqueueRequest,
    EnqueueResult,
    LeaseRenewal,
    Outcome,
    RescueReport,
    TaskEvent,
    TaskRecord,
)
from conveyor.core.states import (
    CANCELLABLE_AT_REST,
    RETRYABLE_STATES,
    UNIQUE_HOLDING_STATES,
    EventKind,
    TaskState,
)
from conveyor.db import limit_store, task_sql
from conveyor.db.errors import translated
from conveyor.db.executors import AsyncConnectionLike, Plan, Row, drive_async
from conveyor.db.hot_pool import HotPool
from conveyor.db.models import task_events, tasks
from conveyor.errors import IdempotencyConflict, InvalidTransition, TaskNotFound

# A held unique key can be released between our failed insert and our look-up; try again a few times.
_ENQUEUE_ROUNDS = 5


def enqueue_plan(requests: Sequence[EnqueueRequest]) -> Plan[list[EnqueueResult]]:
    """Insert ``requests`` and resolve every conflict; see :mod:`conveyor.db.executors` for plans."""
    if len(requests) == 1 and requests[0].idempotency_key is None and requests[0].unique_key is None:
        r = requests[0]
        params = {
            "name": r.name,
            "queue": r.queue,
            "priority": r.priority,
            "args": r.args_json,
            "kwargs": r.kwargs_json,
            "metadata": r.metadata_json,
            "max_attempts": r.max_attempts,
            "timeout_s": r.timeout_s,
            "eta": r.eta,
            "delay_s": r.delay_s,
        }
        (row,) = yield task_sql.ENQUEUE_ONE, params
        return [EnqueueResult(int(row["id"]), True, TaskState(row["state"]))]
    results: dict[int, EnqueueResult] = {}
    pending = list(enumerate(requests))
    for _ in range(_ENQUEUE_ROUNDS):
        if not pending:
            break
        rows = yield task_sql.ENQUEUE, _enqueue_params([r for _, r in pending])
        retry: list[tuple[int, EnqueueRequest]] = []
        for (index, request), row in zip(pending, rows, strict=True):
            if row["inserted"]:
                results[index] = EnqueueResult(int(row["id"]), True, TaskState(row["state"]))
                continue
            existing = yield from _existing_for(request)
            if existing is None:
                retry.append((index, request))
            else:
                results[index] = existing
        pending = retry
    if pending:
        raise InvalidTransition(-1, "contended", f"enqueue {pending[0][1].name!r} (unique key kept changing hands)")
    return [results[i] for i in range(len(requests))]


def _existing_for(request: EnqueueRequest) -> Plan[EnqueueResult | None]:
    if request.idempotency_key is not None:
        rows = yield (
            "SELECT id, state, payload_hash FROM conveyor_tasks WHERE idempotency_key = %(key)s",
            {"key": request.idempotency_key},
        )
        if rows:
            row = rows[0]
            if row["payload_hash"] != request.payload_hash:
                raise IdempotencyConflict(request.idempotency_key, int(row["id"]))
            return EnqueueResult(int(row["id"]), False, TaskState(row["state"]))
    if request.unique_key is not None:
        rows = yield (
            "SELECT id, state FROM conveyor_tasks WHERE unique_key = %(key)s AND state = ANY(%(states)s)",
            {"key": request.unique_key, "states": [s.value for s in UNIQUE_HOLDING_STATES]},
        )
        if rows:
            return EnqueueResult(int(rows[0]["id"]), False, TaskState(rows[0]["state"]))
    return None


def _enqueue_params(requests: Sequence[EnqueueRequest]) -> dict[str, list[Any]]:
    return {
        "names": [r.name for r in requests],
        "queues": [r.queue for r in requests],
        "priorities": [r.priority for r in requests],
        "args": [r.args_json for r in requests],
        "kwargs": [r.kwargs_json for r in requests],
        "metadata": [r.metadata_json for r in requests],
        "max_attempts": [r.max_attempts for r in requests],
        "timeouts": [r.timeout_s for r in requests],
        "idempotency_keys": [r.idempotency_key for r in requests],
        "payload_hashes": [r.payload_hash for r in requests],
        "unique_keys": [r.unique_key for r in requests],
        "delays": [r.delay_s for r in requests],
        "etas": [r.eta for r in requests],
    }


#: Below this many rows a COPY's extra round trips cost more than they save.
_COPY_MIN_ROWS = 64

_COPY_COLUMNS = ("id", "name", "queue", "state", "priority", "args", "kwargs", "metadata", "max_attempts", "timeout_s")


def _copyable(request: EnqueueRequest) -> bool:
    """Plain enqueues (no key to resolve, due now) can take the COPY path: nothing can conflict."""
    return (
        request.idempotency_key is None and request.unique_key is None and request.eta is None and not request.delay_s
    )


def _copy_text(value: str) -> str:
    """Escape for COPY's text format. Our JSON is compact (control characters arrive escaped, so no raw
    tab or newline can occur) and names are validated, so only backslashes need doubling."""
    return value.replace("\\", "\\\\") if "\\" in value else value


def _copy_tail(r: EnqueueRequest) -> str:
    """A COPY line without its leading id (ids are drawn only when the batch is written)."""
    timeout = "\\N" if r.timeout_s is None else repr(float(r.timeout_s))
    return (
        f"\t{r.name}\t{r.queue}\tqueued\t{r.priority}\t{_copy_text(r.args_json)}\t"
        f"{_copy_text(r.kwargs_json)}\t{_copy_text(r.metadata_json)}\t{r.max_attempts}\t{timeout}\n"
    )


@dataclass(frozen=True, slots=True)
class PreparedBatch:
    """One batch of an enqueue, made ready for writing by the thread that built it.

    Bulk enqueue builds batches on the caller's thread while the event loop's thread writes the
    previous one. Formatting the COPY text is most of the Python work of a write, so it is done on the
    building side and the writer only draws ids and sends. (When the writer formatted too, the two
    threads fought over the GIL and neither ran at full speed: 47k against 65k tasks/s.)"""

    requests: Sequence[EnqueueRequest]
    copy_indexes: list[int]  # the requests that take the COPY path
    copy_tails: list[str]  # their COPY lines, all but the id


def prepare_batch(requests: Sequence[EnqueueRequest]) -> PreparedBatch:
    plain = [i for i, r in enumerate(requests) if _copyable(r)]
    if len(plain) < _COPY_MIN_ROWS:
        plain = []
    return PreparedBatch(requests, plain, [_copy_tail(requests[i]) for i in plain])


@dataclass(frozen=True, slots=True)
class WrittenBatch:
    """What writing a :class:`PreparedBatch` gave: the ids of the copied rows and the results of the
    others. :meth:`results` assembles them in input order, on whichever thread asks."""

    batch: PreparedBatch
    copied_ids: list[int]
    keyed_indexes: list[int]
    keyed_results: list[EnqueueResult]

    def results(self) -> list[EnqueueResult]:
        copied = (EnqueueResult(task_id, True, TaskState.QUEUED) for task_id in self.copied_ids)
        if not self.keyed_indexes:
            return list(copied)
        by_index = dict(zip(self.keyed_indexes, self.keyed_results, strict=True))
        by_index.update(zip(self.batch.copy_indexes, copied, strict=True))
        return [by_index[i] for i in range(len(self.batch.requests))]


async def _copy_insert(conn: AsyncConnection, batch: PreparedBatch) -> list[int]:
    """Bulk insert with COPY, the fastest way into PostgreSQL. Ids are drawn first so the caller gets
    them back in order; run_at and created_at take the server default (the database clock)."""
    raw = await conn.get_raw_connection()
    driver = raw.driver_connection
    assert isinstance(driver, psycopg.AsyncConnection)
    async with driver.cursor() as cursor:
        await cursor.execute(
            # The identity column's sequence by name: resolving it per row (pg_get_serial_sequence)
            # costs more than the COPY itself.
            "SELECT array_agg(nextval('conveyor_tasks_id_seq')) FROM generate_series(1, %s)",
            (len(batch.copy_tails),),
        )
        row = await cursor.fetchone()
        assert row is not None
        ids: list[int] = row[0]
        columns = ", ".join(_COPY_COLUMNS)
        async with cursor.copy(f"COPY conveyor_tasks ({columns}) FROM STDIN") as copy:
            # One buffer, not a write_row() per row: per-row calls were most of the writer's time.
            await copy.write("".join([f"{task_id}{tail}" for task_id, tail in zip(ids, batch.copy_tails, strict=True)]))
        queues = sorted({batch.requests[i].queue for i in batch.copy_indexes})
        await cursor.execute(
            f"SELECT pg_notify('{task_sql.WAKEUP_CHANNEL}', q) FROM unnest(%s::text[]) AS q", (queues,)
        )
    return ids


class TaskStore:
    """Reads and writes of tasks. Every method runs in its own short transaction unless given a
    connection, in which case it joins the caller's."""

    def __init__(self, engine: AsyncEngine, hot: HotPool) -> None:
        self.engine = engine
        self.hot = hot

    @translated
    async def enqueue(
        self, requests: Sequence[EnqueueRequest], connection: AsyncConnectionLike | None = None
    ) -> list[EnqueueResult]:
        if not requests:
            return []
        if connection is not None:
            return await drive_async(enqueue_plan(requests), connection)
        if len(requests) < _COPY_MIN_ROWS:
            # The latency path: ENQUEUE is one atomic statement, so an autocommit connection runs it in
            # a single round trip (no BEGIN, no COMMIT). The look-ups that resolve a conflict are reads.
            async with self.hot.connection() as hot_conn:
                return await drive_async(enqueue_plan(requests), hot_conn)
        async with self.engine.begin() as conn:
            return await self.enqueue_in(conn, requests)

    async def enqueue_in(self, conn: AsyncConnection, requests: Sequence[EnqueueRequest]) -> list[EnqueueResult]:
        """Enqueue on one of our own connections, inside its current transaction."""
        return (await self.write_batch(conn, prepare_batch(requests))).results()

    async def write_batch(self, conn: AsyncConnection, batch: PreparedBatch) -> WrittenBatch:
        """Write a prepared batch on one of our own connections, inside its current transaction."""
        ids = await _copy_insert(conn, batch) if batch.copy_indexes else []
        keyed: list[int] = []
        if len(batch.copy_indexes) < len(batch.requests):
            copied = set(batch.copy_indexes)
            keyed = [i for i in range(len(batch.requests)) if i not in copied]
        results = await drive_async(enqueue_plan([batch.requests[i] for i in keyed]), conn) if keyed else []
        return WrittenBatch(batch, ids, keyed, results)

    async def claim(self, worker_id: str, queues: Sequence[str], limit: int, lease_s: float) -> list[ClaimedTask]:
        params = {"queues": list(queues), "limit": limit, "lease_s": lease_s, "worker_id": worker_id}
        rows = await self.hot.fetch(task_sql.CLAIM, params)
        return [limit_store.claimed_task(r) for r in rows]

    async def claim_limited(self, worker_id: str, queues: Sequence[str], limit: int, lease_s: float) -> LimitedClaim:
        """Claim from queues that have a concurrency or rate limit, never beyond it (all workers
        together); :meth:`claim` is for the others. See :mod:`conveyor.db.limit_sql`."""
        return await limit_store.claim_limited(self.hot, worker_id, queues, limit, lease_s)

    async def queue_limits(self, queues: Sequence[str]) -> dict[str, QueueLimits]:
        """The limits of those of ``queues`` that have any (the rest are claimed with :meth:`claim`)."""
        return await limit_store.queue_limits(self.hot, queues)

    async def renew(
        self, worker_id: str, held: Mapping[int, str], lease_s: float, worker_state: str = "running"
    ) -> LeaseRenewal:
        params = {
            "ids": list(held),
            "tokens": list(held.values()),
            "lease_s": lease_s,
            "worker_id": worker_id,
            "worker_state": worker_state,
        }
        rows = await self.hot.fetch(task_sql.RENEW, params)
        held_now = {int(r["id"]) for r in rows if r["kind"] == "task"}
        renewed = {int(r["id"]) for r in rows if r["kind"] == "task" and r["renewed"]}
        cancel = {int(r["id"]) for r in rows if r["kind"] == "task" and r["cancel_requested"]}
        worker_rows = [r for r in rows if r["kind"] == "worker"]
        return LeaseRenewal(
            held=frozenset(held_now),
            renewed=frozenset(renewed),
            cancel_requested=frozenset(cancel),
            worker_paused=bool(worker_rows and worker_rows[0]["paused"]),
            drain_requested=bool(worker_rows and worker_rows[0]["drain"]),
            worker_known=bool(worker_rows),
        )

    async def finish(self, outcomes: Sequence[Outcome]) -> set[int]:
        """Record outcomes; returns the ids that were accepted (the rest held stale leases)."""
        if not outcomes:
            return set()
        params = {
            "ids": [o.task_id for o in outcomes],
            "tokens": [o.lease_token for o in outcomes],
            "states": [o.state.value for o in outcomes],
            "results": [o.result_json for o in outcomes],
            "errors": [json.dumps(o.error) if o.error is not None else None for o in outcomes],
            "delays": [o.delay_s for o in outcomes],
        }
        rows = await self.hot.fetch(task_sql.FINISH, params)
        return {int(r["id"]) for r in rows}

    async def release(self, held: Mapping[int, str]) -> set[int]:
        if not held:
            return set()
        rows = await self.hot.fetch(task_sql.RELEASE, {"ids": list(held), "tokens": list(held.values())})
        return {int(r["id"]) for r in rows}

    async def rescue(self, max_worker_losses: int, batch: int = 500) -> RescueReport:
        """Take back every task whose lease expired, in batches until none is left."""
        report = RescueReport()
        while True:
            rows = await self.hot.fetch(task_sql.RESCUE, {"limit": batch, "max_losses": max_worker_losses})
            for row in rows:
                bucket = {"queued": report.requeued, "dead": report.dead, "cancelled": report.cancelled}
                bucket[row["state"]].append(int(row["id"]))
            if len(rows) < batch:
                return report

    async def promote_due(self, batch: int = 1000) -> int:
        total = 0
        while True:
            rows = await self.hot.fetch(task_sql.PROMOTE_DUE, {"limit": batch})
            promoted = int(rows[0]["promoted"]) if rows else 0
            total += promoted
            if promoted < batch:
                return total

    async def next_due_in_s(self, queues: Sequence[str]) -> float | None:
        rows = await self.hot.fetch(task_sql.NEXT_DUE, {"queues": list(queues)})
        value = rows[0]["due_in_s"] if rows else None
        return None if value is None else max(0.0, float(value))

    # -- reads and operator actions (not hot: SQLAlchemy Core) -------------------------------------

    @translated
    async def get(self, task_id: int, conn: AsyncConnection | None = None) -> TaskRecord:
        if conn is None:
            async with self.engine.connect() as own:
                return await self.get(task_id, own)
        row = (await conn.execute(select(tasks).where(tasks.c.id == task_id))).mappings().first()
        if row is None:
            raise TaskNotFound(task_id)
        return record_from_row(dict(row))

    @translated
    async def events(self, task_id: int) -> list[TaskEvent]:
        async with self.engine.connect() as conn:
            record = await self.get(task_id, conn)
            rows = await conn.execute(
                select(task_events).where(task_events.c.task_id == task_id).order_by(task_events.c.id)
            )
            # The enqueue itself is the task row (its created_at never changes); storing a second row
            # for it would halve bulk enqueue throughput, so the history opens with it here.
            opened = TaskEvent(
                id=0,
                task_id=task_id,
                at=record.created_at,
                kind=EventKind.ENQUEUED.value,
                attempt=0,
                worker_id=None,
                detail=None,
            )
            return [opened] + [
                TaskEvent(
                    id=r.id,
                    task_id=r.task_id,
                    at=r.at,
                    kind=r.kind,
                    attempt=r.attempt,
                    worker_id=r.worker_id,
                    detail=r.detail,
                )
                for r in rows
            ]

    @translated
    async def list(
        self,
        *,
        states: Sequence[TaskState] = (),
        queue: str | None = None,
        name: str | None = None,
        limit: int = 50,
    ) -> list[TaskRecord]:
        query = select(tasks).order_by(tasks.c.id.desc()).limit(limit)
        if states:
            query = query.where(tasks.c.state.in_([s.value for s in states]))
        if queue is not None:
            query = query.where(tasks.c.queue == queue)
        if name is not None:
            query = query.where(tasks.c.name == name)
        async with self.engine.connect() as conn:
            rows = (await conn.execute(query)).mappings().all()
        return [record_from_row(dict(r)) for r in rows]

    @translated
    async def cancel(self, task_id: int) -> TaskRecord:
        """Cancel at once if the task is not running; ask its worker to stop it if it is.

        Raises :class:`InvalidTransition` for a finished task, leaving it as it was."""
        async with self.engine.begin() as conn:
            current = await self._lock(conn, task_id)
            state = current["state"]
            if state in CANCELLABLE_AT_REST:
                await conn.execute(
                    update(tasks)
                    .where(tasks.c.id == task_id, tasks.c.state == state)
                    .values(state=TaskState.CANCELLED.value, finished_at=func.now())
                )
                await self._event(conn, task_id, EventKind.CANCELLED, current["attempt"], {"previous_state": state})
            elif state == TaskState.RUNNING:
                if not current["cancel_requested"]:
                    await conn.execute(
                        update(tasks).where(tasks.c.id == task_id, tasks.c.state == state).values(cancel_requested=True)
                    )
                    await self._event(conn, task_id, EventKind.CANCEL_REQUESTED, current["attempt"], None)
            else:
                raise InvalidTransition(task_id, state, "cancel")
            return await self.get(task_id, conn)

    @translated
    async def retry(self, task_id: int) -> TaskRecord:
        """Start a finished task again (dead, cancelled or succeeded), with at least one attempt left."""
        async with self.engine.begin() as conn:
            current = await self._lock(conn, task_id)
            if current["state"] not in RETRYABLE_STATES:
                raise InvalidTransition(task_id, current["state"], "retry")
            try:
                await conn.execute(
                    update(tasks)
                    .where(tasks.c.id == task_id, tasks.c.state == current["state"])
                    .values(
                        state=TaskState.QUEUED.value,
                        run_at=func.now(),
                        finished_at=None,
                        result=None,
                        worker_losses=0,
                        cancel_requested=False,
                        max_attempts=max(current["max_attempts"], current["attempt"] + 1),
                    )
                )
            except IntegrityError:
                # The partial unique index: another task now holds this task's unique key.
                raise InvalidTransition(
                    task_id, current["state"], f"retry (unique key {current['unique_key']!r} is held by another task)"
                ) from None
            await self._event(
                conn, task_id, EventKind.RETRIED, current["attempt"], {"previous_state": current["state"]}
            )
            await conn.exec_driver_sql(
                "SELECT pg_notify(%(channel)s, %(queue)s)",
                {"channel": task_sql.WAKEUP_CHANNEL, "queue": current["queue"]},
            )
            return await self.get(task_id, conn)

    async def _lock(self, conn: AsyncConnection, task_id: int) -> Row:
        row = (await conn.execute(select(tasks).where(tasks.c.id == task_id).with_for_update())).mappings().first()
        if row is None:
            raise TaskNotFound(task_id)
        return dict(row)

    async def _event(
        self, conn: AsyncConnection, task_id: int, kind: EventKind, attempt: int, detail: dict[str, Any] | None
    ) -> None:
        await conn.execute(
            task_events.insert().values(task_id=task_id, kind=kind.value, attempt=attempt, detail=detail)
        )


def record_from_row(row: Row) -> TaskRecord:
    return TaskRecord(
        id=int(row["id"]),
        name=row["name"],
        queue=row["queue"],
        state=TaskState(row["state"]),
        priority=row["priority"],
        args=row["args"],
        kwargs=row["kwargs"],
        metadata=row["metadata"],
        result=row["result"],
        last_error=row["last_error"],
        attempt=row["attempt"],
        max_attempts=row["max_attempts"],
        worker_losses=row["worker_losses"],
        worker_id=None if row["worker_id"] is None else str(row["worker_id"]),
        cancel_requested=row["cancel_requested"],
        timeout_s=row["timeout_s"],
        idempotency_key=row["idempotency_key"],
        unique_key=row["unique_key"],
        run_at=row["run_at"],
        created_at=row["created_at"],
        started_at=row["started_at"],
        finished_at=row["finished_at"],
        lease_expires_at=row["lease_expires_at"],
    )
