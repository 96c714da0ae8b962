"""``POST /api/v1/search``: structured filters, JSON conditions, sorts, keyset pages, capped counts, and
bad input answered as 422 problems naming the field (never SQL, never a 500)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest

from tests.api.conftest import assert_problem
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
