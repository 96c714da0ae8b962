"""The scheduler's repository: the leader lease, the fenced tick, code sync and operator actions.

Every statement the scheduler runs is run here (their text is in :mod:`conveyor.db.schedule_sql`).
Why a tick can be neither lost nor doubled:

* **One leader at a time, judged on the database clock.** The lease row is taken with a conditional
  ``UPDATE`` (free, expired, or already ours) and renewed the same way; each change of holder bumps its
  ``fencing_token``. No host's clock takes part (LESSONS 26).
* **Fencing.** A tick's transaction first re-reads the lease ``FOR SHARE`` with the holder *and token* it
  was granted, and requires it unexpired. If another process took over in the meantime, nothing
  matches and the transaction writes nothing; if a takeover comes after the check, its ``UPDATE`` waits
  on the share lock until the tick commits, so a tick and a takeover are never interleaved. A leader
  paused with SIGSTOP (or cut off by a partition) therefore cannot enqueue when it wakes up.
* **The run row is the guard.** Each run is a row unique on (schedule, fire time), and a tick inserts its
  runs *before* it enqueues (``ON CONFLICT DO NOTHING RETURNING``): only the fire times whose row this
  transaction inserted get a task. A transaction inserting the same row concurrently waits on the unique
  index until the first one ends, then gets nothing back and enqueues nothing. So even a tick acting on a
  wrong cursor (moved back by hand, or read by two processes that both believed they led) cannot create a
  fire time twice (LESSONS 19), and this holds after the task itself has been pruned, for as long as the
  run row stays (retention keeps every run near the cursor, see ``schedule_run_retention``). The task
  also carries the unique idempotency key ``schedule:<id>:<fire time>``, as a second line.
* **The cursor moves in the same transaction** as the enqueue, so a crash leaves either both or neither.

A stopped or stalled process must not hold others up either (LESSONS 7): every tick transaction sets
``lock_timeout``, ``statement_timeout`` and ``idle_in_transaction_session_timeout`` for itself, so the
server ends the transaction of a frozen leader and its locks go with it.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import func, or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from conveyor.core.records import EnqueueRequest
from conveyor.core.schedule import DueRuns, ScheduleDefinition, Timing, next_fire_after
from conveyor.core.schedule_records import (
    LeadershipLost,
    Lease,
    ScheduleConflict,
    ScheduleNotFound,
    ScheduleRecord,
    ScheduleRun,
    ScheduleSource,
)
from conveyor.db.errors import translate_errors
from conveyor.db.executors import Row, drive_async, execute_async
from conveyor.db.models import tasks
from conveyor.db.models_schedules import leases, schedule_runs, schedules
from conveyor.db.schedule_sql import (
    ACQUIRE,
    ADVANCE,
    CLAIM_MANUAL_RUN,
    CLAIM_RUNS,
    DUE,
    FENCE,
    LIMIT_TRANSACTION,
    LINK_RUNS,
    LOCK_DUE,
    RELEASE,
)
from conveyor.db.task_store import enqueue_plan
from conveyor.errors import IdempotencyConflict

log = logging.getLogger("conveyor.scheduler")

#: The name of the scheduler's leader lease in ``conveyor_leases``.
LEADER_LEASE = "scheduler"

# Serialises code-schedule syncs of processes starting together (any constant; "csch").
_SYNC_LOCK_KEY = 0x63736368


@dataclass(frozen=True)
class Fence:
    """What a tick must still hold when it writes: this lease, by this holder, under this token."""

    lease: str
    holder: str
    token: int


@dataclass(frozen=True)
class LeaseAttempt:
    """The answer to an acquire or renew: the term's token and expiry if granted, ``None`` if not."""

    token: int | None
    expires_at: datetime | None
    db_now: datetime  # the server's clock_timestamp() as it answered (for the skew check)
    holder: str | None  # who held the lease when the attempt was made (the leader, if refused)

    @property
    def granted(self) -> bool:
        return self.token is not None


@dataclass(frozen=True)
class TransactionLimits:
    """Server-side limits of one tick transaction, in seconds (see the module docstring)."""

    lock_timeout_s: float
    statement_timeout_s: float
    idle_timeout_s: float


@dataclass(frozen=True)
class Firing:
    """What the scheduler decided to enqueue for one due schedule: one request per due fire time."""

    due: DueRuns
    requests: Sequence[EnqueueRequest]


@dataclass(frozen=True)
class FireResult:
    """What one tick did for one schedule: ``fire_times`` were enqueued (as ``task_ids`` on ``queues``),
    ``already_run`` were due but had a run already and were not enqueued again."""

    schedule: ScheduleRecord
    db_now: datetime
    fire_times: tuple[datetime, ...]
    task_ids: tuple[int, ...]
    queues: tuple[str, ...]
    next_fire_at: datetime
    missed: bool
    already_run: tuple[datetime, ...] = ()


@dataclass
class SyncReport:
    """Names of code-declared schedules by what the sync did to them."""

    created: list[str] = field(default_factory=list)
    updated: list[str] = field(default_factory=list)
    reenabled: list[str] = field(default_factory=list)
    disabled: list[str] = field(default_factory=list)
    # Declared in code under a name an API-created schedule already has; left alone.
    conflicts: list[str] = field(default_factory=list)


#: Decides, from the locked schedule and the database's ``now()``, what to enqueue.
Decide = Callable[[ScheduleRecord, datetime], Firing]
#: Builds the task of a manual run from the schedule and the run's time (which keys it).
BuildRequest = Callable[[ScheduleRecord, datetime], EnqueueRequest]


class ScheduleStore:
    """Reads and writes of schedules, their runs and the leader lease; each method is one transaction."""

    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine

    @asynccontextmanager
    async def _transaction(self) -> AsyncIterator[AsyncConnection]:
        with translate_errors():
            async with self.engine.begin() as conn:
                yield conn

    # -- leadership ------------------------------------------------------------------------------

    async def acquire(
        self, holder: str, token: int | None, lease_s: float, *, lock_timeout_s: float, name: str = LEADER_LEASE
    ) -> LeaseAttempt:
        """Take or renew the lease. ``token`` is the term being renewed (``None`` to acquire): a renewal
        keeps it, any other grant carries a new one. Not granted while someone else holds the lease."""
        async with self._transaction() as conn:
            await limit_transaction(conn, TransactionLimits(lock_timeout_s, lock_timeout_s * 2, lock_timeout_s * 2))
            rows = await execute_async(
                conn, ACQUIRE, {"name": name, "holder": holder, "token": token, "lease_s": lease_s}
            )
        row = rows[0]
        token = None if row["fencing_token"] is None else int(row["fencing_token"])
        return LeaseAttempt(token, row["expires_at"], row["db_now"], row["holder"])

    async def release(self, holder: str, token: int, *, name: str = LEADER_LEASE) -> bool:
        async with self._transaction() as conn:
            rows = await execute_async(conn, RELEASE, {"name": name, "holder": holder, "token": token})
        return bool(rows)

    async def lease(self, name: str = LEADER_LEASE) -> Lease | None:
        async with self._transaction() as conn:
            row = (await conn.execute(select(leases).where(leases.c.name == name))).mappings().first()
        return None if row is None else Lease(**dict(row))

    # -- ticking ---------------------------------------------------------------------------------

    async def due(self, limit: int = 100) -> tuple[list[int], float | None]:
        """Ids of enabled schedules due by the database clock, and seconds until the next one is due."""
        async with self._transaction() as conn:
            rows = await execute_async(conn, DUE, {"limit": limit})
        return [int(i) for i in rows[0]["due"]], rows[0]["next_in_s"]

    async def fire(
        self, schedule_id: int, fence: Fence, decide: Decide, limits: TransactionLimits
    ) -> FireResult | None:
        """Enqueue what ``decide`` says is due for one schedule and move its cursor, all in one fenced
        transaction. Only the fire times whose run this transaction records are enqueued (see the module
        docstring). ``None`` if it is no longer due; :class:`LeadershipLost` if the fence fails."""
        async with self._transaction() as conn:
            await limit_transaction(conn, limits)
            fenced = await execute_async(
                conn, FENCE, {"lease": fence.lease, "holder": fence.holder, "token": fence.token}
            )
            if not fenced:
                raise LeadershipLost(f"the {fence.lease!r} lease is no longer held under token {fence.token}")
            rows = await execute_async(conn, LOCK_DUE, {"id": schedule_id})
            if not rows:
                return None
            record = record_from_row(rows[0])
            now: datetime = rows[0]["db_now"]
            firing = decide(record, now)
            due = firing.due
            run_ids: dict[datetime, int] = {}
            if due.fire_times:
                params = {"id": schedule_id, "token": fence.token, "fire_ats": list(due.fire_times)}
                run_ids = {r["fire_at"]: int(r["id"]) for r in await execute_async(conn, CLAIM_RUNS, params)}
            claimed = [i for i, fire_at in enumerate(due.fire_times) if fire_at in run_ids]
            fire_times = tuple(due.fire_times[i] for i in claimed)
            requests = [firing.requests[i] for i in claimed]
            task_ids = await _enqueue(conn, requests)
            await execute_async(
                conn,
                ADVANCE,
                {
                    "id": schedule_id,
                    "run_ids": [run_ids[fire_at] for fire_at in fire_times],
                    "task_ids": task_ids,
                    "next_fire_at": due.next_fire_at,
                    "last_fire_at": fire_times[-1] if fire_times else None,
                },
            )
        return FireResult(
            schedule=record,
            db_now=now,
            fire_times=fire_times,
            task_ids=tuple(task_ids),
            queues=tuple(r.queue for r in requests),
            next_fire_at=due.next_fire_at,
            missed=due.missed,
            already_run=tuple(f for f in due.fire_times if f not in run_ids),
        )

    # -- code-declared schedules -----------------------------------------------------------------

    async def sync(self, definitions: Sequence[ScheduleDefinition]) -> SyncReport:
        """Make the ``source='code'`` rows match ``definitions``: insert new ones, update changed ones,
        re-enable ones that were removed and are back, disable (never delete) ones no longer declared.
        Rows created through the API are never touched, even under a name the code also uses."""
        report = SyncReport()
        wanted = {d.name: d for d in definitions}
        async with self._transaction() as conn:
            await conn.execute(select(func.pg_advisory_xact_lock(_SYNC_LOCK_KEY)))
            now = await _db_now(conn)
            query = select(schedules).where(or_(schedules.c.name.in_(list(wanted)), schedules.c.source == "code"))
            existing = {r["name"]: r for r in (await conn.execute(query.with_for_update())).mappings()}
            for name, definition in wanted.items():
                row = existing.get(name)
                if row is None:
                    await conn.execute(schedules.insert().values(_insert_values(definition, "code", now)))
                    report.created.append(name)
                elif row["source"] != "code":
                    report.conflicts.append(name)
                else:
                    await self._sync_one(conn, record_from_row(dict(row)), definition, now, report)
            for name, row in existing.items():
                if row["source"] == "code" and name not in wanted and row["enabled"]:
                    await conn.execute(
                        update(schedules)
                        .where(schedules.c.id == row["id"])
                        .values(enabled=False, disabled_reason="removed", updated_at=func.now())
                    )
                    report.disabled.append(name)
        return report

    async def _sync_one(
        self,
        conn: AsyncConnection,
        current: ScheduleRecord,
        definition: ScheduleDefinition,
        now: datetime,
        report: SyncReport,
    ) -> None:
        values: dict[str, Any] = {}
        if current.definition != definition:
            values.update(_definition_values(definition))
            report.updated.append(definition.name)
        if current.definition.timing != definition.timing:
            values["next_fire_at"] = next_fire_after(definition.timing, now)
        if current.disabled_reason == "removed":
            # Back in the code: it fires again from now on, with no catch-up for the time it was gone.
            values.update(enabled=True, disabled_reason=None, next_fire_at=next_fire_after(definition.timing, now))
            report.reenabled.append(definition.name)
        if values:
            await conn.execute(
                update(schedules).where(schedules.c.id == current.id).values(**values, updated_at=func.now())
            )

    # -- reads and operator actions --------------------------------------------------------------

    async def list_all(self) -> list[ScheduleRecord]:
        async with self._transaction() as conn:
            rows = (await conn.execute(select(schedules).order_by(schedules.c.name))).mappings().all()
        return [record_from_row(dict(r)) for r in rows]

    async def get(self, ref: int | str) -> ScheduleRecord:
        """A schedule by id, or by name when ``ref`` is a string."""
        async with self._transaction() as conn:
            return record_from_row(await _locked(conn, ref, lock=False))

    async def create(self, definition: ScheduleDefinition, source: ScheduleSource = "api") -> ScheduleRecord:
        try:
            async with self._transaction() as conn:
                now = await _db_now(conn)
                row = (
                    (
                        await conn.execute(
                            schedules.insert().values(_insert_values(definition, source, now)).returning(schedules)
                        )
                    )
                    .mappings()
                    .one()
                )
        except IntegrityError:
            raise ScheduleConflict(f"a schedule named {definition.name!r} already exists") from None
        return record_from_row(dict(row))

    async def update(self, schedule_id: int, definition: ScheduleDefinition) -> ScheduleRecord:
        """Replace an API schedule's definition. A new timing starts from now (no catch-up)."""
        try:
            async with self._transaction() as conn:
                current = record_from_row(await _locked(conn, schedule_id))
                _refuse_code(current, "change")
                values = _definition_values(definition)
                if current.definition.timing != definition.timing:
                    values["next_fire_at"] = next_fire_after(definition.timing, await _db_now(conn))
                row = await _update_returning(conn, schedule_id, values)
        except IntegrityError:
            raise ScheduleConflict(f"a schedule named {definition.name!r} already exists") from None
        return record_from_row(row)

    async def delete(self, schedule_id: int) -> None:
        """Delete a schedule and its runs (the tasks stay). A code-declared schedule can only be deleted
        once it has been removed from the code: otherwise the next start would bring it back."""
        async with self._transaction() as conn:
            current = record_from_row(await _locked(conn, schedule_id))
            if current.source == "code" and current.disabled_reason != "removed":
                _refuse_code(current, "delete")
            await conn.execute(schedules.delete().where(schedules.c.id == schedule_id))

    async def pause(self, schedule_id: int) -> ScheduleRecord:
        async with self._transaction() as conn:
            await _locked(conn, schedule_id)
            return record_from_row(
                await _update_returning(conn, schedule_id, {"enabled": False, "disabled_reason": "paused"})
            )

    async def resume(self, schedule_id: int) -> ScheduleRecord:
        """Enable a schedule again. Fire times that passed while it was disabled were not missed, they were
        not wanted: it resumes from the next one (whatever its misfire policy)."""
        async with self._transaction() as conn:
            current = record_from_row(await _locked(conn, schedule_id))
            if current.enabled:
                return current
            # Never behind the old cursor: the fire times before it have been dealt with.
            resume_at = max(current.next_fire_at, next_fire_after(current.definition.timing, await _db_now(conn)))
            values = {"enabled": True, "disabled_reason": None, "next_fire_at": resume_at}
            return record_from_row(await _update_returning(conn, schedule_id, values))

    async def trigger(self, schedule_id: int, build: BuildRequest) -> ScheduleRun:
        """Enqueue one run now, outside the cadence (needs no leader: it is not a tick). The run is keyed
        by the trigger's own time, to the microsecond, like any other run, and recorded before its task
        is enqueued, like a tick's."""
        async with self._transaction() as conn:
            # Not locked: a trigger neither waits for a tick in flight nor holds one up.
            record = record_from_row(await _locked(conn, schedule_id, lock=False))
            claimed: list[Row] = []
            while not claimed:  # empty: a run already has this exact microsecond, take the next one
                claimed = await execute_async(conn, CLAIM_MANUAL_RUN, {"id": schedule_id})
            run = claimed[0]
            task_ids = await _enqueue(conn, [build(record, run["fire_at"])])
            await execute_async(conn, LINK_RUNS, {"run_ids": [run["id"]], "task_ids": task_ids})
        return ScheduleRun(schedule_id, run["fire_at"], task_ids[0], run["enqueued_at"], "manual", None)

    async def runs(self, schedule_id: int, *, limit: int = 50, before: datetime | None = None) -> list[ScheduleRun]:
        """The schedule's runs, latest fire time first, with the current state of each task."""
        query = (
            select(schedule_runs, tasks.c.state.label("task_state"))
            .select_from(schedule_runs.outerjoin(tasks, tasks.c.id == schedule_runs.c.task_id))
            .where(schedule_runs.c.schedule_id == schedule_id)
            .order_by(schedule_runs.c.fire_at.desc())
            .limit(limit)
        )
        if before is not None:
            query = query.where(schedule_runs.c.fire_at < before)
        async with self._transaction() as conn:
            await _locked(conn, schedule_id, lock=False)
            rows = (await conn.execute(query)).mappings().all()
        return [
            ScheduleRun(
                r["schedule_id"],
                r["fire_at"],
                r["task_id"],
                r["enqueued_at"],
                r["kind"],
                r["fencing_token"],
                r["task_state"],
            )
            for r in rows
        ]


async def limit_transaction(conn: AsyncConnection, limits: TransactionLimits) -> None:
    """Apply ``limits`` to the transaction open on ``conn``, for it alone."""
    await execute_async(
        conn,
        LIMIT_TRANSACTION,
        {
            "lock": _ms(limits.lock_timeout_s),
            "statement": _ms(limits.statement_timeout_s),
            "idle": _ms(limits.idle_timeout_s),
        },
    )


async def _enqueue(conn: AsyncConnection, requests: Sequence[EnqueueRequest]) -> list[int]:
    """Enqueue the standard way (rows, history, wake-ups) on the tick's own transaction; task ids in order."""
    if not requests:
        return []
    try:
        return [r.id for r in await drive_async(enqueue_plan(requests), conn)]
    except IdempotencyConflict:
        pass
    # A task already holds one of these keys with other arguments: only possible if someone edited rows by
    # hand. That task *is* the run (one task per fire time above all), so it is taken as it is.
    ids: list[int] = []
    for request in requests:
        try:
            ids.append((await drive_async(enqueue_plan([request]), conn))[0].id)
        except IdempotencyConflict as exc:
            log.warning("run %s already has task %s with other arguments; keeping it", exc.key, exc.existing_id)
            ids.append(exc.existing_id)
    return ids


async def _db_now(conn: AsyncConnection) -> datetime:
    now: datetime = (await conn.execute(select(func.now()))).scalar_one()
    return now


async def _locked(conn: AsyncConnection, ref: int | str, *, lock: bool = True) -> Row:
    query = select(schedules).where(schedules.c.name == ref if isinstance(ref, str) else schedules.c.id == ref)
    row = (await conn.execute(query.with_for_update() if lock else query)).mappings().first()
    if row is None:
        raise ScheduleNotFound(ref)
    return dict(row)


async def _update_returning(conn: AsyncConnection, schedule_id: int, values: dict[str, Any]) -> Row:
    statement = (
        update(schedules)
        .where(schedules.c.id == schedule_id)
        .values(**values, updated_at=func.now())
        .returning(schedules)
    )
    return dict((await conn.execute(statement)).mappings().one())


def _refuse_code(record: ScheduleRecord, action: str) -> None:
    if record.source == "code":
        raise ScheduleConflict(
            f"schedule {record.name!r} is declared in code: {action} it there (pause and resume work here)"
        )


def _definition_values(definition: ScheduleDefinition) -> dict[str, Any]:
    timing = definition.timing
    return {
        "name": definition.name,
        "task_name": definition.task_name,
        "cron": timing.cron,
        "interval_s": timing.interval_s,
        "timezone": timing.timezone,
        "args": list(definition.args),
        "kwargs": dict(definition.kwargs),
        "queue": definition.queue,
        "priority": definition.priority,
        "misfire_policy": definition.misfire,
        "max_lateness_s": definition.max_lateness_s,
    }


def _insert_values(definition: ScheduleDefinition, source: ScheduleSource, now: datetime) -> dict[str, Any]:
    # A new schedule starts with the first fire time after its creation: nothing before it was missed.
    return {
        **_definition_values(definition),
        "source": source,
        "next_fire_at": next_fire_after(definition.timing, now),
    }


def _ms(seconds: float) -> str:
    return f"{max(1, round(seconds * 1000))}ms"


def record_from_row(row: Row) -> ScheduleRecord:
    definition = ScheduleDefinition(
        name=row["name"],
        task_name=row["task_name"],
        timing=Timing(cron=row["cron"], interval_s=row["interval_s"], timezone=row["timezone"]),
        args=tuple(row["args"]),
        kwargs=row["kwargs"],
        queue=row["queue"],
        priority=row["priority"],
        misfire=row["misfire_policy"],
        max_lateness_s=row["max_lateness_s"],
    )
    return ScheduleRecord(
        id=int(row["id"]),
        definition=definition,
        enabled=row["enabled"],
        disabled_reason=row["disabled_reason"],
        next_fire_at=row["next_fire_at"],
        last_fire_at=row["last_fire_at"],
        source=row["source"],
        created_at=row["created_at"],
        updated_at=row["updated_at"],
    )
