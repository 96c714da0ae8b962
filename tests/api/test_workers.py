"""``/api/v1/workers``: inspect, pause, resume, drain, forget."""

from __future__ import annotations

import asyncio
import uuid

import httpx
import psycopg

from conveyor.app import App
from tests.api.conftest import assert_problem, running_worker, wait_until

WORKERS = "/api/v1/workers"


async def test_list_and_get__a_running_worker_with_its_tasks(reader: httpx.AsyncClient, conveyor_app: App) -> None:
    handle = await conveyor_app.enqueue_async("slow", [30])
    async with running_worker(conveyor_app, name="api-test") as worker:
        await wait_until("the task to run", lambda: _is_running(conveyor_app, handle.id))

        listed = (await reader.get(WORKERS)).json()["items"]
        one = (await reader.get(f"{WORKERS}/{worker.id}")).json()

        assert [w["id"] for w in listed] == [worker.id]
        assert one["name"] == "api-test"
        assert one["state"] == "running"
        assert one["running_task_ids"] == [handle.id]
        assert one["queues"] == ["default"]
        assert one["concurrency"] == worker.concurrency
        assert set(one["task_names"]) == {"add", "fail", "slow", "other.queue_task"}
        assert 0 <= one["heartbeat_age_s"] < 5
        await handle.cancel_async()


async def _is_running(app: App, task_id: int) -> bool:
    return await app.handle(task_id).status_async() == "running"


async def test_pause_and_resume__the_worker_stops_and_starts_claiming(
    admin: httpx.AsyncClient, conveyor_app: App
) -> None:
    async with running_worker(conveyor_app) as worker:
        paused = await admin.post(f"{WORKERS}/{worker.id}/pause")
        assert paused.json()["paused"] is True
        await wait_until("the worker to notice", lambda: _attr(worker, "paused", True))
        handle = await conveyor_app.enqueue_async("add", [1, 1])
        await asyncio.sleep(0.5)
        assert await handle.status_async() == "queued"

        resumed = await admin.post(f"{WORKERS}/{worker.id}/resume")

        assert resumed.json()["paused"] is False
        assert await handle.result_async(timeout=10) == 2


async def _attr(worker: object, name: str, value: object) -> bool:
    return getattr(worker, name) == value


async def test_drain__the_worker_finishes_and_stops(admin: httpx.AsyncClient, conveyor_app: App) -> None:
    async with running_worker(conveyor_app) as worker:
        response = await admin.post(f"{WORKERS}/{worker.id}/drain")

        assert response.json()["drain_requested"] is True
        await wait_until("the worker to stop", lambda: _stopped(admin, worker.id))
        assert_problem(await admin.post(f"{WORKERS}/{worker.id}/pause"), 409)


async def _stopped(client: httpx.AsyncClient, worker_id: str) -> bool:
    return (await client.get(f"{WORKERS}/{worker_id}")).json()["state"] == "stopped"


async def test_forget__a_stopped_or_silent_worker_but_not_a_live_one(
    admin: httpx.AsyncClient, conveyor_app: App, database_url: str
) -> None:
    async with running_worker(conveyor_app) as live:
        body = assert_problem(await admin.delete(f"{WORKERS}/{live.id}"), 409)
        assert "alive" in body["detail"]
    # A worker that died without a word: its heartbeat is an hour old and nothing renews it. (Back-dating
    # the live worker's row instead races with its own heartbeat.)
    silent = uuid.uuid4()
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO conveyor_workers (id, name, host, pid, queues, concurrency, last_heartbeat_at, started_at)"
            " VALUES (%s, 'gone', 'nowhere', 1, ARRAY['default'], 1, now() - interval '1 hour',"
            " now() - interval '2 hours')",
            (silent,),
        )
    assert (await admin.delete(f"{WORKERS}/{silent}")).status_code == 204
    assert_problem(await admin.get(f"{WORKERS}/{silent}"), 404)


async def test_unknown_and_malformed_ids(admin: httpx.AsyncClient) -> None:
    unknown = uuid.uuid4()
    for method, suffix in (("GET", ""), ("POST", "/drain"), ("POST", "/pause"), ("POST", "/resume"), ("DELETE", "")):
        assert_problem(await admin.request(method, f"{WORKERS}/{unknown}{suffix}"), 404)
    assert_problem(await admin.get(f"{WORKERS}/not-a-uuid"), 422, "path.worker_id")
