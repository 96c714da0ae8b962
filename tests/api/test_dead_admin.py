"""Dead letters (list, bulk retry, bulk delete) and administration (prune in batches, redacted
configuration, maintenance mode that workers honour)."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import pytest
from fastapi import FastAPI

from conveyor.api.app import create_app
from conveyor.app import App
from tests.api.conftest import TEST_AUTH, Keys, assert_problem, client_for, make_keys, new_app, running_worker
from tests.api.seeding import error, execute, insert, task

DEAD = "/api/v1/dead"
ADMIN = "/api/v1/admin"


@pytest.fixture
def letters(database_url: str) -> dict[str, list[int]]:
    timeouts = insert(
        database_url,
        [task(state="dead", queue="reports", name="build", last_error=error("TimeoutError", "slow")) for _ in range(3)],
    )
    values = insert(
        database_url,
        [
            task(state="dead", queue="emails", name="send", last_error=error("ValueError", f"bad address {i}"))
            for i in range(2)
        ],
    )
    alive = insert(database_url, [task(state="succeeded"), task(state="queued", finished_at=None)])
    return {"timeouts": timeouts, "values": values, "alive": alive}


async def test_list__dead_tasks_with_their_errors(reader: httpx.AsyncClient, letters: dict[str, list[int]]) -> None:
    page = (await reader.get(DEAD)).json()
    assert {item["id"] for item in page["items"]} == set(letters["timeouts"] + letters["values"])
    assert (page["count"], page["count_is_exact"]) == (5, True)
    assert all(item["state"] == "dead" for item in page["items"])
    by_type = (await reader.get(DEAD, params={"error_type": "ValueError"})).json()
    assert {item["error_message"] for item in by_type["items"]} == {"bad address 0", "bad address 1"}
    by_text = (await reader.get(DEAD, params={"error": "ADDRESS 1", "queue": "emails"})).json()
    assert [item["id"] for item in by_text["items"]] == [letters["values"][1]]
    first = (await reader.get(DEAD, params={"limit": 2, "sort": "-id"})).json()
    second = (await reader.get(DEAD, params={"limit": 2, "sort": "-id", "cursor": first["next_cursor"]})).json()
    assert [i["id"] for i in first["items"] + second["items"]] == sorted(letters["timeouts"] + letters["values"])[::-1][
        :4
    ]
    assert_problem(await reader.get(DEAD, params={"sort": "name"}), 422, "query.sort")
    assert_problem(await reader.get(DEAD, params={"cursor": "zzz"}), 422, "query.cursor")
    assert_problem(await reader.get(DEAD, params={"error": "a\x00"}), 422, "query.error")


async def test_retry__by_filter_queues_them_again_with_an_attempt_left(
    writer: httpx.AsyncClient, letters: dict[str, list[int]], database_url: str
) -> None:
    response = await writer.post(f"{DEAD}/retry", json={"filter": {"error_type": ["TimeoutError"]}})
    assert response.json() == {"matched": 3, "retried": 3, "deleted": None, "more": False}
    rows = execute(
        database_url,
        "SELECT state, max_attempts > attempt, finished_at IS NULL FROM conveyor_tasks WHERE id = ANY(%s)",
        (letters["timeouts"],),
    )
    assert rows == [("queued", True, True)] * 3
    [(events,)] = execute(
        database_url,
        "SELECT count(*) FROM conveyor_task_events WHERE kind = 'retried' AND task_id = ANY(%s)",
        (letters["timeouts"],),
    )
    assert events == 3
    # The others are still dead; a second call finds nothing more of that kind.
    again = await writer.post(f"{DEAD}/retry", json={"filter": {"error_type": ["TimeoutError"]}})
    assert again.json()["matched"] == 0
    assert (await writer.get(DEAD)).json()["count"] == 2


async def test_retry__limit_unique_keys_and_json_conditions(writer: httpx.AsyncClient, database_url: str) -> None:
    held, blocked = insert(
        database_url,
        [
            task(state="queued", unique_key="invoice-7", finished_at=None),
            task(state="dead", unique_key="invoice-7", last_error=error(), kwargs={"invoice": 7}),
        ],
    )
    others = insert(database_url, [task(state="dead", kwargs={"invoice": i}, last_error=error()) for i in range(4)])
    limited = (await writer.post(f"{DEAD}/retry", json={"filter": {"id": others}, "limit": 3})).json()
    assert limited == {"matched": 3, "retried": 3, "deleted": None, "more": True}
    # The unique key is held by a waiting task: that dead task stays dead.
    kept = (
        await writer.post(f"{DEAD}/retry", json={"filter": {"kwargs": [{"path": "$.invoice", "equals": 7}]}})
    ).json()
    assert kept == {"matched": 1, "retried": 0, "deleted": None, "more": False}
    assert execute(database_url, "SELECT state FROM conveyor_tasks WHERE id = %s", (blocked,)) == [("dead",)]
    assert execute(database_url, "SELECT state FROM conveyor_tasks WHERE id = %s", (held,)) == [("queued",)]
    bad = {"filter": {"kwargs": [{"path": "$.invoice ? ("}]}}
    assert_problem(await writer.post(f"{DEAD}/retry", json=bad), 422, "body.filter.kwargs.0.path")
    assert_problem(await writer.post(f"{DEAD}/retry", json={}), 422, "body.filter")
    assert_problem(await writer.post(f"{DEAD}/retry", json={"filter": {}, "limit": 0}), 422, "body.limit")
    assert_problem(await writer.post(f"{DEAD}/retry", json={"filter": {"state": ["queued"]}}), 422)


async def test_delete__by_filter_and_only_dead_tasks(
    writer: httpx.AsyncClient, reader: httpx.AsyncClient, letters: dict[str, list[int]], database_url: str
) -> None:
    assert_problem(await reader.delete(DEAD), 403)
    removed = (await writer.delete(DEAD, params={"queue": "reports", "limit": 2})).json()
    assert removed == {"matched": 2, "retried": None, "deleted": 2, "more": True}
    response = await writer.delete(DEAD, params={"id": letters["alive"] + letters["values"]})
    assert response.status_code == 200, (str(response.request.url), response.text)
    rest = response.json()
    assert rest["deleted"] == 2  # the live ones among the ids are not dead: untouched
    [(left,)] = execute(database_url, "SELECT count(*) FROM conveyor_tasks")
    assert left == 3  # one timeout left, and the two live tasks


async def test_prune__finished_tasks_older_than_the_retention_in_batches(
    admin: httpx.AsyncClient, database_url: str
) -> None:
    execute(
        database_url,
        "INSERT INTO conveyor_tasks (name, queue, state, created_at, finished_at) "
        "SELECT 'add', 'default', (ARRAY['succeeded', 'dead', 'cancelled'])[1 + i % 3], "
        "now() - interval '3 days', now() - interval '2 days' FROM generate_series(1, 12000) AS i",
    )
    recent = insert(database_url, [task(finished_at="now() - interval '10 minutes'")])
    waiting = insert(database_url, [task(state="queued", created_at="now() - interval '5 days'")])
    old_ids = [row[0] for row in execute(database_url, "SELECT id FROM conveyor_tasks ORDER BY id LIMIT 5")]
    execute(
        database_url,
        "INSERT INTO conveyor_task_events (task_id, kind, attempt) SELECT unnest(%s::bigint[]), 'claimed', 1",
        (old_ids,),
    )
    body = {"older_than_s": 86_400, "batch_size": 5000}
    pruned = (await admin.post(f"{ADMIN}/prune", json=body)).json()
    assert (pruned["deleted"], pruned["batches"], pruned["more"]) == (12_000, 3, False)
    remaining = {row[0] for row in execute(database_url, "SELECT id FROM conveyor_tasks")}
    assert remaining == set(recent + waiting)
    assert execute(database_url, "SELECT count(*) FROM conveyor_task_events") == [(0,)]  # history went too


async def test_prune__limit_states_and_bounds(
    admin: httpx.AsyncClient, reader: httpx.AsyncClient, database_url: str
) -> None:
    insert(
        database_url, [task(state=s, finished_at="now() - interval '2 hours'") for s in ["dead"] * 3 + ["succeeded"]]
    )
    only_dead = (await admin.post(f"{ADMIN}/prune", json={"older_than_s": 3600, "states": ["dead"], "limit": 2})).json()
    assert (only_dead["deleted"], only_dead["more"]) == (2, True)
    rest = (await admin.post(f"{ADMIN}/prune", json={"older_than_s": 3600, "states": ["dead"]})).json()
    assert (rest["deleted"], rest["more"]) == (1, False)
    assert execute(database_url, "SELECT state FROM conveyor_tasks") == [("succeeded",)]
    for bad, field in (
        ({"older_than_s": 59}, "body.older_than_s"),
        ({}, "body.older_than_s"),
        ({"older_than_s": 3600, "states": ["running"]}, "body.states.0"),
        ({"older_than_s": 3600, "batch_size": 50_000}, "body.batch_size"),
        ({"older_than_s": "NaN"}, "body.older_than_s"),
    ):
        assert_problem(await admin.post(f"{ADMIN}/prune", json=bad), 422, field)
    assert_problem(await reader.post(f"{ADMIN}/prune", json={"older_than_s": 3600}), 403)


async def test_config__secrets_are_masked(database_url: str) -> None:
    secret_url = database_url.replace("postgres@", "postgres:pg-S3CRET@", 1)
    assert secret_url != database_url
    app = new_app(secret_url, redis_url="redis://:redis-S3CRET@127.0.0.1:6399/0", api__debug_routes=True)
    try:
        keys = await make_keys(app)
        async with client_for(create_app(app, auth=TEST_AUTH), keys.admin) as client:
            response = await client.get(f"{ADMIN}/config")
            assert response.status_code == 200
            assert "S3CRET" not in response.text
            settings = response.json()["settings"]
            assert settings["database_url"].startswith("postgresql://postgres:***@")
            assert settings["redis_url"] == "redis://:***@127.0.0.1:6399/0"
            assert settings["api"]["debug_routes"] is True
            assert settings["worker"]["lease_timeout_s"] == 1.0
    finally:
        await app.aclose()
        app.close()


async def test_maintenance__pauses_everything_workers_honour_it_and_resume_restores(
    admin: httpx.AsyncClient, conveyor_app: App, database_url: str
) -> None:
    insert(database_url, [task(queue="reports"), task(queue="archive")])
    assert (await admin.post("/api/v1/queues/archive/pause")).status_code == 200  # an operator's own pause
    handle = await conveyor_app.enqueue_async("add", [1, 2])
    status = (await admin.post(f"{ADMIN}/maintenance", json={"action": "pause", "reason": "db upgrade"})).json()
    assert status["active"] is True and status["reason"] == "db upgrade"
    assert status["changed"] == ["default", "reports"]
    assert status["paused_queues"] == ["default", "reports"]
    assert status["unpaused_queues"] == []
    async with running_worker(conveyor_app, queues=["default", "reports", "brand-new"]) as worker:
        await asyncio.sleep(0.8)  # several claim rounds
        assert worker.executed == 0
        shown = (await admin.get(f"{ADMIN}/maintenance")).json()
        assert shown["unpaused_queues"] == ["brand-new"]  # a live worker consumes it: pause again for it
        again = (await admin.post(f"{ADMIN}/maintenance", json={"action": "pause"})).json()
        assert again["changed"] == ["brand-new"] and again["reason"] == "db upgrade"
        resumed = (await admin.post(f"{ADMIN}/maintenance", json={"action": "resume"})).json()
        assert resumed["active"] is False
        assert resumed["changed"] == ["brand-new", "default", "reports"]
        assert await asyncio.wait_for(handle.result_async(timeout=20), 25) == 3
    queues = {q["name"]: q["paused"] for q in (await admin.get("/api/v1/queues")).json()["items"]}
    assert queues["archive"] is True  # paused before maintenance: still paused
    assert queues["default"] is False and queues["reports"] is False
    assert_problem(await admin.post(f"{ADMIN}/maintenance", json={"action": "explode"}), 422, "body.action")
    nul = {"action": "pause", "reason": "a\x00"}
    assert_problem(await admin.post(f"{ADMIN}/maintenance", json=nul), 422, "body.reason")


async def test_admin_routes__need_the_admin_scope(api: FastAPI, keys: Keys) -> None:
    requests: list[tuple[str, str, dict[str, Any] | None]] = [
        ("GET", f"{ADMIN}/config", None),
        ("GET", f"{ADMIN}/maintenance", None),
        ("POST", f"{ADMIN}/maintenance", {"action": "pause"}),
        ("POST", f"{ADMIN}/prune", {"older_than_s": 3600}),
    ]
    async with client_for(api, keys.writer) as client:
        for method, path, body in requests:
            assert_problem(await client.request(method, path, json=body), 403)
