"""The leader's retention pass: old schedule runs, and the rows of scheduler processes that vanished.

It runs beside the ticks, never inside a tick's transaction: every statement is its own short
transaction under the scheduler's server-side limits, and none of them takes a lock a tick waits for
(runs are deleted far behind each schedule's cursor, with ``SKIP LOCKED``). What is safe to delete, and
why a deleted run's fire time cannot fire again, is explained in :mod:`conveyor.db.schedule_run_retention`.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from sqlalchemy.ext.asyncio import AsyncEngine

from conveyor.config import SchedulerSettings
from conveyor.db.schedule_run_retention import RunPruneReport, ScheduleRunRetention
from conveyor.db.schedule_store import TransactionLimits
from conveyor.db.scheduler_process_store import SchedulerProcessStore

log = logging.getLogger("conveyor.scheduler")

#: Longest one pass works (seconds); the next pass carries on where it stopped.
RETENTION_BUDGET_S = 10.0


async def retention_pass(
    engine: AsyncEngine, settings: SchedulerSettings, limits: TransactionLimits, proceed: Callable[[], bool]
) -> RunPruneReport:
    """Delete schedule runs older than ``run_retention_s`` beyond each schedule's ``run_keep_newest``
    latest, then the rows of scheduler processes not seen for ``stale_retention_s``. ``proceed()`` is asked
    before each batch (the caller still leads and is not stopping)."""
    budget_s = min(RETENTION_BUDGET_S, settings.retention_interval_s / 2)
    # The server-side limits bound every statement; this bounds the pass as a whole (a batch cut off
    # here is rolled back and deleted again next time).
    async with asyncio.timeout(budget_s + 2 * limits.statement_timeout_s):
        report = await ScheduleRunRetention(engine).prune(
            settings.run_retention_s,
            keep_newest=settings.run_keep_newest,
            budget_s=budget_s,
            limits=limits,
            proceed=proceed,
        )
        gone = await SchedulerProcessStore(engine).prune_stale(settings.stale_retention_s, limits=limits)
    if report.deleted:
        log.info(
            "pruned %d schedule runs fired before %s (each schedule keeps its newest %d)%s",
            report.deleted,
            report.cutoff.isoformat(),
            settings.run_keep_newest,
            "; more are left for the next pass" if report.more else "",
        )
    for process_id in gone:
        log.info("deleted the row of scheduler %s: it stopped reporting without stopping", process_id)
    return report
