"""Analytics over tasks: throughput, an overview, latency percentiles, top errors, per-task numbers.

Two rules keep every answer cheap however many tasks there are (a dashboard that times out at a few
million rows is the classic failure):

* **Counts come from the rollup** (``conveyor_task_stats``, see ``models_analytics``): finished minutes
  are counted once, per (queue, task name, minute) and as totals, so a week is at most 10,080 rows
  read by primary key. Only the minutes not rolled up yet (the last minute or two) are counted from
  ``conveyor_tasks``, through its indexes. :meth:`AnalyticsStore.roll_up` advances the rollup; each
  read calls it first, with a small time budget, so nothing else has to run for it.
* **Distributions come from a bounded sample**: latency percentiles (``percentile_cont``) and the top
  errors are computed over the most recent N matching tasks in the window, and say so.

The statements are in ``analytics_sql``; the rollup itself (which minutes, when) in ``stats_rollup``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from conveyor.db import analytics_sql as sql
from conveyor.db.errors import translate_errors
from conveyor.db.executors import Row, execute_async
from conveyor.db.stats_rollup import ROLLUP_CHUNK_S, RollupReport, StatsRollup

#: Longest window any analytics read covers: 7 days.
MAX_WINDOW_S = 7 * 86_400
#: Most buckets a series may have.
MAX_BUCKETS = 1_000
#: Buckets shorter than a minute cannot come from the rollup, so their window is at most this long.
MAX_FINE_WINDOW_S = 3_600
#: Most tasks a latency or error distribution is computed over.
DEFAULT_SAMPLE = 20_000

# -- results -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Counts:
    """What happened in a span of time."""

    enqueued: int = 0
    succeeded: int = 0
    dead: int = 0
    cancelled: int = 0
    run_count: int = 0  # finished tasks that had started (so have a run time)
    run_s_sum: float = 0.0
    wait_s_sum: float = 0.0

    def __add__(self, other: Counts) -> Counts:
        return Counts(
            self.enqueued + other.enqueued,
            self.succeeded + other.succeeded,
            self.dead + other.dead,
            self.cancelled + other.cancelled,
            self.run_count + other.run_count,
            self.run_s_sum + other.run_s_sum,
            self.wait_s_sum + other.wait_s_sum,
        )

    @property
    def finished(self) -> int:
        return self.succeeded + self.dead + self.cancelled

    @property
    def avg_run_s(self) -> float | None:
        return self.run_s_sum / self.run_count if self.run_count else None

    @property
    def avg_wait_s(self) -> float | None:
        return self.wait_s_sum / self.run_count if self.run_count else None


@dataclass(frozen=True)
class Bucket:
    start: datetime
    counts: Counts


@dataclass(frozen=True)
class Series:
    since: datetime
    until: datetime
    bucket_s: int
    buckets: list[Bucket]
    rolled_until: datetime | None  # minutes before this came from the rollup


@dataclass(frozen=True)
class Overview:
    since: datetime
    until: datetime
    counts: Counts
    current: dict[str, int]  # scheduled, queued, running, blocked, dead: tasks in those states now
    oldest_waiting_age_s: float | None
    live_workers: int
    silent_workers: int  # not stopped, but no heartbeat within the lease timeout
    worker_slots: int
    paused_queues: int


@dataclass(frozen=True)
class Percentiles:
    p50: float | None
    p90: float | None
    p95: float | None
    p99: float | None
    avg: float | None
    max: float | None


@dataclass(frozen=True)
class Latency:
    since: datetime
    until: datetime
    sample_size: int
    sampled: bool  # True: more tasks finished in the window than the sample holds
    wait: Percentiles
    run: Percentiles


@dataclass(frozen=True)
class ErrorGroup:
    error_type: str
    message: str
    count: int
    first_seen: datetime
    last_seen: datetime
    example_task_id: int
    queues: list[str]
    names: list[str]


@dataclass(frozen=True)
class Failures:
    since: datetime
    until: datetime
    dead: int  # dead tasks in the window (from the rollup: exact)
    sample_size: int
    sampled: bool
    groups: list[ErrorGroup]


@dataclass(frozen=True)
class NameStats:
    name: str
    counts: Counts
    current: dict[str, int]
    run_p50_s: float | None
    run_p95_s: float | None


@dataclass(frozen=True)
class PerName:
    since: datetime
    until: datetime
    sample_size: int
    sampled: bool
    items: list[NameStats]


_FRACTIONS = [0.5, 0.9, 0.95, 0.99]


class AnalyticsStore:
    def __init__(self, engine: AsyncEngine, *, worker_stale_after_s: float = 30.0) -> None:
        self.engine = engine
        self.worker_stale_after_s = worker_stale_after_s

    # -- the rollup ------------------------------------------------------------------------------

    async def roll_up(self, *, budget_s: float = 0.5, chunk_s: float = ROLLUP_CHUNK_S) -> RollupReport:
        """Bring the statistics rollup up to date, for at most about ``budget_s`` seconds (see
        :class:`~conveyor.db.stats_rollup.StatsRollup`)."""
        return await StatsRollup(self.engine).roll_up(budget_s=budget_s, chunk_s=chunk_s)

    # -- reads -----------------------------------------------------------------------------------

    async def series(
        self, window_s: int, bucket_s: int, *, queue: str | None = None, name: str | None = None
    ) -> Series:
        """Counts per bucket of ``bucket_s`` seconds over the last ``window_s`` seconds (database clock).

        Buckets are aligned to multiples of ``bucket_s`` since the Unix epoch; the first one starts at
        or before ``now - window_s``. Every bucket is present, empty ones with zeros."""
        check_series(window_s, bucket_s)
        async with self._reading() as conn:
            clock = (await execute_async(conn, sql.CLOCK, {"bucket_s": bucket_s, "window_s": window_s}))[0]
            until, first = clock["now"], clock["first_bucket"]
            counts, rolled_until = await self._counts(conn, first, until, bucket_s, queue, name)
        buckets = []
        start = first
        step = timedelta(seconds=bucket_s)
        while start < until:
            buckets.append(Bucket(start, counts.get(start, Counts())))
            start += step
        return Series(first, until, bucket_s, buckets, rolled_until)

    async def overview(self, window_s: int, *, queue: str | None = None) -> Overview:
        """Totals over the last ``window_s`` seconds (whole minutes), the backlog now, and the workers."""
        check_window(window_s, minimum_s=60)
        filters = sql.FILTERS[(queue is not None, False)]
        params: dict[str, Any] = {"queue": queue, "stale_s": self.worker_stale_after_s}
        async with self._reading() as conn:
            clock = (await execute_async(conn, sql.CLOCK, {"bucket_s": 60, "window_s": window_s}))[0]
            until, first = clock["now"], clock["first_bucket"]
            totals, _ = await self._counts(conn, first, until, None, queue, None)
            current_rows = await execute_async(conn, sql.CURRENT.format(filters=filters), params)
            oldest = await execute_async(conn, sql.OLDEST_WAITING.format(filters=filters), params)
            workers = (await execute_async(conn, sql.WORKERS, params))[0]
            paused = (await execute_async(conn, sql.PAUSED_QUEUES, {}))[0]
        current = {state: 0 for state in ("scheduled", "queued", "running", "blocked", "dead")}
        current.update({r["state"]: int(r["n"]) for r in current_rows})
        age = oldest[0]["age_s"] if oldest else None
        return Overview(
            since=first,
            until=until,
            counts=totals.get(None, Counts()),
            current=current,
            oldest_waiting_age_s=None if age is None else max(0.0, float(age)),
            live_workers=int(workers["live"]),
            silent_workers=int(workers["silent"]),
            worker_slots=int(workers["slots"]),
            paused_queues=int(paused["n"]),
        )

    async def latency(
        self,
        window_s: int,
        *,
        queue: str | None = None,
        name: str | None = None,
        states: Sequence[str] = ("succeeded", "dead"),
        sample: int = DEFAULT_SAMPLE,
    ) -> Latency:
        """Wait (due to claimed) and run (claimed to finished) time percentiles, in seconds, over the
        most recent ``sample`` tasks that finished in the window in one of ``states``."""
        check_window(window_s)
        filters = sql.FILTERS[(queue is not None, name is not None)]
        params = {
            "window_s": window_s,
            "queue": queue,
            "name": name,
            "states": list(states),
            "sample": sample,
            "fractions": _FRACTIONS,
        }
        async with self._reading() as conn:
            until = await _now(conn)
            row = (await execute_async(conn, sql.LATENCY.format(filters=filters), params))[0]
        n = int(row["n"])
        return Latency(
            since=until - timedelta(seconds=window_s),
            until=until,
            sample_size=n,
            sampled=n >= sample,
            wait=_percentiles(row["wait"], row["wait_avg"], row["wait_max"]),
            run=_percentiles(row["run"], row["run_avg"], row["run_max"]),
        )

    async def failures(
        self,
        window_s: int,
        *,
        queue: str | None = None,
        name: str | None = None,
        limit: int = 20,
        sample: int = 10_000,
        message_chars: int = 200,
    ) -> Failures:
        """The ``limit`` most frequent (error type, message) pairs among the most recent ``sample``
        tasks that went dead in the window, and the exact number of dead tasks in it."""
        check_window(window_s, minimum_s=60)
        filters = sql.FILTERS[(queue is not None, name is not None)]
        params = {
            "window_s": window_s,
            "queue": queue,
            "name": name,
            "limit": limit,
            "sample": sample,
            "message_chars": message_chars,
        }
        async with self._reading() as conn:
            clock = (await execute_async(conn, sql.CLOCK, {"bucket_s": 60, "window_s": window_s}))[0]
            until, first = clock["now"], clock["first_bucket"]
            totals, _ = await self._counts(conn, first, until, None, queue, name)
            rows = await execute_async(conn, sql.FAILURES.format(filters=filters), params)
        sampled = int(rows[0]["sampled"]) if rows else 0
        return Failures(
            since=until - timedelta(seconds=window_s),
            until=until,
            dead=totals.get(None, Counts()).dead,
            sample_size=sampled,
            sampled=sampled >= sample,
            groups=[
                ErrorGroup(
                    error_type=r["error_type"],
                    message=r["message"],
                    count=int(r["n"]),
                    first_seen=r["first_seen"],
                    last_seen=r["last_seen"],
                    example_task_id=int(r["example_task_id"]),
                    queues=sorted(r["queues"]),
                    names=sorted(r["names"]),
                )
                for r in rows
            ],
        )

    async def per_name(
        self, window_s: int, *, queue: str | None = None, limit: int = 100, sample: int = DEFAULT_SAMPLE
    ) -> PerName:
        """Per task name: what was enqueued and finished in the window, its backlog now, and run time
        percentiles over the most recent ``sample`` finished tasks. Busiest names first."""
        check_window(window_s, minimum_s=60)
        filters = sql.FILTERS[(queue is not None, False)]
        params: dict[str, Any] = {"window_s": window_s, "queue": queue, "sample": sample}
        async with self._reading() as conn:
            clock = (await execute_async(conn, sql.CLOCK, {"bucket_s": 60, "window_s": window_s}))[0]
            until, first = clock["now"], clock["first_bucket"]
            progress = await self._progress(conn, until)
            by_name: dict[str, Counts] = {}
            rolled_lo, rolled_hi = max(first, progress[0]), min(until, progress[1])
            if rolled_lo < rolled_hi:
                for r in await execute_async(
                    conn, sql.PER_NAME_ROLLED, {"queue_key": queue or "", "lo": rolled_lo, "hi": rolled_hi}
                ):
                    by_name[r["name"]] = by_name.get(r["name"], Counts()) + _counts_of(r)
            for lo, hi in _live_spans(first, until, rolled_lo, rolled_hi):
                span = {**params, "lo": lo, "hi": hi}
                for r in await execute_async(conn, sql.PER_NAME_LIVE_CREATED.format(filters=filters), span):
                    by_name[r["name"]] = by_name.get(r["name"], Counts()) + Counts(enqueued=int(r["enqueued"]))
                for r in await execute_async(conn, sql.PER_NAME_LIVE_FINISHED.format(filters=filters), span):
                    by_name[r["name"]] = by_name.get(r["name"], Counts()) + _counts_of(r)
            current: dict[str, dict[str, int]] = {}
            for r in await execute_async(conn, sql.PER_NAME_CURRENT.format(filters=filters), params):
                current.setdefault(r["name"], {})[r["state"]] = int(r["n"])
            runs = {r["name"]: r for r in await execute_async(conn, sql.PER_NAME_RUN.format(filters=filters), params)}
        names = set(by_name) | set(current)
        sampled = sum(int(r["n"]) for r in runs.values())
        items = [
            NameStats(
                name=n,
                counts=by_name.get(n, Counts()),
                current={s: current.get(n, {}).get(s, 0) for s in ("scheduled", "queued", "running", "blocked")},
                run_p50_s=_float(runs[n]["p50"]) if n in runs else None,
                run_p95_s=_float(runs[n]["p95"]) if n in runs else None,
            )
            for n in names
        ]
        items.sort(key=lambda i: (-(i.counts.finished + i.counts.enqueued + sum(i.current.values())), i.name))
        return PerName(first, until, sampled, sampled >= sample, items[:limit])

    # -- helpers ---------------------------------------------------------------------------------

    @asynccontextmanager
    async def _reading(self) -> AsyncIterator[AsyncConnection]:
        """A read-only REPEATABLE READ transaction: the rollup, its progress row and the live rows come
        from one snapshot, so no minute is counted twice or missed while a roll-up commits."""
        with translate_errors():
            async with self.engine.connect() as conn:
                conn = await conn.execution_options(isolation_level="REPEATABLE READ")
                async with conn.begin():
                    await conn.execute(text("SET TRANSACTION READ ONLY"))
                    yield conn

    async def _progress(self, conn: AsyncConnection, now: datetime) -> tuple[datetime, datetime]:
        rows = await execute_async(conn, sql.PROGRESS, {})
        if not rows:
            return now, now  # nothing rolled up yet: everything is read live
        return rows[0]["rolled_from"], rows[0]["rolled_until"]

    async def _counts(
        self,
        conn: AsyncConnection,
        first: datetime,
        until: datetime,
        bucket_s: int | None,
        queue: str | None,
        name: str | None,
    ) -> tuple[dict[Any, Counts], datetime | None]:
        """Counts per bucket start (or one total under the key None) over [first, until): rolled-up
        minutes from the rollup, the rest from the task table."""
        found: dict[Any, Counts] = {}

        def add(key: Any, counts: Counts) -> None:
            found[key] = found.get(key, Counts()) + counts

        rolled_from, rolled_until = await self._progress(conn, until)
        fine = bucket_s is not None and bucket_s % 60 != 0
        rolled_lo, rolled_hi = max(first, rolled_from), min(until, rolled_until)
        if fine or rolled_lo >= rolled_hi:
            rolled_lo = rolled_hi = first  # nothing from the rollup
        params: dict[str, Any] = {"bucket_s": bucket_s, "queue": queue, "name": name}
        if rolled_lo < rolled_hi:
            bucket = sql.BUCKETED.format(column="minute") if bucket_s is not None else "NULL::timestamptz"
            rolled = {**params, "queue_key": queue or "", "name_key": name or "", "lo": rolled_lo, "hi": rolled_hi}
            for r in await execute_async(conn, sql.ROLLED.format(bucket=bucket), rolled):
                add(r["bucket"], _counts_of(r))
        filters = sql.FILTERS[(queue is not None, name is not None)]
        for lo, hi in _live_spans(first, until, rolled_lo, rolled_hi):
            span = {**params, "lo": lo, "hi": hi}
            created = sql.BUCKETED.format(column="created_at") if bucket_s is not None else "NULL::timestamptz"
            for r in await execute_async(conn, sql.LIVE_CREATED.format(bucket=created, filters=filters), span):
                add(r["bucket"], Counts(enqueued=int(r["enqueued"])))
            finished = sql.BUCKETED.format(column="finished_at") if bucket_s is not None else "NULL::timestamptz"
            for r in await execute_async(conn, sql.LIVE_FINISHED.format(bucket=finished, filters=filters), span):
                add(r["bucket"], _counts_of(r))
        return found, (rolled_hi if rolled_lo < rolled_hi else None)


def check_window(window_s: int, *, minimum_s: int = 1) -> None:
    """Raise :class:`WindowError` for a window outside [``minimum_s``, 7 days]."""
    if window_s < minimum_s or window_s > MAX_WINDOW_S:
        raise WindowError("window_s", f"must be between {minimum_s} and {MAX_WINDOW_S} seconds (7 days)")


def check_series(window_s: int, bucket_s: int) -> None:
    """Raise :class:`WindowError` (naming ``window_s`` or ``bucket_s``) for a series this store refuses."""
    check_window(window_s)
    if bucket_s < 1:
        raise WindowError("bucket_s", "must be at least 1 second")
    if bucket_s > window_s:
        raise WindowError("bucket_s", "must not be longer than window_s")
    if -(-window_s // bucket_s) > MAX_BUCKETS:
        raise WindowError("bucket_s", f"too small for this window: at most {MAX_BUCKETS} buckets")
    if bucket_s % 60 and window_s > MAX_FINE_WINDOW_S:
        raise WindowError(
            "window_s", f"buckets that are not whole minutes allow a window of at most {MAX_FINE_WINDOW_S} s"
        )


class WindowError(ValueError):
    """A window or bucket out of bounds; ``field`` is the parameter at fault."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


def _live_spans(
    first: datetime, until: datetime, rolled_lo: datetime, rolled_hi: datetime
) -> list[tuple[datetime, datetime]]:
    """The parts of [first, until) outside the rolled-up [rolled_lo, rolled_hi)."""
    if rolled_lo >= rolled_hi:
        return [(first, until)]
    spans = []
    if first < rolled_lo:
        spans.append((first, rolled_lo))
    if rolled_hi < until:
        spans.append((rolled_hi, until))
    return spans


def _counts_of(row: Row) -> Counts:
    return Counts(
        enqueued=int(row.get("enqueued") or 0),
        succeeded=int(row.get("succeeded") or 0),
        dead=int(row.get("dead") or 0),
        cancelled=int(row.get("cancelled") or 0),
        run_count=int(row.get("run_count") or 0),
        run_s_sum=float(row.get("run_s_sum") or 0.0),
        wait_s_sum=float(row.get("wait_s_sum") or 0.0),
    )


def _percentiles(values: list[float] | None, avg: float | None, maximum: float | None) -> Percentiles:
    found = list(values) if values else [None, None, None, None]
    return Percentiles(
        p50=_float(found[0]),
        p90=_float(found[1]),
        p95=_float(found[2]),
        p99=_float(found[3]),
        avg=_float(avg),
        max=_float(maximum),
    )


def _float(value: Any) -> float | None:
    return None if value is None else float(value)


async def _now(conn: AsyncConnection) -> datetime:
    rows = await execute_async(conn, "SELECT now() AS now", {})
    moment: datetime = rows[0]["now"]
    return moment
