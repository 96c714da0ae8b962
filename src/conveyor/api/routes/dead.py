"""``/api/v1/dead``: dead letters, the tasks that failed for good. List them, retry them or delete them
in bulk by a filter (at most ``limit`` per call, in batches)."""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Query
from pydantic import Field

from conveyor.api.auth import Scope
from conveyor.api.deps import require
from conveyor.api.errors import invalid_field
from conveyor.api.operations import OpsDep
from conveyor.api.routes.search import body_cursor, run_search, search_out
from conveyor.api.schemas import INT64_MAX, IsoDatetime, QueueName, TaskName
from conveyor.api.schemas_search import DeadActionBody, DeadActionOut, ErrorType, SearchOut, Text
from conveyor.core.states import TaskState
from conveyor.db.search_store import InvalidSearch, SearchFilter

router = APIRouter(prefix="/dead", tags=["dead letters"])

_READ = [require(Scope.TASKS_READ)]
_WRITE = [require(Scope.TASKS_WRITE)]

#: A task id in a query string (TaskId itself is strict: JSON bodies must send numbers, not strings).
IdQuery = Annotated[int, Field(ge=1, le=INT64_MAX)]

DeadSort = Literal["-finished_at", "finished_at", "-id", "id"]

QueueQuery = Annotated[list[QueueName] | None, Query(max_length=50, description="Only these queues.")]
NameQuery = Annotated[list[TaskName] | None, Query(max_length=50, description="Only these task names.")]
ErrorTypeQuery = Annotated[list[ErrorType] | None, Query(max_length=20, description="Only these error types.")]
ErrorQuery = Annotated[
    Text | None, Query(min_length=1, max_length=200, description="Text in the error's type or message.")
]
FinishedAfter = Annotated[IsoDatetime | None, Query(description="Went dead at or after this time.")]
FinishedBefore = Annotated[IsoDatetime | None, Query(description="Went dead before this time.")]


@router.get("", dependencies=_READ)
async def list_dead_tasks(
    ops: OpsDep,
    queue: QueueQuery = None,
    name: NameQuery = None,
    error_type: ErrorTypeQuery = None,
    error: ErrorQuery = None,
    finished_after: FinishedAfter = None,
    finished_before: FinishedBefore = None,
    sort: Annotated[DeadSort, Query(description="Default: the most recently dead first.")] = "-finished_at",
    limit: Annotated[int, Query(ge=1, le=200, description="Tasks per page.")] = 50,
    cursor: Annotated[str | None, Query(max_length=500, description="`next_cursor` of the previous page.")] = None,
) -> SearchOut:
    """Dead tasks, most recently dead first, with their last error, a page at a time, and how many
    match (exact up to 10,000)."""
    criteria = SearchFilter(
        states=(TaskState.DEAD,),
        queues=tuple(queue or ()),
        names=tuple(name or ()),
        error_types=tuple(error_type or ()),
        error=error,
        finished_after=finished_after,
        finished_before=finished_before,
    )
    after = None if cursor is None else body_cursor(cursor, sort, "query.cursor")
    page = await run_search(ops, criteria, sort=sort, limit=limit, after=after, count=True, filter_field="query")
    return search_out(page, sort)


@router.post("/retry", dependencies=_WRITE)
async def retry_dead_tasks(body: DeadActionBody, ops: OpsDep) -> DeadActionOut:
    """Queue again up to `limit` dead tasks matching `filter` (every criterion of `POST /search` but
    the state; `{}` means every dead task), each with at least one more attempt. A task whose unique key
    another unfinished task holds stays dead. Call again while `more` is true."""
    dead_filter = body.filter.to_filter("body.filter", (TaskState.DEAD,))
    try:
        await ops.search.validate(dead_filter)
        report = await ops.dead.retry(dead_filter, limit=body.limit)
    except InvalidSearch as exc:
        raise invalid_field(exc.field, exc.message) from None
    return DeadActionOut(matched=report.matched, retried=report.acted, more=report.more)


@router.delete("", dependencies=_WRITE)
async def delete_dead_tasks(
    ops: OpsDep,
    queue: QueueQuery = None,
    name: NameQuery = None,
    error_type: ErrorTypeQuery = None,
    error: ErrorQuery = None,
    finished_before: FinishedBefore = None,
    id: Annotated[list[IdQuery] | None, Query(max_length=1000, description="Only these task ids.")] = None,
    limit: Annotated[int, Query(ge=1, le=100_000, description="Delete at most this many.")] = 10_000,
) -> DeadActionOut:
    """Delete up to `limit` dead tasks (with their history) matching every given criterion; with
    none, the oldest dead tasks. Call again while `more` is true."""
    criteria = SearchFilter(
        ids=tuple(id or ()),
        states=(TaskState.DEAD,),
        queues=tuple(queue or ()),
        names=tuple(name or ()),
        error_types=tuple(error_type or ()),
        error=error,
        finished_before=finished_before,
    )
    try:
        report = await ops.dead.delete(criteria, limit=limit)
    except InvalidSearch as exc:
        raise invalid_field("query", exc.message) from None
    return DeadActionOut(matched=report.matched, deleted=report.acted, more=report.more)
