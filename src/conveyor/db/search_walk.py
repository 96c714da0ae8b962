"""Budgeted scans: how a search that no index answers stays fast at millions of tasks.

A search with a JSON condition, error text, an error type, a worker or a start-time range has to look
at tasks one by one, and Conveyor keeps no index on arguments or metadata (every enqueue and every
state change would maintain it). Instead of one statement that may read the whole table, such a
search walks its sort order in slices:

1. a *probe* finds where the next ``n`` tasks of the sort order end: an index-only walk of the sort's
   own index (the primary key, ``ix_conveyor_tasks_finished_at`` or ``ix_conveyor_tasks_waiting_run_at``),
   so its cost is bounded by ``n`` whatever the filter;
2. the filter runs over exactly that key range, in order, for at most the rows the page still needs.

The walk stops when the page is full, when the sort order ends, or when its budget is spent (time, and
optionally rows examined). Then the page is *partial*: its cursor is the last position examined, so
the next request resumes exactly there, and paging through returns every match once, in order, for
every sort.

Each slice is sized from the speed of the one before (so most of a budget goes to scanning, not to
round trips, and the last slice ends near the deadline), and each statement runs under a statement
timeout of the time left plus some slack, in case a slice is much slower than the previous one. The
first slice of a page gets :data:`PAGE_TIMEOUT_MS` instead, so every request makes progress.

Counting walks the same way, each slice counting its matches, until the count passes its cap, the
order ends (the count is exact) or the count's budget is spent (the count is a lower bound).
"""

from __future__ import annotations

import math
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Boolean, ColumnElement, Select, func, literal, literal_column, select, tuple_

from conveyor.db.models import tasks
from conveyor.db.task_queries import SORT_COLUMNS, Keyset, Sort

#: Longest the first slice of a page may run (ms): past it the search is too costly to answer at all.
PAGE_TIMEOUT_MS = 10_000
#: Added to the time left when setting a later slice's statement timeout: the sizing aims inside the
#: budget, the timeout only catches a slice that turns out far slower than predicted.
_SLACK_S = 0.05
#: A slice never grows more than this many times over the previous one: speed measured on a small
#: slice (an index answered it, the cache was warm) is a weak forecast for one a hundred times larger.
_GROWTH = 8
_SMALLEST_SLICE = 100

# ix_conveyor_tasks_waiting_run_at's predicate, as constant text: with a bound IN list a generic plan
# (psycopg prepares a statement run often) could not prove that the partial index applies.
_WAITING_PREDICATE = "state IN ('scheduled', 'queued')"

#: Runs a statement under a statement timeout (ms); None when it ran into the timeout. The walk's
#: statements must run with sequential scans disabled (see :func:`scan_page`).
Run = Callable[[Select[Any], int], Awaitable[list[dict[str, Any]] | None]]


@dataclass(frozen=True)
class SearchBudget:
    """How long one search request may scan before it answers with what it found (see the module).

    Searches whose every criterion an index answers are not sliced; they get ``page_s`` as one
    statement, and fall back to a walk (one slice) only if that runs out."""

    page_s: float = 0.25
    """Seconds a page's walk may take."""
    count_s: float = 0.1
    """Seconds the count may take after the page; past it the count is a lower bound (or absent)."""
    max_rows: int | None = None
    """Tasks a page's walk (and, separately, the count's) examines at most; None: only time bounds it."""
    first_slice_rows: int = 1_000
    """Tasks in the first slice of a walk; later slices are sized from the speed measured."""
    max_slice_rows: int = 1_000_000
    """Tasks in one slice at most."""

    def __post_init__(self) -> None:
        if self.page_s < 0 or self.count_s < 0:
            raise ValueError("search budgets must be zero or more seconds")
        if self.max_rows is not None and self.max_rows < 1:
            raise ValueError("max_rows must be at least 1 (or None)")
        if not 1 <= self.first_slice_rows <= self.max_slice_rows:
            raise ValueError("slice sizes must satisfy 1 <= first_slice_rows <= max_slice_rows")


@dataclass(frozen=True)
class SortOrder:
    """A sort as a walk: the rows it covers, its total order ``(value, id)``, and positions in it."""

    sort: Sort

    @property
    def column(self) -> Any:
        return SORT_COLUMNS[self.sort.field]

    def domain(self) -> list[ColumnElement[bool]]:
        """The rows this order walks: exactly those in its index (the partial indexes' predicates)."""
        if self.sort.field == "run_at":
            return [literal_column(_WAITING_PREDICATE, Boolean)]
        if self.sort.field == "finished_at":
            return [tasks.c.finished_at.is_not(None)]
        return []

    def order_by(self) -> list[Any]:
        columns = [tasks.c.id] if self.sort.field == "id" else [self.column, tasks.c.id]
        return [c.desc() if self.sort.descending else c.asc() for c in columns]

    def after(self, key: Keyset) -> list[ColumnElement[bool]]:
        """Strictly after ``key`` in this order."""
        if self.sort.field == "id":
            return [tasks.c.id < key.id if self.sort.descending else tasks.c.id > key.id]
        here, there = tuple_(self.column, tasks.c.id), tuple_(key.value, key.id)
        if self.sort.descending:
            return [here < there, self.column <= key.value]
        return [here > there, self.column >= key.value]

    def through(self, key: Keyset) -> list[ColumnElement[bool]]:
        """At or before ``key`` in this order."""
        if self.sort.field == "id":
            return [tasks.c.id >= key.id if self.sort.descending else tasks.c.id <= key.id]
        here, there = tuple_(self.column, tasks.c.id), tuple_(key.value, key.id)
        if self.sort.descending:
            return [here >= there, self.column >= key.value]
        return [here <= there, self.column <= key.value]

    def between(self, start: Keyset | None, end: Keyset | None) -> list[ColumnElement[bool]]:
        """After ``start`` (None: from the beginning) and through ``end`` (None: to the end).

        For a time sort the row comparison is what is exact; the plain bound on the time column
        beside it (implied by it) is for the planner, which estimates a row comparison's range poorly
        and could then prefer reading the whole table to walking the range in the index."""
        return [*([] if start is None else self.after(start)), *([] if end is None else self.through(end))]

    def key(self, row: Mapping[str, Any]) -> Keyset:
        return Keyset(row[self.sort.field], int(row["id"]))

    def probe(self, start: Keyset | None, rows: int) -> Select[Any]:
        """The position of the ``rows``-th task after ``start``: no row when fewer are left."""
        columns = [tasks.c.id] if self.sort.field == "id" else [self.column, tasks.c.id]
        query = select(*columns).where(*self.domain(), *self.between(start, None))
        return query.order_by(*self.order_by()).offset(rows - 1).limit(1)


class Slicer:
    """Sizes the slices of one walk from the speed of the last one, within a deadline and a row budget.

    ``guaranteed``: the first slice runs whatever the budget says (with :data:`PAGE_TIMEOUT_MS`), so
    a page always makes progress."""

    def __init__(
        self,
        budget: SearchBudget,
        time_s: float,
        *,
        guaranteed: bool,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        self._clock = clock
        self.deadline = clock() + time_s
        self.rows_left = budget.max_rows
        self.size = budget.first_slice_rows
        self.max_size = budget.max_slice_rows
        self.guaranteed = guaranteed
        self.slices = 0
        self.examined = 0  # tasks in the slices done (an upper bound on the rows the filter saw)

    def remaining_s(self) -> float:
        return self.deadline - self._clock()

    def next_size(self) -> int | None:
        """Tasks in the next slice; None when the budget is spent."""
        if self.rows_left is not None and self.rows_left <= 0:
            return None
        if not (self.guaranteed and self.slices == 0) and self.remaining_s() <= 0:
            return None
        return self.size if self.rows_left is None else min(self.size, self.rows_left)

    def timeout_ms(self) -> int:
        if self.guaranteed and self.slices == 0:
            return PAGE_TIMEOUT_MS
        return max(1, math.ceil((max(self.remaining_s(), 0.0) + _SLACK_S) * 1000))

    def done(self, rows: int, elapsed_s: float) -> None:
        """A slice of ``rows`` tasks took ``elapsed_s``: size the next to end within the time left."""
        self.slices += 1
        self.examined += rows
        if self.rows_left is not None:
            self.rows_left -= rows
        per_s = rows / max(elapsed_s, 1e-4)
        fits = per_s * max(self.remaining_s(), 0.0) * 0.8  # a fifth in reserve for the forecast's error
        self.size = max(_SMALLEST_SLICE, min(int(fits), self.size * _GROWTH, self.max_size))


@dataclass(frozen=True)
class Scanned:
    """What a page's walk found, and where it stopped."""

    rows: list[dict[str, Any]]  # matches in order, up to limit + 1 (one more: there is a next page)
    complete: bool  # False: the budget ran out first
    ended: bool = False  # the walk reached the end of the order
    stopped_at: Keyset | None = None  # partial: every task up to here was examined
    examined: int = 0


async def scan_page(
    run: Run,
    order: SortOrder,
    columns: Sequence[Any],
    where: Sequence[ColumnElement[bool]],
    *,
    limit: int,
    after: Keyset | None,
    slicer: Slicer,
) -> Scanned:
    """Up to ``limit + 1`` matches after ``after``, walking ``order`` in slices until ``slicer`` says stop.

    ``run`` must run its statements with ``enable_seqscan`` off: a slice is a range of the sort's
    index, and for a wide range the planner may rightly find reading the whole table cheaper than
    the range's random heap reads, but the whole table is exactly what the budget cannot afford."""
    found: list[dict[str, Any]] = []
    position = after
    while (size := slicer.next_size()) is not None:
        started = time.perf_counter()
        probed = await run(order.probe(position, size), slicer.timeout_ms())
        if probed is None:
            break
        end = order.key(probed[0]) if probed else None
        query = (
            select(*columns)
            .where(*where, *order.between(position, end))
            .order_by(*order.order_by())
            .limit(limit + 1 - len(found))
        )
        rows = await run(query, slicer.timeout_ms())
        if rows is None:
            break
        slicer.done(size, time.perf_counter() - started)
        found.extend(rows)
        if len(found) > limit or end is None:
            return Scanned(found, complete=True, ended=end is None, examined=slicer.examined)
        position = end
    return Scanned(found, complete=False, stopped_at=position, examined=slicer.examined)


async def scan_count(
    run: Run,
    order: SortOrder,
    where: Sequence[ColumnElement[bool]],
    *,
    start: Keyset | None,
    counted: int,
    cap: int,
    slicer: Slicer,
) -> tuple[int, bool] | None:
    """How many tasks match: ``counted`` already found up to ``start``, plus those after it.

    ``(n, True)``: exactly n. ``(n, False)``: at least n (more than ``cap``, or the budget ran out).
    None: nothing could be counted in time."""
    position = start
    progressed = start is not None
    while counted <= cap and (size := slicer.next_size()) is not None:
        started = time.perf_counter()
        probed = await run(order.probe(position, size), slicer.timeout_ms())
        if probed is None:
            break
        end = order.key(probed[0]) if probed else None
        matches = (
            select(literal(1))
            .select_from(tasks)
            .where(*where, *order.between(position, end))
            .limit(cap + 1 - counted)
            .subquery()
        )
        found = await run(select(func.count().label("n")).select_from(matches), slicer.timeout_ms())
        if found is None:
            break
        slicer.done(size, time.perf_counter() - started)
        counted += int(found[0]["n"])
        progressed = True
        if end is None:
            return (cap, False) if counted > cap else (counted, True)
        position = end
    if counted > cap:
        return cap, False
    return (counted, False) if progressed else None
