"""Operator maintenance: retention (prune), the maintenance switch, and marking silent workers stopped.

Prune deletes finished tasks older than the retention in batches of :data:`PRUNE_BATCH`, each batch its
own short transaction found through the partial ``finished_at`` index (never a scan of the table), so
it holds few locks for a short time and can be interrupted anywhere without losing work. The cut-off
is fixed when the call starts, so a prune always ends, however fast tasks finish meanwhile. On request
it first prunes schedule runs by the same age, keeping each schedule's newest ones and never touching a
run near its schedule's cursor (:mod:`conveyor.db.schedule_run_retention` explains why that is safe).

Maintenance pauses queues through ``conveyor_queues.paused``, which every worker's claim statement
already honours at its next claim; the ``conveyor_maintenance`` row remembers which queues it paused,
so resuming leaves a queue an operator had paused before exactly as it was.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from conveyor.core.states import TERMINAL_STATES, TaskState
from conveyor.db.errors import translate_errors
from conveyor.db.executors import execute_async
from conveyor.db.schedule_run_retention import ScheduleRunRetention
from conveyor.db.task_sql import WAKEUP_CHANNEL

#: Tasks deleted per statement by a prune.
PRUNE_BATCH = 5_000

_CUTOFF = "SELECT now() - make_interval(secs => %(older_than_s)s) AS cutoff"

# One batch: the oldest finished tasks before the cut-off (walking the partial finished_at index), locked
# without waiting for anyone (a task being retried right now is skipped and left as it is).
_PRUNE = """
WITH doomed AS (
    SELECT id FROM conveyor_tasks
    WHERE finished_at IS NOT NULL AND finished_at < %(cutoff)s AND state = ANY(%(states)s::text[])
    ORDER BY finished_at
    LIMIT %(batch)s
    FOR UPDATE SKIP LOCKED
),
deleted AS (
    DELETE FROM conveyor_tasks t USING doomed
    WHERE t.id = doomed.id AND t.state = ANY(%(states)s::text[]) AND t.finished_at < %(cutoff)s
    RETURNING t.id
)
SELECT count(*) AS n FROM deleted
"""

# Debug requests nobody waits for any more (answered and read, or given up on).
_PRUNE_DEBUG = "DELETE FROM conveyor_debug_requests WHERE expires_at < now() - interval '1 hour'"

# Every queue name in use: those holding tasks (a loose index scan over (queue, id): one probe per
# distinct queue, not a read of every task), those with settings, and those a live worker consumes.
_KNOWN_QUEUES = """
WITH RECURSIVE used AS (
    (SELECT queue FROM conveyor_tasks ORDER BY queue LIMIT 1)
    UNION ALL
    SELECT (SELECT t.queue FROM conveyor_tasks t WHERE t.queue > used.queue ORDER BY t.queue LIMIT 1)
    FROM used WHERE used.queue IS NOT NULL
)
SELECT queue AS name FROM used WHERE queue IS NOT NULL
UNION
SELECT name FROM conveyor_queues
UNION
SELECT unnest(queues) FROM conveyor_workers WHERE state <> 'stopped'
"""

_MAINTENANCE_INIT = "INSERT INTO conveyor_maintenance (id) VALUES (1) ON CONFLICT (id) DO NOTHING"
_MAINTENANCE_LOCK = "SELECT active, reason, paused_queues, changed_at FROM conveyor_maintenance WHERE id = 1 FOR UPDATE"
_MAINTENANCE_READ = "SELECT active, reason, paused_queues, changed_at FROM conveyor_maintenance WHERE id = 1"
_PAUSED = "SELECT name FROM conveyor_queues WHERE paused"
_PAUSE_QUEUES = """
INSERT INTO conveyor_queues (name, paused) SELECT unnest(%(names)s::text[]), true
ON CONFLICT (name) DO UPDATE SET paused = true, updated_at = now()
"""
# Rows are locked in "C" name order first, the order in which workers lock limited queues' rows
# (conveyor.db.limit_sql.LOCK_QUEUES): an UPDATE alone takes them in whatever order its scan meets them,
# and against a worker holding two of the same rows that could deadlock.
_RESUME_QUEUES = """
WITH locked AS MATERIALIZED (
    SELECT name FROM conveyor_queues WHERE name = ANY(%(names)s::text[]) AND paused
    ORDER BY name COLLATE "C" FOR UPDATE
)
UPDATE conveyor_queues q SET paused = false, updated_at = now()
FROM locked WHERE q.name = locked.name
RETURNING q.name
"""
_MAINTENANCE_SET = """
UPDATE conveyor_maintenance
SET active = %(active)s, reason = %(reason)s, paused_queues = %(paused)s::text[], changed_at = now()
WHERE id = 1
RETURNING active, reason, paused_queues, changed_at
"""
_WAKE = "SELECT pg_notify(%(channel)s, q) FROM unnest(%(names)s::text[]) AS q"

# Workers that stopped heartbeating without saying goodbye (killed, host lost). Their tasks are
# rescued by lease expiry regardless; this only makes the registry tell the truth. A worker that was
# merely slow sets its state back to running with its next heartbeat.
_MARK_SILENT_STOPPED = """
UPDATE conveyor_workers SET state = 'stopped', stopped_at = now()
WHERE state <> 'stopped' AND last_heartbeat_at < now() - make_interval(secs => %(silent_s)s)
RETURNING id::text AS id, name
"""


@dataclass(frozen=True)
class PruneReport:
    deleted: int
    batches: int
    cutoff: datetime
    more: bool  # stopped at the limit or the time budget: call again for the rest
    schedule_runs_deleted: int = 0


@dataclass(frozen=True)
class MaintenanceState:
    active: bool
    reason: str | None
    since: datetime | None  # when it was last switched
    paused_queues: list[str]  # the queues maintenance paused (and will resume)
    unpaused_queues: list[str]  # known queues not paused now (e.g. first used during maintenance)
    changed: list[str]  # the queues this call paused or resumed


@dataclass(frozen=True)
class SilentWorker:
    id: str
    name: str


class AdminStore:
    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine

    # -- retention -------------------------------------------------------------------------------

    async def prune(
        self,
        older_than_s: float,
        *,
        states: Sequence[TaskState] = tuple(TERMINAL_STATES),
        batch: int = PRUNE_BATCH,
        limit: int | None = None,
        budget_s: float | None = None,
        schedule_runs_keep: int | None = None,
    ) -> PruneReport:
        """Delete tasks that finished (in ``states``) more than ``older_than_s`` seconds ago, with their
        history, ``batch`` per statement, until none is left, ``limit`` are deleted or ``budget_s``
        seconds have passed.

        With ``schedule_runs_keep``, first delete schedule runs fired more than ``older_than_s`` seconds
        ago beyond each schedule's ``schedule_runs_keep`` newest (within the same time budget; ``limit``
        counts tasks only). Runs go first: each task deleted afterwards then has fewer runs to unlink."""
        wanted = sorted(s.value for s in states if s in TERMINAL_STATES)
        started = time.monotonic()
        deleted = batches = runs_deleted = 0
        runs_more = False
        if schedule_runs_keep is not None:
            runs = await ScheduleRunRetention(self.engine).prune(
                older_than_s, keep_newest=schedule_runs_keep, batch=batch, budget_s=budget_s
            )
            runs_deleted, batches, runs_more = runs.deleted, runs.batches, runs.more
        with translate_errors():
            async with self.engine.connect() as conn:
                cutoff: datetime = (await execute_async(conn, _CUTOFF, {"older_than_s": older_than_s}))[0]["cutoff"]
                await conn.commit()
                more = bool(wanted)
                while more:
                    size = batch if limit is None else min(batch, limit - deleted)
                    if size <= 0:
                        break
                    params = {"cutoff": cutoff, "states": wanted, "batch": size}
                    n = int((await execute_async(conn, _PRUNE, params))[0]["n"])
                    await conn.commit()
                    deleted += n
                    batches += 1
                    more = n == size
                    if budget_s is not None and time.monotonic() - started >= budget_s:
                        break
                await execute_async(conn, _PRUNE_DEBUG, {})
                await conn.commit()
        return PruneReport(
            deleted=deleted,
            batches=batches,
            cutoff=cutoff,
            more=more or runs_more,
            schedule_runs_deleted=runs_deleted,
        )

    # -- maintenance -----------------------------------------------------------------------------

    async def maintenance(self) -> MaintenanceState:
        with translate_errors():
            async with self.engine.connect() as conn:
                rows = await execute_async(conn, _MAINTENANCE_READ, {})
                return await self._state(conn, rows[0] if rows else None, [])

    async def pause_all(self, reason: str | None = None) -> MaintenanceState:
        """Pause every known queue not paused yet, remembering which; calling it again during
        maintenance pauses the queues that appeared since."""
        with translate_errors():
            async with self.engine.begin() as conn:
                current = await self._lock(conn)
                known = await _names(conn, _KNOWN_QUEUES)
                paused = set(await _names(conn, _PAUSED))
                newly = sorted(set(known) - paused)
                if newly:
                    await execute_async(conn, _PAUSE_QUEUES, {"names": newly})
                remembered = sorted(set(current["paused_queues"]) | set(newly))
                params = {"active": True, "reason": reason or current["reason"], "paused": remembered}
                row = (await execute_async(conn, _MAINTENANCE_SET, params))[0]
                return await self._state(conn, row, newly)

    async def resume_all(self) -> MaintenanceState:
        """Resume the queues maintenance paused (those still paused) and end maintenance."""
        with translate_errors():
            async with self.engine.begin() as conn:
                current = await self._lock(conn)
                resumed: list[str] = []
                if current["paused_queues"]:
                    rows = await execute_async(conn, _RESUME_QUEUES, {"names": list(current["paused_queues"])})
                    resumed = sorted(r["name"] for r in rows)
                    if resumed:
                        # Workers sleeping until their next poll hear of it now (delivered at commit).
                        await execute_async(conn, _WAKE, {"channel": WAKEUP_CHANNEL, "names": resumed})
                row = (await execute_async(conn, _MAINTENANCE_SET, {"active": False, "reason": None, "paused": []}))[0]
                return await self._state(conn, row, resumed)

    async def _lock(self, conn: AsyncConnection) -> dict[str, Any]:
        await execute_async(conn, _MAINTENANCE_INIT, {})
        return (await execute_async(conn, _MAINTENANCE_LOCK, {}))[0]

    async def _state(self, conn: AsyncConnection, row: dict[str, Any] | None, changed: list[str]) -> MaintenanceState:
        known = set(await _names(conn, _KNOWN_QUEUES))
        paused = set(await _names(conn, _PAUSED))
        if row is None:
            return MaintenanceState(False, None, None, [], sorted(known - paused), changed)
        return MaintenanceState(
            active=bool(row["active"]),
            reason=row["reason"],
            since=row["changed_at"],
            paused_queues=sorted(row["paused_queues"]),
            unpaused_queues=sorted(known - paused),
            changed=changed,
        )

    # -- workers ---------------------------------------------------------------------------------

    async def mark_silent_workers_stopped(self, silent_s: float) -> list[SilentWorker]:
        """Mark stopped the workers whose last heartbeat is older than ``silent_s`` seconds (database
        clock) and that never said they stopped."""
        with translate_errors():
            async with self.engine.begin() as conn:
                rows = await execute_async(conn, _MARK_SILENT_STOPPED, {"silent_s": silent_s})
        return [SilentWorker(id=r["id"], name=r["name"]) for r in rows]


async def _names(conn: AsyncConnection, sql: str) -> list[str]:
    return [str(r["name"]) for r in await execute_async(conn, sql, {})]
