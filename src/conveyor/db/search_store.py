"""Task search: a structured filter, an allow-listed sort, keyset pages and a capped count.

Nothing a client sends becomes SQL text. Filters are SQLAlchemy expressions over bound parameters;
the sort column comes from :data:`~conveyor.db.task_queries.SORT_COLUMNS` (each backed by an index,
so a page is an index walk); JSON conditions pass the path and the values as parameters to
``jsonb_path_exists`` / ``jsonb_path_query_array`` / ``@>`` and are checked by the database before
the search runs, so a bad path is the client's error (:class:`InvalidSearch`, naming the field), never
a server error.

Cost is bounded: pages stop after ``limit + 1`` rows; the count stops after :data:`COUNT_CAP` + 1
(exact below that, "more than 10,000" above); every statement runs under a statement timeout, and a
filter too costly to answer in time is reported as such rather than holding a connection for minutes.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal, overload

import psycopg
import sqlalchemy.exc
from psycopg import errors as pg_errors
from sqlalchemy import ColumnElement, Select, Text, cast, func, literal, select, text, true, tuple_
from sqlalchemy.dialects.postgresql import JSONB, JSONPATH
from sqlalchemy.ext.asyncio import AsyncEngine

from conveyor.core.states import TaskState
from conveyor.db.errors import translate_errors
from conveyor.db.models import tasks
from conveyor.db.task_queries import SORT_COLUMNS, Keyset, Sort

#: The count stops here: exact up to this many matches, "more than this" beyond.
COUNT_CAP = 10_000
#: Longest a page query may run (ms) before the search is called too costly.
PAGE_TIMEOUT_MS = 10_000
#: Longest the count may run (ms); past it the answer carries no count rather than no page.
COUNT_TIMEOUT_MS = 3_000
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
    """The search did not finish within :data:`PAGE_TIMEOUT_MS`: the filter needs narrowing."""


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
    next: Keyset | None
    count: int | None = None  # None: not asked for, or it could not be counted in time
    count_is_exact: bool = False
    timings_ms: dict[str, float] = field(default_factory=dict)


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


def _check_sort(task_filter: SearchFilter, sort: Sort) -> list[ColumnElement[bool]]:
    """Extra conditions the sort needs to be an index walk (see ``task_queries.SORT_COLUMNS``)."""
    if sort.field == "run_at":
        if not task_filter.states or not set(task_filter.states) <= _WAITING:
            raise InvalidSearch(
                "body.sort", "sorting by run_at needs a state filter of scheduled and/or queued (waiting tasks)"
            )
        return [tasks.c.state.in_([s.value for s in _WAITING])]
    if sort.field == "finished_at":
        return [tasks.c.finished_at.is_not(None)]
    return []


class SearchStore:
    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine

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

        Raises :class:`InvalidSearch` for a filter the database rejects and :class:`SearchTooCostly`
        when the page cannot be found within :data:`PAGE_TIMEOUT_MS`."""
        extra = _check_sort(task_filter, sort)
        await self.validate(task_filter)
        where = [*task_filter.clauses(), *extra]
        column = SORT_COLUMNS[sort.field]
        query = select(*_COLUMNS).where(*where)
        if after is not None:
            query = query.where(_after(column, sort, after))
        order = [column.desc(), tasks.c.id.desc()] if sort.descending else [column.asc(), tasks.c.id.asc()]
        query = query.order_by(*(order[1:] if sort.field == "id" else order)).limit(limit + 1)

        rows = _outcome(await self._attempt(query, PAGE_TIMEOUT_MS), too_costly=True)
        counted: tuple[int | None, bool] = (None, False)
        if count and after is None and len(rows) <= limit:
            counted = (len(rows), True)  # the first page holds every match
        elif count:
            capped = select(literal(1)).select_from(tasks).where(*where).limit(COUNT_CAP + 1).subquery()
            found = _outcome(await self._attempt(select(func.count().label("n")).select_from(capped), COUNT_TIMEOUT_MS))
            if found is not None:
                n = int(found[0]["n"])
                counted = (COUNT_CAP, False) if n > COUNT_CAP else (n, True)
        items = [_item(row) for row in rows[:limit]]
        next_key = None
        if len(rows) > limit:
            last = items[-1]
            next_key = Keyset(getattr(last, sort.field), last.id)
        return SearchPage(items, next_key, count=counted[0], count_is_exact=counted[1])

    async def _attempt(self, query: Select[Any], timeout_ms: int) -> list[dict[str, Any]] | _Cancelled:
        try:
            return await self._rows(query, timeout_ms)
        except _Cancelled as cancelled:
            return cancelled

    async def _rows(self, query: Select[Any], timeout_ms: int) -> list[dict[str, Any]]:
        """Run ``query`` in a transaction of its own under a statement timeout."""
        try:
            async with self.engine.connect() as conn, conn.begin():
                # set_config(..., true): for this transaction only, and the value is a bound parameter.
                await conn.execute(text("SELECT set_config('statement_timeout', :ms, true)"), {"ms": str(timeout_ms)})
                return [dict(row) for row in (await conn.execute(query)).mappings()]
        except sqlalchemy.exc.DBAPIError as exc:
            if isinstance(exc.orig, pg_errors.QueryCanceled):
                raise _Cancelled from None
            if isinstance(exc.orig, REJECTED_INPUT):
                # What only evaluation can reject: a like_regex pattern the database cannot compile, a
                # path variable missing from `vars`. Our own SQL is fixed and tested; the filter is not.
                raise InvalidSearch("body.filter", first_line(exc.orig)) from None
            with translate_errors():
                raise
        except (psycopg.Error, OSError):
            with translate_errors():
                raise


#: Errors that evaluating a client's JSON path or pattern can raise.
REJECTED_INPUT = (pg_errors.DataError, pg_errors.SyntaxError, pg_errors.UndefinedObject)


class _Cancelled(Exception):
    """A statement ran into its statement timeout."""


@overload
def _outcome(found: list[dict[str, Any]] | _Cancelled, *, too_costly: Literal[True]) -> list[dict[str, Any]]: ...
@overload
def _outcome(found: list[dict[str, Any]] | _Cancelled) -> list[dict[str, Any]] | None: ...
def _outcome(found: list[dict[str, Any]] | _Cancelled, *, too_costly: bool = False) -> list[dict[str, Any]] | None:
    """The rows; for a statement that timed out, :class:`SearchTooCostly` (the page) or None (the count,
    which the answer can do without)."""
    if not isinstance(found, _Cancelled):
        return found
    if too_costly:
        raise SearchTooCostly from None
    return None


def _after(column: Any, sort: Sort, after: Keyset) -> ColumnElement[bool]:
    if sort.field == "id":
        return tasks.c.id < after.id if sort.descending else tasks.c.id > after.id
    if sort.descending:
        return tuple_(column, tasks.c.id) < tuple_(after.value, after.id)
    return tuple_(column, tasks.c.id) > tuple_(after.value, after.id)


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
