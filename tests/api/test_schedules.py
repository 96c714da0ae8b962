"""``/api/v1/schedules``: managing periodic tasks at run time, with the scopes each action needs."""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime
from typing import Any

import httpx
import psycopg
from sqlalchemy import text

from conveyor.app import App
from conveyor.core.schedule import ScheduleDefinition, Timing, run_key
from conveyor.db.schedule_store import ScheduleStore
from conveyor.scheduler import Scheduler
from tests.api.conftest import assert_problem, new_app, wait_until

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


# -- the scheduler's health (GET /api/v1/scheduler) ---------------------------------------------------


def sql(url: str, statement: str, *params: object) -> list[tuple[Any, ...]]:
    with psycopg.connect(url, autocommit=True) as conn:
        cursor = conn.execute(statement, params)
        return cursor.fetchall() if cursor.description else []


async def test_scheduler__no_leader_without_a_scheduler_and_readiness_stays_green(
    reader: httpx.AsyncClient, anonymous: httpx.AsyncClient
) -> None:
    response = await reader.get("/api/v1/scheduler")
    assert response.status_code == 200, response.text
    body = response.json()
    assert (body["status"], body["leader"], body["processes"]) == ("no-leader", None, [])
    assert body["problems"] == ["no scheduler has ever held the leader lease"]
    ready = await anonymous.get("/health/ready")
    assert ready.status_code == 200 and ready.json()["scheduler"] == "no-leader"  # an API-only deployment is ready
    assert_problem(await anonymous.get("/api/v1/scheduler"), 401)


async def test_scheduler__a_skewed_scheduler_elsewhere_shows_its_warning_and_leaves_when_stopped(
    reader: httpx.AsyncClient, anonymous: httpx.AsyncClient, database_url: str
) -> None:
    # The scheduler runs on an App of its own, as `conveyor scheduler` does in another process: whatever
    # the API shows, it read in the database.
    elsewhere = new_app(database_url)
    scheduler = Scheduler(elsewhere, sync=False, wall_clock=lambda: time.time() + 30)
    runner = asyncio.create_task(scheduler.run())
    try:

        async def reported_leading() -> dict[str, Any] | None:
            body: dict[str, Any] = (await reader.get("/api/v1/scheduler")).json()
            return body if body["processes"] and body["processes"][0]["leading"] else None

        body = await wait_until("the scheduler to report itself as the leader", reported_leading)
        assert body["status"] == "degraded"
        assert body["leader"]["holder"] == scheduler.holder and body["leader"]["fencing_token"] == 1
        assert not body["leader"]["expired"]
        [process] = body["processes"]
        assert (process["id"], process["pid"], process["fencing_token"], process["stale"]) == (
            scheduler.holder,
            scheduler.pid,
            1,
            False,
        )
        assert -31 < process["clock_skew_s"] < -29
        assert process["warning"].startswith(f"clock skew: the clock of host {scheduler.host} is +")
        assert body["problems"] == [f"scheduler {scheduler.holder}: {process['warning']}"]
        assert (await anonymous.get("/health/ready")).json()["scheduler"] == "degraded"
    finally:
        scheduler.request_stop()
        await asyncio.wait_for(runner, 20)
        await elsewhere.aclose()
        elsewhere.close()
    after = (await reader.get("/api/v1/scheduler")).json()
    assert after["processes"] == [] and after["status"] == "no-leader"
    assert after["leader"]["holder"] == scheduler.holder and after["leader"]["expired"]  # released on stop
    assert sql(database_url, "SELECT count(*) FROM conveyor_scheduler_processes") == [(0,)]


async def test_scheduler__one_that_went_silent_is_stale(
    reader: httpx.AsyncClient, conveyor_app: App, database_url: str
) -> None:
    leader, silent = Scheduler(conveyor_app, sync=False), Scheduler(conveyor_app, sync=False)
    for process in (leader, silent):
        await process.renew_once()
        assert await process.report_presence()
    assert (await reader.get("/api/v1/scheduler")).json()["status"] == "ok"
    # It stopped reporting without stopping (SIGKILL, a lost host): time travel past two of its leases.
    sql(
        database_url,
        "UPDATE conveyor_scheduler_processes SET last_seen_at = now() - interval '25 seconds' WHERE id = %s",
        silent.holder,
    )
    body = (await reader.get("/api/v1/scheduler")).json()
    assert body["status"] == "degraded" and body["leader"]["holder"] == leader.holder
    by_id = {p["id"]: p for p in body["processes"]}
    assert [p["id"] for p in body["processes"]] == [leader.holder, silent.holder]  # most recently seen first
    assert by_id[silent.holder]["stale"] and 25 <= by_id[silent.holder]["seen_age_s"] < 60
    assert not by_id[leader.holder]["stale"] and by_id[leader.holder]["leading"]
    assert not by_id[silent.holder]["leading"] and by_id[silent.holder]["fencing_token"] is None
    assert len(body["problems"]) == 1 and silent.holder in body["problems"][0]


async def test_admin_prune__deletes_old_schedule_runs_on_request_keeping_each_schedules_newest(
    admin: httpx.AsyncClient, conveyor_app: App, database_url: str
) -> None:
    created = await create(admin)
    sql(
        database_url,
        "INSERT INTO conveyor_schedule_runs (schedule_id, fire_at) "
        "SELECT %s, date_trunc('second', now()) - interval '2 days' - make_interval(secs => i) "
        "FROM generate_series(1, 150) AS i "
        "UNION ALL SELECT %s, date_trunc('second', now()) - make_interval(secs => 600 + i) "
        "FROM generate_series(1, 5) AS i",
        created["id"],
        created["id"],
    )
    newest = sql(
        database_url,
        "SELECT fire_at FROM conveyor_schedule_runs WHERE schedule_id = %s ORDER BY fire_at DESC LIMIT 100",
        created["id"],
    )
    tasks_only = (await admin.post("/api/v1/admin/prune", json={"older_than_s": 86_400})).json()
    assert tasks_only["schedule_runs_deleted"] == 0
    assert sql(database_url, "SELECT count(*) FROM conveyor_schedule_runs") == [(155,)]

    body = {"older_than_s": 86_400, "schedule_runs": True, "batch_size": 100}
    pruned = (await admin.post("/api/v1/admin/prune", json=body)).json()
    assert conveyor_app.settings.scheduler.run_keep_newest == 100
    assert (pruned["schedule_runs_deleted"], pruned["more"]) == (55, False)
    left = sql(
        database_url,
        "SELECT fire_at FROM conveyor_schedule_runs WHERE schedule_id = %s ORDER BY fire_at DESC",
        created["id"],
    )
    assert left == newest
