"""Scheduler processes reporting themselves (``conveyor_scheduler_processes``), and what operators read.

``conveyor api`` usually runs apart from ``conveyor scheduler``, so a scheduler's health has to be in the
database to be seen: each scheduler process upserts its own row once per lease cycle (one statement, in
its own short transaction with server-side timeouts, on the database clock) and deletes it when it stops
gracefully. A process killed or cut off leaves its row behind, no longer refreshed: readers call it
stale, and the leader deletes it after a retention period.

Nothing here touches the tables a tick writes, and no statement here waits on a tick's locks: reporting
can never hold up enqueueing.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from conveyor.core.schedule_records import Lease, SchedulerOverview, SchedulerProcess
from conveyor.db.errors import translate_errors
from conveyor.db.executors import execute_async
from conveyor.db.schedule_store import LEADER_LEASE, TransactionLimits, limit_transaction

#: Processes listed at most, most recently seen first (a crash-looping scheduler leaves a row per start).
OVERVIEW_LIMIT = 100

# started_at and host/pid are set once; everything else is the state as of this report.
REPORT = """
INSERT INTO conveyor_scheduler_processes AS p
    (id, host, pid, stale_after_s, is_leader, fencing_token, clock_skew_s, warning)
VALUES (%(id)s, %(host)s, %(pid)s, %(stale_after_s)s, %(leading)s, %(token)s, %(skew_s)s, %(warning)s)
ON CONFLICT (id) DO UPDATE
SET last_seen_at = now(), stale_after_s = EXCLUDED.stale_after_s, is_leader = EXCLUDED.is_leader,
    fencing_token = EXCLUDED.fencing_token, clock_skew_s = EXCLUDED.clock_skew_s, warning = EXCLUDED.warning
"""

WITHDRAW = "DELETE FROM conveyor_scheduler_processes WHERE id = %(id)s RETURNING id"

# A row is deleted only once it is both stale by its own measure and older than the retention, so a live
# process (which re-creates its row at its next report anyway) is never pruned in passing.
PRUNE_STALE = """
DELETE FROM conveyor_scheduler_processes
WHERE last_seen_at < now() - make_interval(secs => GREATEST(stale_after_s, %(retention_s)s))
RETURNING id, last_seen_at
"""

# Always one row: the database clock, with the lease if there is one.
LEASE_NOW = """
SELECT now() AS checked_at, l.name, l.holder, l.fencing_token, l.expires_at, l.acquired_at, l.renewed_at
FROM (SELECT 1) AS one LEFT JOIN conveyor_leases l ON l.name = %(name)s
"""

PROCESSES = """
SELECT id, host, pid, started_at, last_seen_at, stale_after_s, is_leader, fencing_token, clock_skew_s, warning,
       GREATEST(0, EXTRACT(EPOCH FROM clock_timestamp() - last_seen_at))::float8 AS seen_age_s
FROM conveyor_scheduler_processes
ORDER BY last_seen_at DESC, id
LIMIT %(limit)s
"""


class SchedulerProcessStore:
    """The rows scheduler processes keep about themselves; each method is one short transaction."""

    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine

    @asynccontextmanager
    async def _transaction(self, limits: TransactionLimits | None = None) -> AsyncIterator[AsyncConnection]:
        with translate_errors():
            async with self.engine.begin() as conn:
                if limits is not None:
                    await limit_transaction(conn, limits)
                yield conn

    async def report(
        self,
        process_id: str,
        *,
        host: str,
        pid: int,
        stale_after_s: float,
        leading: bool,
        fencing_token: int | None,
        clock_skew_s: float | None,
        warning: str | None,
        limits: TransactionLimits,
    ) -> None:
        """Create or refresh this process's row (``last_seen_at`` is the database's ``now()``)."""
        params = {
            "id": process_id,
            "host": host,
            "pid": pid,
            "stale_after_s": stale_after_s,
            "leading": leading,
            "token": fencing_token if leading else None,
            "skew_s": clock_skew_s,
            "warning": warning,
        }
        async with self._transaction(limits) as conn:
            await execute_async(conn, REPORT, params)

    async def withdraw(self, process_id: str, *, limits: TransactionLimits) -> bool:
        """Delete this process's row (it stops gracefully). True if there was one."""
        async with self._transaction(limits) as conn:
            rows = await execute_async(conn, WITHDRAW, {"id": process_id})
        return bool(rows)

    async def prune_stale(self, retention_s: float, *, limits: TransactionLimits) -> list[str]:
        """Delete the rows of processes not seen for ``retention_s`` seconds; the ids deleted."""
        async with self._transaction(limits) as conn:
            rows = await execute_async(conn, PRUNE_STALE, {"retention_s": retention_s})
        return [str(r["id"]) for r in rows]

    async def overview(self, *, limit: int = OVERVIEW_LIMIT) -> SchedulerOverview:
        """The leader lease and the processes (at most ``limit``, most recently seen first), read together."""
        async with self._transaction() as conn:
            head = (await execute_async(conn, LEASE_NOW, {"name": LEADER_LEASE}))[0]
            rows = await execute_async(conn, PROCESSES, {"limit": limit})
        lease = None
        if head["holder"] is not None:
            lease = Lease(
                name=head["name"],
                holder=head["holder"],
                fencing_token=int(head["fencing_token"]),
                expires_at=head["expires_at"],
                acquired_at=head["acquired_at"],
                renewed_at=head["renewed_at"],
            )
        processes = tuple(
            SchedulerProcess(
                id=r["id"],
                host=r["host"],
                pid=int(r["pid"]),
                started_at=r["started_at"],
                last_seen_at=r["last_seen_at"],
                stale_after_s=float(r["stale_after_s"]),
                leading=bool(r["is_leader"]),
                fencing_token=None if r["fencing_token"] is None else int(r["fencing_token"]),
                clock_skew_s=r["clock_skew_s"],
                warning=r["warning"],
                seen_age_s=float(r["seen_age_s"]),  # never negative (see PROCESSES)
            )
            for r in rows
        )
        return SchedulerOverview(checked_at=head["checked_at"], lease=lease, processes=processes)
