"""Retention of ``conveyor_schedule_runs``: a one-second schedule adds 86,400 runs a day.

A run may be deleted when all three hold:

* its fire time is older than the retention (database clock);
* it is not among the ``keep_newest`` latest runs of its schedule, so a schedule that fires once a month
  keeps its history however old it is;
* its fire time is at least :data:`CURSOR_MARGIN_S` behind its schedule's cursor (``next_fire_at``).

**Why deleting a run can never let its fire time be enqueued again.** Three things stand between a fire
time and a second enqueue: the schedule's cursor, the unique (schedule, fire time) row here, and the
task's idempotency key ``schedule:<id>:<fire time>``. A tick inserts its runs first (``ON CONFLICT DO
NOTHING``) and enqueues only the fire times whose row it inserted, so while a run exists its fire time
cannot be enqueued again, whatever became of its task (the key holds only while the task exists, and
tasks are pruned on their own). Deleting a run takes that guard away, so for a deleted run the guarantee
is the cursor: a tick only ever enqueues fire times at or after ``next_fire_at``
(``core.schedule.due_fire_times``), and the cursor never moves back. A tick advances it past what it
dealt with; a new timing, a resume or a code schedule coming back set it to the next fire time after the
database's ``now()``, which is later than every fire time already recorded (a run is recorded at or
after its fire time). A run far behind the cursor is therefore out of every tick's reach, and deleting
it changes nothing a tick can do. The margin keeps the run rows, and with them the guard, wherever the
cursor could still plausibly be put back (by hand, as in the tests' "cursor moved back" case, or by a
database clock stepped back just before a cursor reset): a fire time reached again there meets its run
row and is not enqueued again, even if its task was pruned.

Deleting goes schedule by schedule (walking the unique (schedule_id, fire_at) index), oldest first, at
most ``batch`` runs per statement, each statement its own short transaction. Rows locked by someone else
(a task being pruned nulls its run's ``task_id``) are skipped, not waited for. A pass stops when its time
budget is spent or its caller says so, and the next pass carries on.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

from sqlalchemy.ext.asyncio import AsyncEngine

from conveyor.db.errors import translate_errors
from conveyor.db.executors import Row, execute_async
from conveyor.db.schedule_store import TransactionLimits, limit_transaction

#: A run is deleted only if its fire time is at least this far (seconds) behind its schedule's cursor.
CURSOR_MARGIN_S = 3600.0

#: Runs deleted per statement.
RUN_PRUNE_BATCH = 1000

# Before any fire time (PostgreSQL's timestamptz goes back to 4713 BC; Python's datetime to year 1).
_BEGINNING = datetime(1, 1, 1, tzinfo=UTC)

_CUTOFF = "SELECT now() - make_interval(secs => %(older_than_s)s) AS cutoff"

# Schedules with at least one run to delete: their oldest run is before both bounds, and they have more
# than `keep` runs (the subquery finds the newest run beyond the kept ones). Both walk the unique index.
_CANDIDATES = """
SELECT s.id FROM conveyor_schedules s
WHERE (SELECT min(r.fire_at) FROM conveyor_schedule_runs r WHERE r.schedule_id = s.id)
          < LEAST(%(cutoff)s::timestamptz, s.next_fire_at - make_interval(secs => %(margin_s)s))
  AND EXISTS (SELECT 1 FROM conveyor_schedule_runs r WHERE r.schedule_id = s.id
              ORDER BY r.fire_at DESC OFFSET %(keep)s LIMIT 1)
ORDER BY s.id
"""

# One batch of one schedule's runs, oldest first. The two bounds are uncorrelated subqueries, computed
# once before the scan: the scan then walks the unique index in fire-time order and stops after `batch`
# rows (a join against them would read every old run and sort them, at each batch). The first bound is
# the schedule's cursor, read without a lock: it only moves forward, so a stale read only prunes less
# (and a deleted schedule yields NULL: nothing matches). The second is the newest run beyond the `keep`
# latest ones, NULL if there are not that many: then nothing matches either. `after` is the last fire time
# the previous batch deleted, so a batch starts where that one ended, not over the index entries it left.
_PRUNE = """
WITH doomed AS (
    SELECT r.id FROM conveyor_schedule_runs r
    WHERE r.schedule_id = %(id)s
      AND r.fire_at > %(after)s::timestamptz
      AND r.fire_at < (SELECT LEAST(%(cutoff)s::timestamptz, s.next_fire_at - make_interval(secs => %(margin_s)s))
                       FROM conveyor_schedules s WHERE s.id = %(id)s)
      AND r.fire_at <= (SELECT k.fire_at FROM conveyor_schedule_runs k WHERE k.schedule_id = %(id)s
                        ORDER BY k.fire_at DESC OFFSET %(keep)s LIMIT 1)
    ORDER BY r.fire_at
    LIMIT %(batch)s
    FOR UPDATE SKIP LOCKED
),
deleted AS (
    DELETE FROM conveyor_schedule_runs r USING doomed WHERE r.id = doomed.id RETURNING r.fire_at
)
SELECT count(*) AS n, max(fire_at) AS last FROM deleted
"""


@dataclass(frozen=True)
class RunPruneReport:
    deleted: int
    batches: int
    cutoff: datetime  # runs fired before this (database clock) were old enough
    more: bool  # stopped by the budget or the caller with runs possibly left: the next pass goes on


class ScheduleRunRetention:
    """Deletes old schedule runs (see the module docstring for what is safe to delete)."""

    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine

    async def prune(
        self,
        older_than_s: float,
        *,
        keep_newest: int,
        batch: int = RUN_PRUNE_BATCH,
        budget_s: float | None = None,
        limits: TransactionLimits | None = None,
        proceed: Callable[[], bool] | None = None,
    ) -> RunPruneReport:
        """Delete runs fired more than ``older_than_s`` seconds ago beyond each schedule's ``keep_newest``
        latest, ``batch`` per statement, until none is left, ``budget_s`` seconds have passed or
        ``proceed()`` says to stop (checked before each statement). ``limits`` bound each statement's
        transaction on the server."""
        started = time.monotonic()

        def go_on() -> bool:
            in_budget = budget_s is None or time.monotonic() - started < budget_s
            return in_budget and (proceed is None or proceed())

        cutoff: datetime = (await self._run(_CUTOFF, {"older_than_s": older_than_s}, limits))[0]["cutoff"]
        params: dict[str, object] = {"cutoff": cutoff, "margin_s": CURSOR_MARGIN_S, "keep": keep_newest}
        candidates = [int(r["id"]) for r in await self._run(_CANDIDATES, params, limits)]
        deleted = batches = 0
        for schedule_id in candidates:
            after = _BEGINNING
            while True:
                if not go_on():
                    return RunPruneReport(deleted, batches, cutoff, more=True)
                batch_params = {**params, "id": schedule_id, "batch": batch, "after": after}
                rows = await self._run(_PRUNE, batch_params, limits)
                n = int(rows[0]["n"])
                deleted += n
                batches += 1
                if n < batch:
                    break
                after = rows[0]["last"]
        return RunPruneReport(deleted, batches, cutoff, more=False)

    async def _run(self, sql: str, params: dict[str, object], limits: TransactionLimits | None) -> list[Row]:
        with translate_errors():
            async with self.engine.begin() as conn:
                if limits is not None:
                    await limit_transaction(conn, limits)
                return await execute_async(conn, sql, params)
