"""``/api/v1/resilience`` and the ``database`` circuit breaker around the API: the live state of
dependencies and breakers, recovery passes, and failing fast while the database is unreachable."""

from __future__ import annotations

import asyncio
import time

import httpx
from fastapi import FastAPI

from conveyor.api.app import create_app
from conveyor.app import App
from conveyor.db.embedded import free_port
from conveyor.resilience.circuit_breaker import BreakerState, CircuitBreaker
from tests.api.conftest import TEST_AUTH, Keys, assert_problem, client_for, new_app
from tests.api.seeding import execute, insert, task

BASE = "/api/v1/resilience"
DEAD_WORKER = "00000000-0000-4000-8000-0000000000dd"


def database_breaker(api: FastAPI) -> CircuitBreaker:
    breaker = api.state.breakers.get("database")
    assert isinstance(breaker, CircuitBreaker)
    return breaker


def open_it(breaker: CircuitBreaker) -> None:
    for _ in range(breaker.failure_threshold):
        breaker.acquire().failure("simulated outage")
    assert breaker.state == BreakerState.OPEN


async def test_state__dependencies_breakers_and_no_recovery_yet(reader: httpx.AsyncClient) -> None:
    body = (await reader.get(BASE)).json()
    assert body["status"] == "ok"
    database, redis = body["dependencies"]
    assert (database["name"], database["status"], database["required"]) == ("database", "ok", True)
    assert database["latency_ms"] is not None
    assert (redis["name"], redis["status"], redis["required"]) == ("redis", "not configured", False)
    assert [b["name"] for b in body["breakers"]] == ["database", "redis"]
    assert {b["state"] for b in body["breakers"]} == {"closed"}
    assert body["last_recovery"] is None
    assert body["silent_worker_after_s"] == 3.0  # 3 x the tests' 1 s lease
    listed = (await reader.get(f"{BASE}/breakers")).json()["items"]
    assert [b["name"] for b in listed] == ["database", "redis"]


async def test_state__redis_configured_but_down_is_degraded(database_url: str) -> None:
    app = new_app(database_url, redis_url=f"redis://127.0.0.1:{free_port()}/0")
    try:
        from tests.api.conftest import make_keys

        keys = await make_keys(app)
        async with client_for(create_app(app, auth=TEST_AUTH), keys.reader) as client:
            body = (await client.get(BASE)).json()
        assert body["status"] == "degraded"
        redis = body["dependencies"][1]
        assert redis["status"] == "unavailable"
        assert redis["detail"] and "127.0.0.1" not in redis["detail"]
        assert body["dependencies"][0]["status"] == "ok"
        assert next(b for b in body["breakers"] if b["name"] == "redis")["total_failures"] == 1
    finally:
        await app.aclose()
        app.close()


async def test_recovery__one_pass_rescues_promotes_and_marks_silent_workers(
    admin: httpx.AsyncClient, reader: httpx.AsyncClient, database_url: str
) -> None:
    execute(
        database_url,
        "INSERT INTO conveyor_workers (id, name, host, pid, queues, concurrency, last_heartbeat_at) "
        "VALUES (%s, 'gone', 'host', 1, ARRAY['default'], 1, now() - interval '1 hour')",
        (DEAD_WORKER,),
    )
    lost, due, waiting = insert(
        database_url,
        [
            task(state="running", worker_id=DEAD_WORKER, lease_expires_at="now() - interval '1 second'"),
            task(state="scheduled", run_at="now() - interval '1 second'"),
            task(state="scheduled", run_at="now() + interval '1 hour'"),
        ],
    )
    report = (await admin.post(f"{BASE}/recovery/run")).json()
    assert (report["requeued"], report["dead"], report["promoted"], report["workers_stopped"]) == (1, 0, 1, 1)
    assert report["requeued_ids"] == [lost]
    assert report["stopped_workers"] == [DEAD_WORKER]
    assert report["ok"] is True and report["errors"] == []
    states = dict(execute(database_url, "SELECT id, state FROM conveyor_tasks"))
    assert states == {lost: "queued", due: "queued", waiting: "scheduled"}
    assert execute(database_url, "SELECT state FROM conveyor_workers") == [("stopped",)]
    shown = (await reader.get(BASE)).json()["last_recovery"]
    assert shown == report
    again = (await admin.post(f"{BASE}/recovery/run")).json()
    assert (again["requeued"], again["promoted"], again["workers_stopped"]) == (0, 0, 0)
    assert_problem(await reader.post(f"{BASE}/recovery/run"), 403)


async def test_reset__closes_a_breaker(admin: httpx.AsyncClient, reader: httpx.AsyncClient, api: FastAPI) -> None:
    breaker = database_breaker(api)
    open_it(breaker)
    assert_problem(await reader.post(f"{BASE}/breakers/database/reset"), 403)
    # The resilience routes stay reachable while the breaker is open; an ordinary route is refused.
    assert (await reader.get(f"{BASE}/breakers")).json()["items"][0]["state"] == "open"
    assert_problem(await reader.get("/api/v1/queues"), 503)
    reset = (await admin.post(f"{BASE}/breakers/database/reset")).json()
    assert reset["state"] == "closed" and reset["consecutive_failures"] == 0
    assert (await reader.get("/api/v1/queues")).status_code == 200
    assert_problem(await admin.post(f"{BASE}/breakers/nope/reset"), 404)
    assert_problem(await admin.post(f"{BASE}/breakers/Bad%20Name/reset"), 422, "path.name")


async def test_breaker__opens_when_the_database_is_unreachable_then_fails_fast(keys: Keys) -> None:
    unreachable = new_app(f"postgresql://postgres@127.0.0.1:{free_port()}/nothing")
    api = create_app(unreachable, auth=TEST_AUTH)
    breaker = database_breaker(api)
    try:
        async with client_for(api, keys.reader) as client:
            for _ in range(breaker.failure_threshold):
                problem = assert_problem(await client.get("/api/v1/queues"), 503)
                assert problem["type"].endswith(":database-unavailable")
                assert "circuit breaker" not in problem["detail"]
            assert breaker.state == BreakerState.OPEN
            for path in ("/api/v1/queues", "/api/v1/tasks", "/api/v1/search"):
                started = time.perf_counter()
                response = await client.request("POST" if path.endswith("search") else "GET", path, json={})
                elapsed = time.perf_counter() - started
                problem = assert_problem(response, 503)
                assert "circuit breaker open" in problem["detail"]
                assert int(response.headers["retry-after"]) >= 1
                assert elapsed < 0.5
            assert breaker.snapshot().total_rejected == 3
            # Past the reset timeout, one request tries the database first: still down, still open.
            breaker.reset_timeout_s = 0.2
            await asyncio.sleep(0.25)
            assert breaker.state == BreakerState.HALF_OPEN
            problem = assert_problem(await client.get("/api/v1/queues"), 503)
            assert "circuit breaker open" in problem["detail"]
            assert breaker.state == BreakerState.OPEN
            assert breaker.snapshot().times_opened == 2
            # Probes never depend on the breaker.
            assert (await client.get("/health/live")).status_code == 200
    finally:
        await unreachable.aclose()
        unreachable.close()


async def test_breaker__a_trial_that_reaches_the_database_closes_it(api: FastAPI, reader: httpx.AsyncClient) -> None:
    breaker = database_breaker(api)
    breaker.reset_timeout_s = 0.2
    open_it(breaker)
    assert_problem(await reader.get("/api/v1/queues"), 503)
    await asyncio.sleep(0.25)
    assert (await reader.get("/api/v1/queues")).status_code == 200
    assert breaker.state == BreakerState.CLOSED


async def test_breaker__client_errors_do_not_count_as_outages(api: FastAPI, reader: httpx.AsyncClient) -> None:
    breaker = database_breaker(api)
    for _ in range(breaker.failure_threshold + 2):
        assert_problem(await reader.get("/api/v1/tasks/999999"), 404)
        assert_problem(await reader.post("/api/v1/search", json={"sort": "bogus"}), 422)
    assert breaker.state == BreakerState.CLOSED
    assert breaker.snapshot().total_failures == 0


async def test_breaker__one_per_application(conveyor_app: App) -> None:
    first, second = create_app(conveyor_app), create_app(conveyor_app)
    assert database_breaker(first) is not database_breaker(second)
