"""``/api/v1/schedules``: managing periodic tasks at run time, with the scopes each action needs."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import httpx
from sqlalchemy import text

from conveyor.app import App
from conveyor.core.schedule import ScheduleDefinition, Timing, run_key
from conveyor.db.schedule_store import ScheduleStore
from tests.api.conftest import assert_problem

NIGHTLY = {"name": "nightly", "task": "add", "cron": "0 3 * * *", "timezone": "Europe/Berlin", "args": [1, 2]}


async def create(client: httpx.AsyncClient, **overrides: Any) -> dict[str, Any]:
    response = await client.post("/api/v1/schedules", json={**NIGHTLY, **overrides})
    assert response.status_code == 201, response.text
    body: dict[str, Any] = response.json()
    return body


async def test_create__then_get_and_list(admin: httpx.AsyncClient) -> None:
    response = await admin.post("/api/v1/schedules", json=NIGHTLY)
    assert response.status_code == 201, response.text
    created = response.json()
    assert response.headers["location"].endswith(f"/api/v1/schedules/{created['id']}")
    assert created["task"] == "add" and created["cron"] == "0 3 * * *" and created["interval_s"] is None
    assert created["args"] == [1, 2] and created["kwargs"] == {} and created["misfire"] == "once"
    assert created["enabled"] and created["source"] == "api" and created["last_fire_at"] is None
    next_fire = datetime.fromisoformat(created["next_fire_at"])
    assert next_fire > datetime.now(UTC) and next_fire.astimezone(UTC).hour in (1, 2)  # 03:00 in Berlin
    fetched = await admin.get(f"/api/v1/schedules/{created['id']}")
    assert fetched.status_code == 200 and fetched.json() == created
    listed = await admin.get("/api/v1/schedules")
    assert listed.status_code == 200 and listed.json() == {"items": [created]}


async def test_create__invalid_definitions_name_the_field(admin: httpx.AsyncClient) -> None:
    cases: list[tuple[dict[str, Any], str | None]] = [
        ({**NIGHTLY, "interval_s": 5}, None),  # both cron and interval
        ({"name": "x", "task": "add"}, None),  # neither
        ({**NIGHTLY, "cron": "61 * * * *"}, "body.cron"),
        ({**NIGHTLY, "cron": "0 0 30 2 *"}, "body.cron"),
        ({**NIGHTLY, "timezone": "Mars/Base"}, "body.timezone"),
        ({**NIGHTLY, "misfire": "sometimes"}, "body.misfire"),
        ({**NIGHTLY, "interval_s": 0, "cron": None}, "body.interval_s"),
        ({**NIGHTLY, "name": "9lives"}, "body.name"),
        ({**NIGHTLY, "qeue": "typo"}, "body.qeue"),
    ]
    for body, field in cases:
        assert_problem(await admin.post("/api/v1/schedules", json=body), 422, field)
    await create(admin)
    problem = assert_problem(await admin.post("/api/v1/schedules", json=NIGHTLY), 409)
    assert "already exists" in problem["detail"]


async def test_update__replaces_the_definition_but_not_code_schedules(
    admin: httpx.AsyncClient, conveyor_app: App
) -> None:
    created = await create(admin)
    response = await admin.put(
        f"/api/v1/schedules/{created['id']}",
        json={"name": "nightly", "task": "add", "interval_s": 30, "misfire": "all", "queue": "other"},
    )
    assert response.status_code == 200, response.text
    updated = response.json()
    assert updated["interval_s"] == 30 and updated["cron"] is None and updated["misfire"] == "all"
    assert updated["queue"] == "other" and updated["args"] == []
    assert datetime.fromisoformat(updated["next_fire_at"]).second % 30 == 0

    store = ScheduleStore(conveyor_app.runtime().engine)
    await store.sync([ScheduleDefinition("coded", "add", Timing(interval_s=60))])
    coded = await store.get("coded")
    problem = assert_problem(await admin.put(f"/api/v1/schedules/{coded.id}", json={**NIGHTLY, "name": "coded"}), 409)
    assert "declared in code" in problem["detail"]
    assert_problem(await admin.delete(f"/api/v1/schedules/{coded.id}"), 409)
    paused = await admin.post(f"/api/v1/schedules/{coded.id}/pause")  # operators may pause code schedules
    assert paused.status_code == 200 and paused.json()["disabled_reason"] == "paused"


async def test_pause_resume__toggle_firing(admin: httpx.AsyncClient) -> None:
    created = await create(admin)
    paused = (await admin.post(f"/api/v1/schedules/{created['id']}/pause")).json()
    assert not paused["enabled"] and paused["disabled_reason"] == "paused"
    resumed = (await admin.post(f"/api/v1/schedules/{created['id']}/resume")).json()
    assert resumed["enabled"] and resumed["disabled_reason"] is None


async def test_trigger__enqueues_a_run_now_and_runs_lists_it(
    admin: httpx.AsyncClient, writer: httpx.AsyncClient, conveyor_app: App
) -> None:
    created = await create(admin)
    response = await writer.post(f"/api/v1/schedules/{created['id']}/trigger")
    assert response.status_code == 201, response.text
    run = response.json()
    assert run["kind"] == "manual" and run["fencing_token"] is None and run["task_id"] >= 1
    async with conveyor_app.runtime().engine.connect() as conn:
        task = (
            await conn.execute(
                text("SELECT name, args, idempotency_key FROM conveyor_tasks WHERE id = :id"), {"id": run["task_id"]}
            )
        ).one()
    assert tuple(task) == ("add", [1, 2], run_key(created["id"], datetime.fromisoformat(run["fire_at"])))
    await writer.post(f"/api/v1/schedules/{created['id']}/trigger")

    first = (await admin.get(f"/api/v1/schedules/{created['id']}/runs", params={"limit": 1})).json()
    assert len(first["items"]) == 1 and first["items"][0]["task_state"] == "queued"
    assert first["next_cursor"] is not None
    second = (
        await admin.get(f"/api/v1/schedules/{created['id']}/runs", params={"limit": 1, "cursor": first["next_cursor"]})
    ).json()
    assert second["items"] == [{**run, "task_state": "queued"}]
    assert (
        await admin.get(f"/api/v1/schedules/{created['id']}/runs", params={"cursor": second["next_cursor"]})
    ).json()["items"] == []
    assert_problem(await admin.get(f"/api/v1/schedules/{created['id']}/runs", params={"cursor": "nonsense"}), 422)


async def test_trigger__of_a_task_this_app_does_not_know_is_422(admin: httpx.AsyncClient) -> None:
    created = await create(admin, task="not_registered")
    problem = assert_problem(await admin.post(f"/api/v1/schedules/{created['id']}/trigger"), 422)
    assert "not_registered" in problem["detail"]


async def test_delete__and_every_route_on_a_missing_schedule_is_404(admin: httpx.AsyncClient) -> None:
    created = await create(admin)
    response = await admin.delete(f"/api/v1/schedules/{created['id']}")
    assert response.status_code == 204
    path = f"/api/v1/schedules/{created['id']}"
    for method, url in [
        ("GET", path),
        ("PUT", path),
        ("DELETE", path),
        ("POST", f"{path}/pause"),
        ("POST", f"{path}/resume"),
        ("POST", f"{path}/trigger"),
        ("GET", f"{path}/runs"),
    ]:
        body = NIGHTLY if method == "PUT" else None
        problem = assert_problem(await admin.request(method, url, json=body), 404)
        assert problem["type"].endswith("schedule-not-found"), (method, url)


async def test_scopes__read_trigger_and_manage(
    admin: httpx.AsyncClient, writer: httpx.AsyncClient, reader: httpx.AsyncClient, anonymous: httpx.AsyncClient
) -> None:
    created = await create(admin)
    path = f"/api/v1/schedules/{created['id']}"
    assert (await reader.get("/api/v1/schedules")).status_code == 200
    assert (await reader.get(f"{path}/runs")).status_code == 200
    assert_problem(await reader.post(f"{path}/trigger"), 403)
    assert (await writer.post(f"{path}/trigger")).status_code == 201
    for client in (reader, writer):
        assert_problem(await client.post("/api/v1/schedules", json={**NIGHTLY, "name": "other"}), 403)
        assert_problem(await client.post(f"{path}/pause"), 403)
        assert_problem(await client.put(path, json=NIGHTLY), 403)
        assert_problem(await client.delete(path), 403)
    assert_problem(await anonymous.get("/api/v1/schedules"), 401)
