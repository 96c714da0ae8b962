"""``POST /api/v1/search``: find tasks by a structured filter, a page at a time, with a count."""

from __future__ import annotations

from fastapi import APIRouter

from conveyor.api.auth import Scope
from conveyor.api.deps import require
from conveyor.api.errors import ApiProblem, invalid_field
from conveyor.api.operations import Ops, OpsDep
from conveyor.api.pagination import decode_cursor, encode_cursor, parse_sort
from conveyor.api.schemas_search import ScanPositionOut, SearchBody, SearchItemOut, SearchOut
from conveyor.db.search_store import InvalidSearch, SearchFilter, SearchPage, SearchTooCostly
from conveyor.db.task_queries import Keyset

router = APIRouter(prefix="/search", tags=["search"])

_READ = [require(Scope.TASKS_READ)]


@router.post("", dependencies=_READ)
async def search_tasks(body: SearchBody, ops: OpsDep) -> SearchOut:
    """Tasks matching a filter: state, queue, task name, worker, time ranges on created / started /
    finished, error text or type, and JSON conditions on `args`, `kwargs` and `metadata`.

    Sorted by an allowed field (`sort`), a page of `limit` at a time (pass `next_cursor` back as
    `cursor` with the same sort). `count` is exact up to 10,000 matches and a lower bound beyond
    (`count_is_exact` says which).

    Every answer comes within a time budget. A filter no index answers (JSON conditions, error text or
    type, worker, start time) scans the sort order in slices, and when the budget runs out before the
    page fills it answers a partial page (`complete: false`, `scanned_to`) whose `next_cursor` resumes
    the scan exactly where it stopped: following the cursors returns every match once, in order. The
    count then may be a lower bound too. A filter the database rejects (a JSON path that does not
    parse, a pattern it cannot compile) is a 422 naming it; one too costly to scan at all is a 422
    asking to narrow it."""
    after = None if body.cursor is None else body_cursor(body.cursor, body.sort)
    page = await run_search(
        ops, body.filter.search_filter(), sort=body.sort, limit=body.limit, after=after, count=body.count
    )
    return search_out(page, body.sort)


def body_cursor(cursor: str, sort: str, field: str = "body.cursor") -> Keyset:
    """:func:`decode_cursor` for a cursor that came in ``field`` (errors name it)."""
    try:
        return decode_cursor(cursor, sort)
    except ApiProblem as problem:
        message = problem.errors[0]["message"] if problem.errors else "is not a cursor this API returned"
        raise invalid_field(field, message) from None


async def run_search(
    ops: Ops,
    search_filter: SearchFilter,
    *,
    sort: str,
    limit: int,
    after: Keyset | None,
    count: bool,
    filter_field: str = "body.filter",
) -> SearchPage:
    """Run a search, turning what the database rejects into 422s naming the field."""
    try:
        return await ops.search.search(search_filter, parse_sort(sort), limit, after, count=count)
    except InvalidSearch as exc:
        raise invalid_field(exc.field, exc.message) from None
    except SearchTooCostly:
        raise invalid_field(
            filter_field,
            "too costly to answer in time; narrow it (a state, queue, name or time range uses an index)",
            kind="search-too-costly",
        ) from None


def search_out(page: SearchPage, sort: str) -> SearchOut:
    reached = page.scanned_to
    return SearchOut(
        items=[SearchItemOut.model_validate(item, from_attributes=True) for item in page.items],
        next_cursor=None if page.next is None else encode_cursor(sort, page.next),
        complete=page.complete,
        scanned_to=None if reached is None else ScanPositionOut(value=reached.value, id=reached.id),
        count=page.count,
        count_is_exact=page.count_is_exact,
    )
