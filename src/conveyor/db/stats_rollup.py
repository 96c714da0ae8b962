"""The task statistics rollup (``conveyor_task_stats``, see ``models_analytics``): counting finished
minutes once, so analytics never has to count millions of tasks again.

Which minutes are safe to roll up: a task's ``created_at`` is its transaction's start, so a minute is
only final once no transaction that began in it is still open. The roll-up stops before the oldest
open transaction of the database (but never more than an hour behind, so a forgotten idle session
cannot stall it) and at least a minute in the past. New minutes go first; then history is counted
backwards, a chunk per transaction, back to the retention horizon; rows past it are deleted. Whoever
holds the progress row rolls up; a concurrent caller skips (``SKIP LOCKED``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from conveyor.db.errors import translate_errors
from conveyor.db.executors import execute_async

#: Rollup rows are kept this long (a day more than the longest analytics window).
STATS_RETENTION_S = 8 * 86_400
#: Most minutes one roll-up statement covers (a backlog is worked through in chunks of this size).
ROLLUP_CHUNK_S = 3_600

_ROLLUP_LOCK = """
SELECT rolled_from, rolled_until,
       date_trunc('minute', now() - interval '1 minute') AS settled_limit,
       (SELECT min(xact_start) FROM pg_stat_activity
        WHERE datname = current_database() AND xact_start IS NOT NULL AND pid <> pg_backend_pid()) AS oldest_xact,
       now() AS now
FROM conveyor_task_stats_progress WHERE id = 1
FOR UPDATE SKIP LOCKED
"""

_ROLLUP_INIT = """
INSERT INTO conveyor_task_stats_progress (id, rolled_from, rolled_until)
VALUES (1, date_trunc('minute', now()), date_trunc('minute', now()))
ON CONFLICT (id) DO NOTHING
"""

# Count the minutes [lo, hi) into the rollup: what was enqueued in them (created_at) and what
# finished in them (finished_at), per (queue, name) and as the totals per queue, per name and overall
# ('' stands for "all"). Both ranges are index scans (BRIN on created_at, B-tree on finished_at).
# A minute is only ever rolled up once (the progress row is locked and moved in the same transaction);
# the ON CONFLICT adds rather than fails so that a repair that rolls a range again cannot lose counts.
_ROLLUP = """
WITH created AS (
    SELECT date_trunc('minute', created_at) AS minute, queue, name, count(*) AS enqueued
    FROM conveyor_tasks
    WHERE created_at >= %(lo)s AND created_at < %(hi)s
    GROUP BY 1, 2, 3
),
finished AS (
    SELECT date_trunc('minute', finished_at) AS minute, queue, name,
           count(*) FILTER (WHERE state = 'succeeded') AS succeeded,
           count(*) FILTER (WHERE state = 'dead') AS dead,
           count(*) FILTER (WHERE state = 'cancelled') AS cancelled,
           count(started_at) AS run_count,
           COALESCE(sum(EXTRACT(EPOCH FROM finished_at - started_at)::float8), 0) AS run_s_sum,
           COALESCE(sum(GREATEST(EXTRACT(EPOCH FROM started_at - run_at)::float8, 0)), 0) AS wait_s_sum
    FROM conveyor_tasks
    WHERE finished_at IS NOT NULL AND finished_at >= %(lo)s AND finished_at < %(hi)s
    GROUP BY 1, 2, 3
),
merged AS (
    SELECT COALESCE(c.minute, f.minute) AS minute, COALESCE(c.queue, f.queue) AS queue,
           COALESCE(c.name, f.name) AS name, COALESCE(c.enqueued, 0) AS enqueued,
           COALESCE(f.succeeded, 0) AS succeeded, COALESCE(f.dead, 0) AS dead,
           COALESCE(f.cancelled, 0) AS cancelled, COALESCE(f.run_count, 0) AS run_count,
           COALESCE(f.run_s_sum, 0) AS run_s_sum, COALESCE(f.wait_s_sum, 0) AS wait_s_sum
    FROM created c FULL JOIN finished f ON f.minute = c.minute AND f.queue = c.queue AND f.name = c.name
),
inserted AS (
    INSERT INTO conveyor_task_stats AS s
        (queue, name, minute, enqueued, succeeded, dead, cancelled, run_count, run_s_sum, wait_s_sum)
    SELECT COALESCE(queue, ''), COALESCE(name, ''), minute, sum(enqueued), sum(succeeded), sum(dead),
           sum(cancelled), sum(run_count), sum(run_s_sum), sum(wait_s_sum)
    FROM merged
    GROUP BY GROUPING SETS ((minute, queue, name), (minute, queue), (minute, name), (minute))
    ON CONFLICT (queue, name, minute) DO UPDATE SET
        enqueued = s.enqueued + EXCLUDED.enqueued, succeeded = s.succeeded + EXCLUDED.succeeded,
        dead = s.dead + EXCLUDED.dead, cancelled = s.cancelled + EXCLUDED.cancelled,
        run_count = s.run_count + EXCLUDED.run_count, run_s_sum = s.run_s_sum + EXCLUDED.run_s_sum,
        wait_s_sum = s.wait_s_sum + EXCLUDED.wait_s_sum
    RETURNING 1
)
SELECT count(*) AS rows FROM inserted
"""

_ROLLUP_MOVE = """
UPDATE conveyor_task_stats_progress SET rolled_from = %(rolled_from)s, rolled_until = %(rolled_until)s WHERE id = 1
"""

_ROLLUP_EXPIRE = "DELETE FROM conveyor_task_stats WHERE minute < %(before)s"


@dataclass(frozen=True)
class RollupReport:
    rolled_from: datetime | None
    rolled_until: datetime | None
    rows: int
    skipped: bool  # another process was rolling up


class StatsRollup:
    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine

    # -- the rollup ------------------------------------------------------------------------------

    async def roll_up(self, *, budget_s: float = 0.5, chunk_s: float = ROLLUP_CHUNK_S) -> RollupReport:
        """Count settled minutes into the rollup: first the new ones, then (history) older ones back to
        the retention horizon, a chunk per transaction, until ``budget_s`` seconds have been spent.

        Safe to call from many processes at once: whoever does not get the progress row skips."""
        started = time.monotonic()
        rows = 0
        rolled_from: datetime | None = None
        rolled_until: datetime | None = None
        with translate_errors():
            async with self.engine.connect() as conn:
                await execute_async(conn, _ROLLUP_INIT, {})
                await conn.commit()
                while True:
                    step = await self._roll_step(conn, chunk_s)
                    await conn.commit()
                    if step is None:
                        return RollupReport(rolled_from, rolled_until, rows, skipped=rolled_until is None)
                    rolled_from, rolled_until, added, more = step
                    rows += added
                    if not more or time.monotonic() - started >= budget_s:
                        return RollupReport(rolled_from, rolled_until, rows, skipped=False)

    async def _roll_step(self, conn: AsyncConnection, chunk_s: float) -> tuple[datetime, datetime, int, bool] | None:
        found = await execute_async(conn, _ROLLUP_LOCK, {})
        if not found:
            return None  # another process holds the progress row
        row = found[0]
        rolled_from, rolled_until, now = row["rolled_from"], row["rolled_until"], row["now"]
        settled = row["settled_limit"]
        oldest = row["oldest_xact"]
        if oldest is not None:
            # Not past a transaction still open (its tasks may yet appear with created_at inside it),
            # unless it has been open for over an hour: then its stragglers are the price of progress.
            floor = _minute(now - timedelta(hours=1))
            settled = min(settled, max(_minute(oldest), floor))
        horizon = _minute(now - timedelta(seconds=STATS_RETENTION_S))
        if rolled_until < horizon:
            rolled_from = rolled_until = horizon  # everything rolled up so far has expired: start afresh
        chunk = timedelta(seconds=chunk_s)
        added = 0
        if settled > rolled_until:
            hi = min(settled, rolled_until + chunk)
            added += await self._roll_range(conn, rolled_until, hi)
            rolled_until = hi
        elif rolled_from > horizon:
            lo = max(horizon, rolled_from - chunk)
            added += await self._roll_range(conn, lo, rolled_from)
            rolled_from = lo
        if rolled_from < horizon:
            await execute_async(conn, _ROLLUP_EXPIRE, {"before": horizon})
            rolled_from = horizon
        await execute_async(conn, _ROLLUP_MOVE, {"rolled_from": rolled_from, "rolled_until": rolled_until})
        more = settled > rolled_until or rolled_from > horizon
        return rolled_from, rolled_until, added, more

    async def _roll_range(self, conn: AsyncConnection, lo: datetime, hi: datetime) -> int:
        rows = await execute_async(conn, _ROLLUP, {"lo": lo, "hi": hi})
        return int(rows[0]["rows"]) if rows else 0


def _minute(moment: datetime) -> datetime:
    return moment.replace(second=0, microsecond=0)
