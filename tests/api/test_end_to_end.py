"""Enqueue over HTTP, an in-process worker (`Worker(app, burst=True)`) runs it, the result comes back over HTTP."""

from __future__ import annotations

import httpx

from conveyor.app import App
from tests.api.conftest import running_worker


async def test_enqueue_run_and_fetch_the_result_over_http(writer: httpx.AsyncClient, conveyor_app: App) -> None:
    enqueued = await writer.post("/api/v1/tasks", json={"name": "add", "args": [20], "kwargs": {"b": 22}})
    task_id = enqueued.json()["id"]
    items = [{"name": "add", "args": [i, i]} for i in range(3)]
    batch = await writer.post("/api/v1/tasks/batch", json={"tasks": items})

    async with running_worker(conveyor_app, burst=True):
        result = (await writer.get(f"/api/v1/tasks/{task_id}/result", params={"wait": 20})).json()

    assert result == {"id": task_id, "state": "succeeded", "ready": True, "result": 42, "error": None}
    for i, item in enumerate(batch.json()["tasks"]):
        done = (await writer.get(f"/api/v1/tasks/{item['id']}/result", params={"wait": 20})).json()
        assert done["result"] == 2 * i
    detail = (await writer.get(f"/api/v1/tasks/{task_id}")).json()
    assert (detail["state"], detail["attempt"], detail["result"]) == ("succeeded", 1, 42)
    assert detail["worker_id"] is not None
    succeeded = (await writer.get("/api/v1/tasks", params={"state": "succeeded"})).json()["items"]
    assert len(succeeded) == 4
    queue = (await writer.get("/api/v1/queues/default")).json()
    assert queue["succeeded_last_minute"] == 4
