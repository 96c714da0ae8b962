"""``/api/v1/debug``: absent unless enabled; database statistics and locks; a live worker's stacks."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator

import httpx
import psycopg
import pytest

from conveyor.api.app import create_app
from conveyor.app import App
from tests.api.conftest import (
    TEST_AUTH,
    Keys,
    assert_problem,
    client_for,
    make_keys,
    new_app,
    running_worker,
    wait_until,
)
from tests.api.seeding import execute

DEBUG = "/api/v1/debug"


@pytest.fixture
async def debug_app(database_url: str) -> AsyncIterator[App]:
    app = new_app(database_url, api__debug_routes=True)
    try:
        yield app
    finally:
        await app.aclose()
        app.close()


@pytest.fixture
async def debug_keys(debug_app: App) -> Keys:
    return await make_keys(debug_app)


@pytest.fixture
async def debug_admin(debug_app: App, debug_keys: Keys) -> AsyncIterator[httpx.AsyncClient]:
    async with client_for(create_app(debug_app, auth=TEST_AUTH), debug_keys.admin) as client:
        yield client


async def test_off_by_default__404_for_admin_401_without_a_key(
    admin: httpx.AsyncClient, anonymous: httpx.AsyncClient
) -> None:
    for path in ("/db", "/locks", f"/workers/{uuid.uuid4()}/stacks"):
        assert_problem(await admin.get(DEBUG + path), 404)
        assert_problem(await anonymous.get(DEBUG + path), 401)
    document = (await admin.get("/openapi.json")).json()
    assert not [p for p in document["paths"] if p.startswith(DEBUG)]


async def test_on__admin_only(debug_app: App, debug_keys: Keys) -> None:
    api = create_app(debug_app, auth=TEST_AUTH)
    for key in (debug_keys.reader, debug_keys.writer):
        async with client_for(api, key) as client:
            assert_problem(await client.get(f"{DEBUG}/db"), 403)
    async with client_for(api) as client:
        assert_problem(await client.get(f"{DEBUG}/db"), 401)


async def test_db__pool_tables_and_connections(debug_admin: httpx.AsyncClient) -> None:
    body = (await debug_admin.get(f"{DEBUG}/db")).json()
    tables = {t["name"]: t for t in body["tables"]}
    assert {"conveyor_tasks", "conveyor_task_events", "conveyor_workers", "conveyor_debug_requests"} <= set(tables)
    assert tables["conveyor_tasks"]["total_bytes"] > 0
    assert set(tables["conveyor_tasks"]) >= {"live_rows", "dead_rows", "seq_scan", "idx_scan", "last_autovacuum"}
    assert all(name.startswith("conveyor_") for name in tables)
    assert body["server"]["version"] and body["server"]["max_connections"] > 0
    assert body["pool"]["size"] > 0 and body["pool"]["checked_out"] >= 0
    assert any(c["application"] == "conveyor" for c in body["connections"])


async def test_locks__waiting_first_with_blockers_and_queries_of_our_own_sessions_only(
    debug_admin: httpx.AsyncClient, database_url: str
) -> None:
    with (
        psycopg.connect(database_url, application_name="conveyor-test-holder") as holder,
        psycopg.connect(database_url, application_name="someone-else", autocommit=True) as other,
    ):
        holder.execute("LOCK TABLE conveyor_queues IN ACCESS EXCLUSIVE MODE")
        other.execute("SET lock_timeout = '10s'")
        waiting = asyncio.create_task(asyncio.to_thread(other.execute, "SELECT count(*) FROM conveyor_queues"))
        try:

            async def blocked() -> list[dict[str, object]] | None:
                items = (await debug_admin.get(f"{DEBUG}/locks")).json()["items"]
                return [i for i in items if not i["granted"]] or None

            [waiter] = await wait_until("a waiting lock", blocked, timeout_s=10)
            assert waiter["relation"] == "conveyor_queues"
            assert waiter["application"] == "other" and waiter["query"] is None  # not ours: no text
            assert waiter["blocked_by"]
            body = (await debug_admin.get(f"{DEBUG}/locks", params={"limit": 500})).json()
            held = [i for i in body["items"] if i["granted"] and i["relation"] == "conveyor_queues"]
            assert held[0]["mode"] == "AccessExclusiveLock"
            assert held[0]["application"] == "conveyor-test-holder"
            assert "LOCK TABLE" in held[0]["query"]
            assert held[0]["pid"] in waiter["blocked_by"]
            assert body["total"] >= len(body["items"])
            assert len((await debug_admin.get(f"{DEBUG}/locks", params={"limit": 1})).json()["items"]) == 1
        finally:
            holder.rollback()
            await waiting
    assert_problem(await debug_admin.get(f"{DEBUG}/locks", params={"limit": 0}), 422, "query.limit")


async def test_stacks__of_a_live_worker_through_the_database(
    debug_app: App, debug_admin: httpx.AsyncClient, database_url: str
) -> None:
    handle = await debug_app.enqueue_async("slow", [30.0])
    async with running_worker(debug_app, concurrency=2) as worker:
        await wait_until("the task to run", lambda: _running(debug_app, handle.id))
        response = await debug_admin.get(f"{DEBUG}/workers/{worker.id}/stacks", params={"timeout_s": 5})
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["worker_id"] == worker.id
        dump = body["dump"]
        assert dump["pid"] > 0 and dump["host"]
        assert any(t["name"] == "MainThread" and t["stack"] for t in dump["threads"])
        [task] = [t for t in dump["tasks"] if t["name"] == f"task-{handle.id}"]
        functions = [frame["function"] for frame in task["stack"]]
        assert "slow" in functions  # the await chain reaches the task's own code
        assert any(t["name"] == "heartbeat" for t in dump["tasks"])
        assert dump["tasks_total"] == len(dump["tasks"])
        # The request was cleaned up; nothing accumulates.
        assert execute(database_url, "SELECT count(*) FROM conveyor_debug_requests") == [(0,)]
        await debug_app.handle(handle.id).cancel_async()  # the worker stops it at its next heartbeat


async def _running(app: App, task_id: int) -> bool:
    record = await app.store().get(task_id)
    return record.state == "running"


async def test_stacks__unknown_stopped_silent_and_unanswered_workers(
    debug_admin: httpx.AsyncClient, database_url: str
) -> None:
    assert_problem(await debug_admin.get(f"{DEBUG}/workers/{uuid.uuid4()}/stacks"), 404)
    assert_problem(await debug_admin.get(f"{DEBUG}/workers/not-a-uuid/stacks"), 422, "path.worker_id")
    insert_worker = (
        "INSERT INTO conveyor_workers (id, name, host, pid, queues, concurrency, state, last_heartbeat_at) "
        "VALUES (%s, 'w', 'h', 1, ARRAY['default'], 1, %s, now() - make_interval(secs => %s))"
    )
    stopped, silent, mute = (str(uuid.uuid4()) for _ in range(3))
    execute(database_url, insert_worker, (stopped, "stopped", 0))
    execute(database_url, insert_worker, (silent, "running", 3600))
    execute(database_url, insert_worker, (mute, "running", 0))  # looks alive, but no process answers
    assert_problem(await debug_admin.get(f"{DEBUG}/workers/{stopped}/stacks"), 409)
    assert_problem(await debug_admin.get(f"{DEBUG}/workers/{silent}/stacks"), 409)
    problem = assert_problem(await debug_admin.get(f"{DEBUG}/workers/{mute}/stacks", params={"timeout_s": 0.3}), 504)
    assert problem["type"].endswith("worker-timeout")
    assert execute(database_url, "SELECT count(*) FROM conveyor_debug_requests") == [(0,)]
    for bad in (0, 10.5, "soon"):
        assert_problem(
            await debug_admin.get(f"{DEBUG}/workers/{mute}/stacks", params={"timeout_s": bad}), 422, "query.timeout_s"
        )
