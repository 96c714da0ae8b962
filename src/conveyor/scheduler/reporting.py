"""What the scheduler says about its ticks: each run fired (a long catch-up in one line), due fire times
that already had a run, and failures, each logged at most once a minute per schedule and error."""

from __future__ import annotations

import logging
import time

from conveyor.db.schedule_store import FireResult
from conveyor.errors import ConveyorError, DatabaseError

log = logging.getLogger("conveyor.scheduler")

#: The same failure of the same schedule is logged at most this often.
ERROR_LOG_INTERVAL_S = 60.0
#: Above this many runs in one transaction, a catch-up is logged as one line, not one per run.
RUNS_LOGGED_ONE_BY_ONE = 5


def log_fired(result: FireResult) -> None:
    definition = result.schedule.definition
    if result.already_run:
        # A tick meets runs it should not see only when the cursor was put back (by hand, or acted on
        # from a stale view); their rows kept those fire times out, but it is worth a look.
        log.warning(
            "schedule %s: %d due fire times (%s .. %s) already had a run; not enqueued again",
            definition.name,
            len(result.already_run),
            result.already_run[0].isoformat(),
            result.already_run[-1].isoformat(),
        )
    if result.missed:
        log.info(
            "schedule %s was behind (cursor %s, now %s): misfire=%s enqueued %d runs",
            definition.name,
            result.schedule.next_fire_at.isoformat(),
            result.db_now.isoformat(),
            definition.misfire,
            len(result.fire_times),
        )
    if len(result.fire_times) > RUNS_LOGGED_ONE_BY_ONE:
        log.info(
            "schedule %s fired for %s .. %s: tasks %s[%s..%s] (queue %s)",
            definition.name,
            result.fire_times[0].isoformat(),
            result.fire_times[-1].isoformat(),
            definition.task_name,
            result.task_ids[0],
            result.task_ids[-1],
            result.queues[0],
        )
        return
    for fire_at, task_id, queue in zip(result.fire_times, result.task_ids, result.queues, strict=True):
        log.info(
            "schedule %s fired for %s: task %s[%s] (queue %s)",
            definition.name,
            fire_at.isoformat(),
            definition.task_name,
            task_id,
            queue,
        )


class FailureLog:
    """Logs why a schedule could not fire, at most once per :data:`ERROR_LOG_INTERVAL_S` for the same
    schedule and error: a schedule stays due and is tried every tick, and a database outage would
    otherwise write a line per schedule per second."""

    def __init__(self) -> None:
        self._logged_at: dict[tuple[int, str], float] = {}

    def log(self, schedule_id: int, exc: Exception) -> None:
        key = (schedule_id, f"{type(exc).__name__}: {exc}")
        now = time.monotonic()
        last = self._logged_at.get(key)
        if last is not None and now - last < ERROR_LOG_INTERVAL_S:
            return
        self._logged_at[key] = now
        log.log(
            logging.WARNING if isinstance(exc, DatabaseError | TimeoutError) else logging.ERROR,
            "schedule %s could not fire (%s: %s); it stays due and is tried again every tick",
            schedule_id,
            type(exc).__name__,
            exc,
            exc_info=not _expected(exc),
        )


def _expected(exc: Exception) -> bool:
    # Errors a schedule's definition or the database can cause (an unknown task, arguments too large, a
    # lost connection) need no traceback; anything else is a bug and keeps it.
    return isinstance(exc, ConveyorError | ValueError | TimeoutError)
