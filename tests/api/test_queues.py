"""``/api/v1/queues``: statistics, pause/resume (honoured by workers), purge, limits."""

from __future__ import annotations

import asyncio
import itertools
from typing import Any

import httpx
import psycopg

from conveyor.app import App
from tests.api.conftest import assert_problem, running_worker, wait_until

QUEUES = "/api/v1/queues"


async def test_list__counts_per_state_oldest_age_and_throughput(
    reader: httpx.AsyncClient, conveyor_app: App, database_url: str
) -> None:
    handles = await conveyor_app.enqueue_many_async([{"name": "add", "args": [i, 1]} for i in range(4)])
    await conveyor_app.enqueue_async("add", [0, 0], delay=600)
    await conveyor_app.enqueue_async("other.queue_task")
    await handles[0].cancel_async()
    with psycopg.connect(database_url, autocommit=True) as conn:  # the oldest waited 30 s already
        conn.execute("UPDATE conveyor_tasks SET run_at = now() - interval '30 seconds' WHERE id = %s", (handles[1].id,))

    body = (await reader.get(QUEUES)).json()

    by_name = {q["name"]: q for q in body["items"]}
    assert sorted(by_name) == ["default", "other"]
    default = by_name["default"]
    assert default["counts"] == {
        "scheduled": 1,
        "queued": 3,
        "running": 0,
        "succeeded": 0,
        "dead": 0,
        "cancelled": 1,
        "blocked": 0,
    }
    assert 30 <= default["oldest_waiting_age_s"] < 60
    assert (default["paused"], default["workers"], default["succeeded_last_minute"]) == (False, 0, 0)
    assert by_name["other"]["counts"]["queued"] == 1


async def test_get__one_queue_and_404_for_unknown(reader: httpx.AsyncClient, conveyor_app: App) -> None:
    await conveyor_app.enqueue_async("add", [1, 1])

    assert (await reader.get(f"{QUEUES}/default")).json()["counts"]["queued"] == 1
    assert_problem(await reader.get(f"{QUEUES}/never-heard-of"), 404)
    assert_problem(await reader.get(f"{QUEUES}/bad name!"), 422, "path.name")
    assert_problem(await reader.get(f"{QUEUES}/{'q' * 101}"), 422, "path.name")


async def test_pause__persists_and_workers_honour_it(admin: httpx.AsyncClient, conveyor_app: App) -> None:
    paused = await admin.post(f"{QUEUES}/default/pause")
    assert paused.json()["paused"] is True
    handle = await conveyor_app.enqueue_async("add", [2, 3])

    async with running_worker(conveyor_app):
        await asyncio.sleep(conveyor_app.settings.worker.poll_interval_s * 3)
        assert await handle.status_async() == "queued"  # not claimed while paused
        # Another API process (a restart) sees the same pause: it is in the database.
        assert (await admin.get(f"{QUEUES}/default")).json()["paused"] is True

        resumed = await admin.post(f"{QUEUES}/default/resume")

        assert resumed.json()["paused"] is False
        assert await handle.result_async(timeout=10) == 5


async def test_pause__a_queue_before_its_first_task(admin: httpx.AsyncClient) -> None:
    response = await admin.post(f"{QUEUES}/later/pause")

    assert response.status_code == 200
    assert response.json()["paused"] is True
    assert response.json()["counts"]["queued"] == 0


async def test_purge__deletes_waiting_tasks_only_by_default(admin: httpx.AsyncClient, conveyor_app: App) -> None:
    waiting = await conveyor_app.enqueue_many_async([{"name": "add", "args": [i, 1]} for i in range(5)])
    await conveyor_app.enqueue_async("add", [1, 1], delay=600)
    await waiting[0].cancel_async()
    other = await conveyor_app.enqueue_async("other.queue_task")

    response = await admin.post(f"{QUEUES}/default/purge")

    assert response.json() == {"queue": "default", "purged": 5}
    counts = (await admin.get(f"{QUEUES}/default")).json()["counts"]
    assert (counts["queued"], counts["scheduled"], counts["cancelled"]) == (0, 0, 1)
    assert await other.status_async() == "queued"
    finished = await admin.post(f"{QUEUES}/default/purge", json={"states": ["cancelled"]})
    assert finished.json()["purged"] == 1
    assert_problem(await admin.post(f"{QUEUES}/default/purge", json={"states": ["running"]}), 422, "body.states.0")


async def test_limits__set_and_cleared(admin: httpx.AsyncClient) -> None:
    url = f"{QUEUES}/default/limits"
    set_ = await admin.put(url, json={"concurrency_limit": 5, "rate_limit_per_s": 2.5})
    assert (set_.json()["concurrency_limit"], set_.json()["rate_limit_per_s"]) == (5, 2.5)

    cleared = await admin.put(url, json={})

    assert (cleared.json()["concurrency_limit"], cleared.json()["rate_limit_per_s"]) == (None, None)
    bad: list[dict[str, Any]] = [{"concurrency_limit": -1}, {"rate_limit_per_s": 0}, {"rate_limit_per_s": "fast"}]
    for body in bad:
        assert_problem(await admin.put(url, json=body), 422)


async def test_workers__counted_per_queue(reader: httpx.AsyncClient, conveyor_app: App) -> None:
    async with running_worker(conveyor_app, queues=["default", "other"]):

        async def counted() -> dict[str, int] | None:
            items = (await reader.get(QUEUES)).json()["items"]
            found = {q["name"]: q["workers"] for q in items}
            return found if found.get("other") == 1 else None

        assert await wait_until("the worker to be counted", counted) == {"default": 1, "other": 1}


async def test_limits__workers_honour_them(admin: httpx.AsyncClient, conveyor_app: App, database_url: str) -> None:
    await admin.put(f"{QUEUES}/default/limits", json={"concurrency_limit": 1})
    handles = await conveyor_app.enqueue_many_async([{"name": "slow", "args": [0.2]} for _ in range(3)])

    async with running_worker(conveyor_app, concurrency=10):
        for handle in handles:
            await handle.result_async(timeout=20)

    with psycopg.connect(database_url, autocommit=True) as conn:
        spans = conn.execute("SELECT started_at, finished_at FROM conveyor_tasks ORDER BY started_at").fetchall()
    # One at a time: each started only after the one before it had finished.
    assert all(later[0] >= earlier[1] for earlier, later in itertools.pairwise(spans))
