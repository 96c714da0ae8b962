"""``POST /api/v1/search``: structured filters, JSON conditions, sorts, keyset pages, capped counts, and
bad input answered as 422 problems naming the field (never SQL, never a 500)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import psycopg
import pytest
from fastapi import FastAPI

from conveyor.api.app import create_app
from conveyor.db.search_walk import SearchBudget
from tests.api.conftest import TEST_AUTH, assert_problem, new_app
from tests.api.seeding import error, execute, insert, task

SEARCH = "/api/v1/search"
W1 = "00000000-0000-4000-8000-00000000000a"
W2 = "00000000-0000-4000-8000-00000000000b"


async def ids_of(client: httpx.AsyncClient, body: dict[str, Any]) -> list[int]:
    response = await client.post(SEARCH, json=body)
    assert response.status_code == 200, response.text
    return [item["id"] for item in response.json()["items"]]


@pytest.fixture
def corpus(database_url: str) -> dict[str, int]:
    """A small, varied set of tasks, by nickname."""
    rows = {
        "queued": task(state="queued", queue="emails", name="send", args=["a@example.com"], metadata={"tenant": "t1"}),
        "scheduled": task(state="scheduled", queue="emails", name="send", run_at="now() + interval '1 hour'"),
        "running": task(state="running", queue="reports", name="build", worker_id=W1, kwargs={"size": 7}),
        "ok_old": task(
            queue="reports",
            name="build",
            worker_id=W2,
            kwargs={"size": 100, "owner": {"id": 42, "name": "ada"}},
            created_at="now() - interval '3 days'",
            started_at="now() - interval '3 days'",
            finished_at="now() - interval '3 days' + interval '5 seconds'",
        ),
        "dead_value": task(
            state="dead",
            queue="emails",
            name="send",
            worker_id=W1,
            args=["b@example.com", {"retries": 3}],
            last_error=error("ValueError", "bad address 100% sure"),
            metadata={"tenant": "t2", "tags": ["vip", "eu"]},
        ),
        "dead_timeout": task(
            state="dead", queue="reports", name="build", last_error=error("TimeoutError", "took too long")
        ),
        "cancelled": task(state="cancelled", queue="emails", name="send", started_at=None),
    }
    ids = insert(database_url, list(rows.values()))
    return dict(zip(rows, ids, strict=True))


async def test_filters__each_criterion_and_their_combination(reader: httpx.AsyncClient, corpus: dict[str, int]) -> None:
    c = corpus
    now = datetime.now(UTC)

    async def found(**criteria: Any) -> set[int]:
        return set(await ids_of(reader, {"filter": criteria, "limit": 200}))

    assert await found() == set(c.values())
    assert await found(state=["dead"]) == {c["dead_value"], c["dead_timeout"]}
    assert await found(state=["queued", "scheduled"], queue=["emails"]) == {c["queued"], c["scheduled"]}
    assert await found(name=["build"]) == {c["running"], c["ok_old"], c["dead_timeout"]}
    assert await found(worker_id=[W1]) == {c["running"], c["dead_value"]}
    assert await found(id=[c["queued"], c["cancelled"], 999_999]) == {c["queued"], c["cancelled"]}
    day_ago = (now - timedelta(days=1)).isoformat()
    assert await found(created_before=day_ago) == {c["ok_old"]}
    assert await found(created_after=day_ago, queue=["reports"]) == {c["running"], c["dead_timeout"]}
    assert await found(started_before=day_ago) == {c["ok_old"]}
    assert await found(finished_after=day_ago, state=["succeeded", "dead"]) == {c["dead_value"], c["dead_timeout"]}
    assert await found(error="TOO LONG") == {c["dead_timeout"]}
    assert await found(error="valueerr") == {c["dead_value"]}  # the type matches too
    assert await found(error="100%") == {c["dead_value"]}  # % is a literal character
    assert await found(error="1_0") == set()  # and so is _
    assert await found(error_type=["TimeoutError", "KeyError"]) == {c["dead_timeout"]}


async def test_json_conditions__paths_values_predicates_and_containment(
    reader: httpx.AsyncClient, corpus: dict[str, int]
) -> None:
    c = corpus

    async def found(**criteria: Any) -> set[int]:
        return set(await ids_of(reader, {"filter": criteria}))

    assert await found(args=[{"path": "$[0]", "equals": "a@example.com"}]) == {c["queued"]}
    assert await found(args=[{"path": "$[1].retries"}]) == {c["dead_value"]}
    assert await found(kwargs=[{"path": "$.size ? (@ > $min)", "vars": {"min": 50}}]) == {c["ok_old"]}
    assert await found(kwargs=[{"path": "$.size", "equals": 7}]) == {c["running"]}
    assert await found(kwargs=[{"path": "$.owner", "equals": {"id": 42}}]) == {c["ok_old"]}  # contains it
    assert await found(kwargs=[{"contains": {"owner": {"name": "ada"}}}]) == {c["ok_old"]}
    assert await found(metadata=[{"path": "$.tenant", "equals": "t2"}]) == {c["dead_value"]}
    assert await found(metadata=[{"path": "$.tags[*]", "equals": "eu"}]) == {c["dead_value"]}
    assert await found(metadata=[{"path": "$.tenant", "equals": None}]) == set()  # JSON null, not "absent"
    assert await found(metadata=[{"path": "strict $.nothing.here"}]) == set()  # a miss, not an error
    both = [{"path": "$.tenant", "equals": "t1"}, {"contains": {"tenant": "t1"}}]
    assert await found(metadata=both, queue=["emails"]) == {c["queued"]}


async def test_pages__keyset_cursor_in_each_sort(reader: httpx.AsyncClient, database_url: str) -> None:
    ids = insert(
        database_url,
        [
            task(finished_at=f"now() - interval '{i} minutes'", created_at="now() - interval '1 hour'")
            for i in range(25)
        ],
    )
    for sort, expected in (
        ("-id", sorted(ids, reverse=True)),
        ("id", sorted(ids)),
        ("-finished_at", ids),  # the first inserted finished last
        ("finished_at", list(reversed(ids))),
    ):
        seen: list[int] = []
        cursor = None
        counts = []
        while True:
            body: dict[str, Any] = {"sort": sort, "limit": 10, **({"cursor": cursor} if cursor else {})}
            page = (await reader.post(SEARCH, json=body)).json()
            seen += [item["id"] for item in page["items"]]
            counts.append((page["count"], page["count_is_exact"]))
            cursor = page["next_cursor"]
            if cursor is None:
                break
        assert seen == expected, sort
        assert counts == [(25, True)] * 3
    waiting = insert(database_url, [task(state="queued", run_at=f"now() - interval '{i} seconds'") for i in range(3)])
    page = (await reader.post(SEARCH, json={"filter": {"state": ["queued"]}, "sort": "run_at"})).json()
    assert [item["id"] for item in page["items"]] == list(reversed(waiting))
    assert (await reader.post(SEARCH, json={"count": False})).json()["count"] is None


async def test_count__exact_up_to_the_cap_then_a_lower_bound(reader: httpx.AsyncClient, database_url: str) -> None:
    execute(
        database_url,
        "INSERT INTO conveyor_tasks (name, queue, state) SELECT 'add', 'bulk', 'queued' FROM generate_series(1, 10050)",
    )
    insert(database_url, [task(queue="few") for _ in range(3)])
    many = (await reader.post(SEARCH, json={"filter": {"queue": ["bulk"]}, "limit": 5})).json()
    assert (many["count"], many["count_is_exact"]) == (10_000, False)
    assert len(many["items"]) == 5 and many["next_cursor"]
    few = (await reader.post(SEARCH, json={"filter": {"queue": ["few"]}, "limit": 2})).json()
    assert (few["count"], few["count_is_exact"]) == (3, True)


async def test_items__carry_the_error_summary(reader: httpx.AsyncClient, corpus: dict[str, int]) -> None:
    page = (await reader.post(SEARCH, json={"filter": {"id": [corpus["dead_timeout"]]}})).json()
    [item] = page["items"]
    assert item["error_type"] == "TimeoutError"
    assert item["error_message"] == "took too long"
    assert item["state"] == "dead"
    assert "traceback" not in item and "args" not in item


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"sort": "id;DROP TABLE conveyor_tasks"}, "body.sort"),
        ({"sort": "name"}, "body.sort"),
        ({"sort": "run_at"}, "body.sort"),  # needs a waiting-state filter to be an index walk
        ({"limit": 0}, "body.limit"),
        ({"limit": 201}, "body.limit"),
        ({"cursor": "not-a-cursor"}, "body.cursor"),
        ({"cursor": "WyJpZCIsMSwxXQ"}, "body.cursor"),  # made for another sort
        ({"filter": {"state": ["exploded"]}}, "body.filter.state.0"),
        ({"filter": {"queue": ["bad queue!"]}}, "body.filter.queue.0"),
        ({"filter": {"worker_id": ["not-a-uuid"]}}, "body.filter.worker_id.0"),
        ({"filter": {"created_after": "2030-01-01T00:00:00"}}, "body.filter.created_after"),  # no offset
        ({"filter": {"unknown": 1}}, "body.filter.unknown"),
        ({"filter": {"error": ""}}, "body.filter.error"),
        ({"filter": {"error": "a\x00b"}}, "body.filter.error"),  # PostgreSQL text cannot hold NUL
        ({"filter": {"args": [{"path": "$[0]", "equals": "a\x00"}]}}, "body.filter.args.0.equals"),
        ({"filter": {"metadata": [{"contains": {"k\x00": 1}}]}}, "body.filter.metadata.0.contains"),
        ({"filter": {"args": [{"path": "$.a ? (@ ==="}]}}, "body.filter.args.0.path"),
        ({"filter": {"kwargs": [{"path": "'; DROP TABLE conveyor_tasks; --"}]}}, "body.filter.kwargs.0.path"),
        ({"filter": {"metadata": [{}]}}, "body.filter.metadata.0"),
        ({"filter": {"metadata": [{"contains": {}, "path": "$.a"}]}}, "body.filter.metadata.0"),
        ({"filter": {"args": [{"path": "x" * 501}]}}, "body.filter.args.0.path"),
        (
            {"filter": {"created_after": "2030-01-02T00:00:00Z", "created_before": "2030-01-01T00:00:00Z"}},
            "body.filter",
        ),
    ],
)
async def test_bad_input__422_naming_the_field(
    reader: httpx.AsyncClient, database_url: str, body: dict[str, Any], field: str
) -> None:
    insert(database_url, [task()])
    problem = assert_problem(await reader.post(SEARCH, json=body), 422, field)
    assert "DROP TABLE" not in problem["detail"] or field != "body.sort"
    # Whatever was sent, the table is still there.
    assert execute(database_url, "SELECT count(*) FROM conveyor_tasks") == [(1,)]


async def test_bad_input__errors_found_while_evaluating_are_422_too(
    reader: httpx.AsyncClient, database_url: str
) -> None:
    insert(database_url, [task(args=["text"])])
    missing_var = {"filter": {"args": [{"path": "$[*] ? (@ == $who)"}]}}
    assert_problem(await reader.post(SEARCH, json=missing_var), 422)
    bad_regex = {"filter": {"args": [{"path": '$[*] ? (@ like_regex "(")'}]}}
    assert_problem(await reader.post(SEARCH, json=bad_regex), 422)
    # And the database breaker did not take them for an outage.
    assert (await reader.post(SEARCH, json={})).status_code == 200


async def test_plan__a_rare_value_of_an_indexed_column_is_found_by_its_index(database_url: str) -> None:
    execute(
        database_url,
        "INSERT INTO conveyor_tasks (name, queue, state) "
        "SELECT 'add', CASE WHEN i % 2000 = 0 THEN 'rare' ELSE 'common' END, 'succeeded' "
        "FROM generate_series(1, 20000) AS i",
    )
    execute(database_url, "ANALYZE conveyor_tasks")
    from sqlalchemy import select
    from sqlalchemy.dialects import postgresql

    from conveyor.db.models import tasks
    from conveyor.db.search_store import _COLUMNS, SearchFilter

    query = select(*_COLUMNS).where(*SearchFilter(queues=("rare",)).clauses()).order_by(tasks.c.id.desc()).limit(51)
    sql = str(query.compile(dialect=postgresql.dialect(), compile_kwargs={"literal_binds": True}))
    [(plan,)] = execute(database_url, "EXPLAIN (FORMAT JSON) " + sql)
    text = str(plan)
    assert "ix_conveyor_tasks_queue_id" in text
    assert "Seq Scan" not in text


# -- the time budget: partial pages that resume exactly where the scan stopped ---------------------------

#: 1,500 tasks; every 23rd has the needle in its args. Finished times and run times repeat (ties
#: broken by id) and do not follow the ids; a fifth are queued and a fifth scheduled (run_at sorts).
HAYSTACK = """
INSERT INTO conveyor_tasks (name, queue, state, args, run_at, started_at, finished_at)
SELECT 'add', 'default', s.state,
       jsonb_build_array(i, CASE WHEN i % 23 = 0 THEN 'needle' ELSE 'hay' END),
       now() + ((i * 13) % 50) * interval '1 minute',
       CASE WHEN s.finished THEN now() - interval '1 hour' END,
       CASE WHEN s.finished THEN now() - ((i * 37) % 150) * interval '1 second' END
FROM generate_series(1, 1500) AS i,
     LATERAL (SELECT CASE i % 5 WHEN 0 THEN 'queued' WHEN 1 THEN 'scheduled' WHEN 2 THEN 'dead' ELSE 'succeeded' END
                     AS state,
                     i % 5 >= 2 AS finished) AS s
"""
NEEDLE = {"args": [{"path": "$[1]", "equals": "needle"}]}
WAITING = ["queued", "scheduled"]
# What each sort walks and in which order, as plain SQL (the reference the pages must add up to).
ORDERS = {
    "-id": ("true", "id DESC"),
    "id": ("true", "id"),
    "-finished_at": ("finished_at IS NOT NULL", "finished_at DESC, id DESC"),
    "finished_at": ("finished_at IS NOT NULL", "finished_at, id"),
    "-run_at": ("state IN ('queued', 'scheduled')", "run_at DESC, id DESC"),
    "run_at": ("state IN ('queued', 'scheduled')", "run_at, id"),
}


def expected_ids(database_url: str, sort: str, condition: str = "args ->> 1 = 'needle'") -> list[int]:
    domain, order = ORDERS[sort]
    sql = f"SELECT id FROM conveyor_tasks WHERE {condition} AND {domain} ORDER BY {order}"
    return [row[0] for row in execute(database_url, sql)]


async def walk(client: httpx.AsyncClient, body: dict[str, Any]) -> tuple[list[int], list[dict[str, Any]]]:
    """Every page of a search, following the cursor to the end: the ids in order, and the pages."""
    seen: list[int] = []
    pages: list[dict[str, Any]] = []
    cursor = None
    while True:
        response = await client.post(SEARCH, json={**body, **({"cursor": cursor} if cursor else {})})
        assert response.status_code == 200, response.text
        page = response.json()
        pages.append(page)
        seen += [item["id"] for item in page["items"]]
        cursor = page["next_cursor"]
        if cursor is None:
            return seen, pages
        assert len(pages) < 500, "the walk does not end"


@pytest.mark.parametrize("sort", list(ORDERS))
async def test_budget__partial_pages_resume_exactly_where_the_scan_stopped(
    reader: httpx.AsyncClient, api: FastAPI, database_url: str, sort: str
) -> None:
    execute(database_url, HAYSTACK)
    # At most 60 tasks examined per request (a row budget, so the test does not depend on speed): two or
    # three needles, so some pages fill (two items and one more) and most stop short.
    api.state.search_budget = SearchBudget(page_s=30, count_s=30, max_rows=60, first_slice_rows=20)
    criteria = {**NEEDLE, **({"state": WAITING} if "run_at" in sort else {})}
    expected = expected_ids(database_url, sort)

    seen, pages = await walk(reader, {"filter": criteria, "sort": sort, "limit": 2})

    assert seen == expected  # every match, once, in order
    partial = [p for p in pages if not p["complete"]]
    assert len(partial) >= 3
    assert any(p["complete"] and p["next_cursor"] for p in pages)  # full pages in between
    for page in partial:
        assert page["next_cursor"] and page["scanned_to"]["id"] >= 1
        assert len(page["items"]) <= 2
    assert all(p["scanned_to"] is None for p in pages if p["complete"])
    assert pages[-1]["complete"]
    # The count is honest: exact, or a lower bound that says it is one.
    assert all(p["count"] == len(expected) if p["count_is_exact"] else p["count"] <= len(expected) for p in pages)
    assert not pages[0]["count_is_exact"]


async def test_budget__out_of_time_every_request_still_scans_one_slice(
    reader: httpx.AsyncClient, api: FastAPI, database_url: str
) -> None:
    execute(database_url, HAYSTACK)
    api.state.search_budget = SearchBudget(page_s=0, count_s=0, first_slice_rows=50)

    seen, pages = await walk(reader, {"filter": NEEDLE, "limit": 50})

    assert seen == expected_ids(database_url, "-id")
    assert len(pages) == 1500 // 50 + 1  # one slice of 50 tasks each; the last finds the end
    assert [p["complete"] for p in pages] == [False] * 30 + [True]
    first = pages[0]
    assert (first["count"], first["count_is_exact"]) == (len(first["items"]), False)  # at least these


async def test_budget__index_filters_answer_whole_pages_and_counts_when_in_time(
    reader: httpx.AsyncClient, api: FastAPI, database_url: str
) -> None:
    execute(database_url, HAYSTACK)
    # The default budget is ample for 1,500 tasks: whole pages, exact counts, for a scan too.
    expected = expected_ids(database_url, "-finished_at")
    first = (await reader.post(SEARCH, json={"filter": NEEDLE, "sort": "-finished_at", "limit": 5})).json()
    assert first["complete"] and first["scanned_to"] is None
    assert [i["id"] for i in first["items"]] == expected[:5]
    assert (first["count"], first["count_is_exact"]) == (len(expected), True)
    # A tiny budget does not change an answer an index gives (whichever way it is found).
    api.state.search_budget = SearchBudget(page_s=0, count_s=0, first_slice_rows=20)
    seen, _ = await walk(reader, {"filter": {"state": WAITING}, "sort": "run_at", "limit": 40})
    assert seen == expected_ids(database_url, "run_at", "true")


@pytest.mark.parametrize("sort", list(ORDERS))
async def test_plan__a_walk_slice_is_a_range_of_the_sort_index(database_url: str, sort: str) -> None:
    execute(database_url, HAYSTACK)
    execute(database_url, "ANALYZE conveyor_tasks")
    from datetime import UTC, datetime

    from sqlalchemy import select
    from sqlalchemy.dialects import postgresql

    from conveyor.api.pagination import parse_sort
    from conveyor.db.search_store import _COLUMNS, JsonCondition, SearchFilter
    from conveyor.db.search_walk import SortOrder
    from conveyor.db.task_queries import Keyset

    order = SortOrder(parse_sort(sort))
    now = datetime.now(UTC)
    start, end = (Keyset(900, 900), Keyset(700, 700)) if sort.endswith("id") else (Keyset(now, 900), Keyset(now, 700))
    if not sort.startswith("-"):
        start, end = end, start
    needle = SearchFilter(args=(JsonCondition(where="x", path="$[1]", equals="needle"),))
    queries = {
        "probe": order.probe(start, 100),
        "slice": select(*_COLUMNS)
        .where(*needle.clauses(), *order.domain(), *order.between(start, end))
        .order_by(*order.order_by())
        .limit(4),
    }
    index = {"id": "pk_conveyor_tasks", "finished_at": "ix_conveyor_tasks_finished_at"}.get(
        sort.lstrip("-"), "ix_conveyor_tasks_waiting_run_at"
    )
    with psycopg.connect(database_url, autocommit=True) as conn:
        # As the walk runs its statements: sequential scans off, so only an index can serve them well.
        conn.execute("SET enable_seqscan = off")
        for what, query in queries.items():
            sql = str(query.compile(dialect=postgresql.dialect(), compile_kwargs={"literal_binds": True}))
            [(plan,)] = conn.execute(("EXPLAIN (FORMAT JSON) " + sql).encode()).fetchall()  # type: ignore[call-overload]
            assert index in str(plan), (what, plan)
            assert "Seq Scan" not in str(plan), (what, plan)


async def test_budget__comes_from_the_api_settings(database_url: str) -> None:
    app = new_app(database_url, api__search_page_budget_s=0.75, api__search_count_budget_s=0.2)
    try:
        budget = create_app(app, auth=TEST_AUTH).state.search_budget
        assert (budget.page_s, budget.count_s) == (0.75, 0.2)
    finally:
        await app.aclose()
        app.close()
