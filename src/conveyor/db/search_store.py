"""Task search: a structured filter, an allow-listed sort, keyset pages and a capped count.

Nothing a client sends becomes SQL text. Filters are SQLAlchemy expressions over bound parameters;
the sort column comes from :data:`~conveyor.db.task_queries.SORT_COLUMNS` (each backed by an index,
so a page is an index walk); JSON conditions pass the path and the values as parameters to
``jsonb_path_exists`` / ``jsonb_path_query_array`` / ``@>`` and are checked by the database before
the search runs, so a bad path is the client's error (:class:`InvalidSearch`, naming the field), never
a server error.

Cost is bounded by a time budget (:class:`~conveyor.db.search_walk.SearchBudget`). A filter whose
every criterion an index answers (ids, state, queue, name, created or finished time) runs as one
statement. Any other filter walks the sort order in bounded slices and answers when the page is full
or the budget is spent, with a *partial* page whose cursor resumes the walk exactly where it stopped
(see :mod:`conveyor.db.search_walk`). The count stops after :data:`COUNT_CAP` + 1 matches or at its own
budget, and says whether it is exact.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from datetime import datetime
from functools import partial
from typing import Any

import sqlalchemy.exc
from psycopg import errors as pg_errors
from sqlalchemy import ColumnElement, Select, Text, cast, func, literal, select, text, true
from sqlalchemy.dialects.postgresql import JSONB, JSONPATH
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from conveyor.core.states import TaskState
from conveyor.db.errors import translate_errors
from conveyor.db.models import tasks
from conveyor.db.search_walk import Run, Scanned, SearchBudget, Slicer, SortOrder, scan_count, scan_page
from conveyor.db.task_queries import Keyset, Sort

#: The count stops here: exact up to this many matches, "more than this" beyond.
COUNT_CAP = 10_000
#: Characters of an error message a result carries (the task itself has the whole error).
ERROR_MESSAGE_CHARS = 300

_WAITING = frozenset({TaskState.SCHEDULED, TaskState.QUEUED})
_MISSING: Any = object()


class InvalidSearch(ValueError):
    """A filter the database cannot evaluate; ``field`` names the part of the request at fault."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


class SearchTooCostly(Exception):
    """Not even the first slice of the search's walk finished within
    :data:`~conveyor.db.search_walk.PAGE_TIMEOUT_MS`: the filter needs narrowing."""


@dataclass(frozen=True)
class JsonCondition:
    """One condition on a JSON column (``args``, ``kwargs`` or ``metadata``).

    * ``path`` alone: the SQL/JSON path matches something (``$.user``, ``$.amount ? (@ > $min)``);
    * ``path`` and ``equals``: some item the path selects equals ``equals`` (objects and arrays
      match when they contain it, as JSON containment does);
    * ``contains`` alone: the whole document contains this JSON (``@>``).

    ``vars`` are the path's variables (``$min`` above). ``where`` names the condition in errors.
    """

    where: str
    path: str | None = None
    vars: dict[str, Any] | None = None
    equals: Any = _MISSING
    contains: Any = _MISSING

    @property
    def has_equals(self) -> bool:
        return self.equals is not _MISSING

    @property
    def has_contains(self) -> bool:
        return self.contains is not _MISSING


@dataclass(frozen=True)
class SearchFilter:
    """Tasks matching every given criterion; the values within one criterion are alternatives."""

    ids: tuple[int, ...] = ()
    states: tuple[TaskState, ...] = ()
    queues: tuple[str, ...] = ()
    names: tuple[str, ...] = ()
    worker_ids: tuple[str, ...] = ()
    created_after: datetime | None = None
    created_before: datetime | None = None
    started_after: datetime | None = None
    started_before: datetime | None = None
    finished_after: datetime | None = None
    finished_before: datetime | None = None
    error: str | None = None  # case-insensitive substring of the last error's type or message
    error_types: tuple[str, ...] = ()  # exact type names, e.g. "ValueError"
    args: tuple[JsonCondition, ...] = ()
    kwargs: tuple[JsonCondition, ...] = ()
    metadata: tuple[JsonCondition, ...] = ()

    def json_conditions(self) -> list[tuple[Any, JsonCondition]]:
        return [
            *((tasks.c.args, c) for c in self.args),
            *((tasks.c.kwargs, c) for c in self.kwargs),
            *((tasks.c.metadata, c) for c in self.metadata),
        ]

    def needs_scan(self) -> bool:
        """Whether some criterion has no index to answer it (a JSON condition, error text or type, a
        worker, a start time) and no id list bounds the search: then it walks in budgeted slices."""
        if self.ids:
            return False
        given = (self.started_after, self.started_before, self.error)
        return bool(self.worker_ids or self.error_types or self.json_conditions()) or any(v is not None for v in given)

    def clauses(self) -> list[ColumnElement[bool]]:
        c = tasks.c
        where: list[ColumnElement[bool]] = []
        if self.ids:
            where.append(c.id.in_(self.ids))
        if self.states:
            where.append(c.state.in_([s.value for s in self.states]))
        if self.queues:
            where.append(c.queue.in_(self.queues))
        if self.names:
            where.append(c.name.in_(self.names))
        if self.worker_ids:
            where.append(c.worker_id.in_(self.worker_ids))
        for column, after, before in (
            (c.created_at, self.created_after, self.created_before),
            (c.started_at, self.started_after, self.started_before),
            (c.finished_at, self.finished_after, self.finished_before),
        ):
            if after is not None:
                where.append(column >= after)
            if before is not None:
                where.append(column < before)
        if self.error_types:
            where.append(c.last_error["type"].astext.in_(self.error_types))
        if self.error is not None:
            # autoescape: % and _ in the text are literal characters, not wildcards.
            where.append(
                c.last_error.is_not(None)
                & (
                    c.last_error["message"].astext.icontains(self.error, autoescape=True)
                    | c.last_error["type"].astext.icontains(self.error, autoescape=True)
                )
            )
        where.extend(_json_clause(column, condition) for column, condition in self.json_conditions())
        return where


@dataclass(frozen=True)
class SearchItem:
    id: int
    name: str
    queue: str
    state: TaskState
    priority: int
    attempt: int
    max_attempts: int
    worker_id: str | None
    cancel_requested: bool
    error_type: str | None
    error_message: str | None
    run_at: datetime
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None


@dataclass(frozen=True)
class SearchPage:
    items: list[SearchItem]
    next: Keyset | None  # None: the last page
    count: int | None = None  # None: not asked for, or nothing could be counted in time
    count_is_exact: bool = False  # False: count is a lower bound (the cap, or the budget, stopped it)
    complete: bool = True  # False: the budget ran out before the page filled (resume from `next`)
    scanned_to: Keyset | None = None  # partial pages: every task up to here in sort order was examined


_COLUMNS = (
    tasks.c.id,
    tasks.c.name,
    tasks.c.queue,
    tasks.c.state,
    tasks.c.priority,
    tasks.c.attempt,
    tasks.c.max_attempts,
    tasks.c.worker_id,
    tasks.c.cancel_requested,
    tasks.c.last_error["type"].astext.label("error_type"),
    func.left(tasks.c.last_error["message"].astext, ERROR_MESSAGE_CHARS).label("error_message"),
    tasks.c.run_at,
    tasks.c.created_at,
    tasks.c.started_at,
    tasks.c.finished_at,
)


def _json_clause(column: Any, condition: JsonCondition) -> ColumnElement[bool]:
    # The operator forms (@>, @?) are what a GIN index on the column can answer, should an operator
    # create one (`CREATE INDEX ... USING gin (args jsonb_path_ops)`); Conveyor does not, because every
    # claim and finish would then write GIN entries for the task's arguments.
    if condition.has_contains:
        return column.op("@>")(literal(condition.contains, JSONB))  # type: ignore[no-any-return]
    assert condition.path is not None
    if condition.has_equals and _scalar(condition.equals) and not condition.vars:
        # "Some item the path selects equals this scalar", as one jsonpath predicate. The text is the
        # client's path plus a JSON literal (jsonpath string literals take JSON's escapes), sent as a
        # bound parameter that the database parses as jsonpath: nothing reaches the SQL text.
        predicate = f"{condition.path} ? (@ == {json.dumps(condition.equals)})"
        return column.op("@?")(cast(literal(predicate, Text), JSONPATH))  # type: ignore[no-any-return]
    path = cast(literal(condition.path, Text), JSONPATH)
    if condition.has_equals:
        # Objects and arrays cannot be jsonpath literals: gather what the path selects into one array
        # and ask whether it contains the value (slower: no index can help).
        selected = func.jsonb_path_query_array(column, path, literal(condition.vars or {}, JSONB), true())
        return selected.op("@>")(func.jsonb_build_array(literal(condition.equals, JSONB)))
    if not condition.vars:
        # @? is jsonb_path_exists with errors suppressed (strict-mode misses are "no match").
        return column.op("@?")(path)  # type: ignore[no-any-return]
    # silent => true, as @? is.
    return func.jsonb_path_exists(column, path, literal(condition.vars, JSONB), true())


def _scalar(value: Any) -> bool:
    return value is None or isinstance(value, str | int | float | bool)


def _check_sort(task_filter: SearchFilter, sort: Sort) -> None:
    """A sort by run_at walks the index of waiting tasks: the filter must ask for waiting tasks only."""
    if sort.field == "run_at" and (not task_filter.states or not set(task_filter.states) <= _WAITING):
        raise InvalidSearch(
            "body.sort", "sorting by run_at needs a state filter of scheduled and/or queued (waiting tasks)"
        )


class SearchStore:
    def __init__(self, engine: AsyncEngine, budget: SearchBudget | None = None) -> None:
        self.engine = engine
        self.budget = budget or SearchBudget()

    async def validate(self, task_filter: SearchFilter) -> None:
        """Have the database parse every JSON path (with its variables) before the search runs.

        Raises :class:`InvalidSearch` naming the first condition it rejects."""
        conditions = [c for _, c in task_filter.json_conditions() if not c.has_contains]
        if not conditions:
            return
        with translate_errors():
            async with self.engine.connect() as conn:
                for condition in conditions:
                    probe = select(_json_clause(cast(literal("{}"), JSONB), condition))
                    try:
                        async with conn.begin_nested():
                            await conn.execute(probe)
                    except (sqlalchemy.exc.DataError, sqlalchemy.exc.ProgrammingError) as exc:
                        raise InvalidSearch(f"{condition.where}.path", first_line(exc.orig)) from None

    async def search(
        self,
        task_filter: SearchFilter,
        sort: Sort,
        limit: int,
        after: Keyset | None = None,
        *,
        count: bool = True,
    ) -> SearchPage:
        """One page of matches in ``sort`` order after ``after``, and (``count``) how many match.

        Within the budget: a page may be partial (``complete`` False, ``next`` resumes the walk) and
        the count a lower bound. Raises :class:`InvalidSearch` for a filter the database rejects and
        :class:`SearchTooCostly` when not even one slice of the walk finishes in time."""
        _check_sort(task_filter, sort)
        await self.validate(task_filter)
        order = SortOrder(sort)
        where = [*task_filter.clauses(), *order.domain()]
        with translate_errors():
            async with self.engine.connect() as conn:
                return await self._search(
                    partial(_run, conn),
                    partial(_run, conn, walk=True),
                    task_filter,
                    order,
                    where,
                    limit,
                    after,
                    count=count,
                )

    async def _search(
        self,
        run: Run,
        walk: Run,
        task_filter: SearchFilter,
        order: SortOrder,
        where: list[ColumnElement[bool]],
        limit: int,
        after: Keyset | None,
        *,
        count: bool,
    ) -> SearchPage:
        slicer = Slicer(self.budget, self.budget.page_s, guaranteed=True)
        scanned = None
        if not task_filter.needs_scan():
            # One statement: the planner finds the page through an index. Should it still take more
            # than the budget, the walk takes over (with its one guaranteed slice).
            query = select(*_COLUMNS).where(*where, *order.between(after, None))
            rows = await run(query.order_by(*order.order_by()).limit(limit + 1), _ms(self.budget.page_s))
            if rows is not None:
                scanned = Scanned(rows, complete=True, ended=len(rows) <= limit)
        if scanned is None:
            scanned = await scan_page(walk, order, _COLUMNS, where, limit=limit, after=after, slicer=slicer)
            if not scanned.complete and scanned.examined == 0:
                raise SearchTooCostly
        counted = None
        if count:
            counted = await self._count(run, walk, order, where, after, limit, scanned, walked=slicer.slices > 0)
            if after is None and not scanned.complete and counted == (len(scanned.rows), True):
                # The count went on from where the page stopped to the end and found nothing more: the
                # page holds every match after all.
                scanned = Scanned(scanned.rows, complete=True, ended=True, examined=scanned.examined)
        next_key = None
        if len(scanned.rows) > limit:
            next_key = order.key(scanned.rows[limit - 1])
        elif not scanned.complete:
            next_key = scanned.stopped_at
        return SearchPage(
            [_item(row) for row in scanned.rows[:limit]],
            next_key,
            count=None if counted is None else counted[0],
            count_is_exact=counted is not None and counted[1],
            complete=scanned.complete,
            scanned_to=None if scanned.complete else scanned.stopped_at,
        )

    async def _count(
        self,
        run: Run,
        walk: Run,
        order: SortOrder,
        where: list[ColumnElement[bool]],
        after: Keyset | None,
        limit: int,
        scanned: Scanned,
        *,
        walked: bool,
    ) -> tuple[int, bool] | None:
        """The count: exact up to COUNT_CAP, else a lower bound; None if nothing could be counted."""
        first_page = after is None and len(scanned.rows) <= limit
        if first_page and scanned.complete:
            return len(scanned.rows), True  # the first page holds every match
        slicer = Slicer(self.budget, self.budget.count_s, guaranteed=False)
        if first_page:
            # The walk found every match up to where it stopped: count on from there.
            return await scan_count(
                walk, order, where, start=scanned.stopped_at, counted=len(scanned.rows), cap=COUNT_CAP, slicer=slicer
            )
        if walked:
            return await scan_count(walk, order, where, start=None, counted=0, cap=COUNT_CAP, slicer=slicer)
        capped = select(literal(1)).select_from(tasks).where(*where).limit(COUNT_CAP + 1).subquery()
        found = await run(select(func.count().label("n")).select_from(capped), _ms(self.budget.count_s))
        if found is None:
            return None
        n = int(found[0]["n"])
        return (COUNT_CAP, False) if n > COUNT_CAP else (n, True)


async def _run(
    conn: AsyncConnection, query: Select[Any], timeout_ms: int, *, walk: bool = False
) -> list[dict[str, Any]] | None:
    """Run ``query`` in a transaction of its own under a statement timeout; None if it ran into it.

    ``walk``: a slice of a budgeted walk, run with sequential scans off (see ``search_walk.scan_page``)."""
    try:
        async with conn.begin():
            # set_config(..., true): for this transaction only, and the values are bound parameters.
            await conn.execute(
                text("SELECT set_config('statement_timeout', :ms, true), set_config('enable_seqscan', :seq, true)"),
                {"ms": str(timeout_ms), "seq": "off" if walk else "on"},
            )
            return [dict(row) for row in (await conn.execute(query)).mappings()]
    except sqlalchemy.exc.DBAPIError as exc:
        if isinstance(exc.orig, pg_errors.QueryCanceled):
            return None
        if isinstance(exc.orig, REJECTED_INPUT):
            # What only evaluation can reject: a like_regex pattern the database cannot compile, a
            # path variable missing from `vars`. Our own SQL is fixed and tested; the filter is not.
            raise InvalidSearch("body.filter", first_line(exc.orig)) from None
        raise


def _ms(seconds: float) -> int:
    # Never 0: a statement_timeout of 0 means no timeout at all.
    return max(1, math.ceil(seconds * 1000))


#: Errors that evaluating a client's JSON path or pattern can raise.
REJECTED_INPUT = (pg_errors.DataError, pg_errors.SyntaxError, pg_errors.UndefinedObject)


def _item(row: dict[str, Any]) -> SearchItem:
    return SearchItem(
        id=int(row["id"]),
        name=row["name"],
        queue=row["queue"],
        state=TaskState(row["state"]),
        priority=row["priority"],
        attempt=row["attempt"],
        max_attempts=row["max_attempts"],
        worker_id=None if row["worker_id"] is None else str(row["worker_id"]),
        cancel_requested=row["cancel_requested"],
        error_type=row["error_type"],
        error_message=row["error_message"],
        run_at=row["run_at"],
        created_at=row["created_at"],
        started_at=row["started_at"],
        finished_at=row["finished_at"],
    )


def first_line(exc: BaseException | None) -> str:
    message = str(exc).strip().splitlines()[0] if exc is not None and str(exc).strip() else "invalid"
    return message[:300]
