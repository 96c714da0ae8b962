"""``/api/v1/tasks`` against a real PostgreSQL: enqueue, list, inspect, act."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import psycopg

from conveyor.app import App
from tests.api.conftest import assert_problem, running_worker, wait_until

TASKS = "/api/v1/tasks"


async def enqueue(client: httpx.AsyncClient, name: str = "add", **body: Any) -> int:
    response = await client.post(TASKS, json={"name": name, "args": [1, 2], **body})
    assert response.status_code == 201, response.text
    return int(response.json()["id"])


async def task(client: httpx.AsyncClient, task_id: int) -> dict[str, Any]:
    response = await client.get(f"{TASKS}/{task_id}")
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


# -- enqueue ------------------------------------------------------------------------------------------


async def test_enqueue__201_with_location_and_the_stored_task(writer: httpx.AsyncClient) -> None:
    response = await writer.post(
        TASKS,
        json={"name": "add", "args": [1, 2], "kwargs": {}, "queue": "math", "priority": 5, "max_attempts": 4},
    )

    assert response.status_code == 201
    body = response.json()
    assert body == {"id": body["id"], "created": True, "state": "queued"}
    assert response.headers["location"].endswith(f"/api/v1/tasks/{body['id']}")
    stored = await task(writer, body["id"])
    assert stored["name"] == "add"
    assert stored["args"] == [1, 2]
    assert (stored["queue"], stored["priority"], stored["max_attempts"]) == ("math", 5, 4)


async def test_enqueue__uses_the_task_definition_defaults(writer: httpx.AsyncClient) -> None:
    task_id = await enqueue(writer, "other.queue_task", args=[])

    assert (await task(writer, task_id))["queue"] == "other"


async def test_enqueue__delay_and_eta_schedule_the_task(writer: httpx.AsyncClient) -> None:
    delayed = await enqueue(writer, delay_s=3600)
    eta = (datetime.now(UTC) + timedelta(hours=2)).isoformat()
    at_eta = await enqueue(writer, eta=eta)

    assert (await task(writer, delayed))["state"] == "scheduled"
    assert (await task(writer, at_eta))["state"] == "scheduled"
    both = await writer.post(TASKS, json={"name": "add", "delay_s": 1, "eta": eta})
    assert_problem(both, 422, "body")


async def test_enqueue__idempotency_key_returns_the_same_task_with_200(writer: httpx.AsyncClient) -> None:
    headers = {"Idempotency-Key": "order-42"}
    first = await writer.post(TASKS, json={"name": "add", "args": [1, 2]}, headers=headers)
    again = await writer.post(TASKS, json={"name": "add", "args": [1, 2]}, headers=headers)

    assert first.status_code == 201
    assert again.status_code == 200
    assert again.json() == {"id": first.json()["id"], "created": False, "state": "queued"}


async def test_enqueue__idempotency_key_with_another_body_is_409(writer: httpx.AsyncClient) -> None:
    headers = {"Idempotency-Key": "order-43"}
    first = await writer.post(TASKS, json={"name": "add", "args": [1, 2]}, headers=headers)

    conflict = await writer.post(TASKS, json={"name": "add", "args": [9, 9]}, headers=headers)

    body = assert_problem(conflict, 409)
    assert body["task_id"] == first.json()["id"]


async def test_enqueue__unique_key_held_returns_the_holder(writer: httpx.AsyncClient) -> None:
    first = await writer.post(TASKS, json={"name": "add", "unique_key": "daily-report"})
    second = await writer.post(TASKS, json={"name": "add", "args": [5, 5], "unique_key": "daily-report"})

    assert second.status_code == 200
    assert second.json()["id"] == first.json()["id"]


async def test_enqueue__unknown_task_name_is_422_naming_the_field(writer: httpx.AsyncClient) -> None:
    response = await writer.post(TASKS, json={"name": "no_such_task"})

    body = assert_problem(response, 422, "body.name")
    assert "no_such_task" in body["detail"]


async def test_enqueue__invalid_fields_are_422_each_named(writer: httpx.AsyncClient) -> None:
    response = await writer.post(
        TASKS,
        json={"name": "add", "priority": 40000, "queue": "no spaces", "max_attempts": 0, "surprise": 1},
    )

    body = assert_problem(response, 422)
    fields = {e["field"] for e in body["errors"]}
    assert {"body.priority", "body.queue", "body.max_attempts", "body.surprise"} <= fields
    assert "40000" not in body["detail"]  # the input is not echoed back


async def test_enqueue__unstorable_json_is_422_not_500(writer: httpx.AsyncClient) -> None:
    json_type = {"content-type": "application/json"}
    nan = await writer.post(TASKS, content=b'{"name": "add", "args": [NaN]}', headers=json_type)
    nul = await writer.post(TASKS, json={"name": "add", "args": ["a\u0000b"]})
    deep: Any = []
    for _ in range(100):
        deep = [deep]
    nested = await writer.post(TASKS, json={"name": "add", "args": deep})
    broken = await writer.post(TASKS, content=b'{"name": "add", ', headers=json_type)

    for response in (nan, nul, nested, broken):
        assert_problem(response, 422)


async def test_enqueue__payload_over_the_limit_is_413(database_url: str, keys: Any) -> None:
    from conveyor.api.app import create_app
    from tests.api.conftest import TEST_AUTH, client_for, make_keys, new_app

    app = new_app(database_url, payload_limit_bytes=1000)
    try:
        made = await make_keys(app)
        async with client_for(create_app(app, auth=TEST_AUTH), made.writer) as client:
            response = await client.post(TASKS, json={"name": "add", "args": ["x" * 1500]})
            batch = await client.post(
                f"{TASKS}/batch", json={"tasks": [{"name": "add"}, {"name": "add", "args": ["y" * 1500]}]}
            )
            huge = await client.post(TASKS, json={"name": "add", "args": ["z" * 200_000]})
        assert_problem(response, 413, "body")
        assert_problem(batch, 413, "body.tasks.1")
        assert_problem(huge, 413)  # refused by the body limit before the JSON was parsed
    finally:
        await app.aclose()
        app.close()


# -- batch --------------------------------------------------------------------------------------------


async def test_batch__enqueues_all_in_order(writer: httpx.AsyncClient) -> None:
    items = [{"name": "add", "args": [i, i]} for i in range(5)] + [{"name": "add", "idempotency_key": "k1"}]

    response = await writer.post(f"{TASKS}/batch", json={"tasks": items})

    assert response.status_code == 200, response.text
    results = response.json()["tasks"]
    assert len(results) == 6
    assert [(await task(writer, r["id"]))["args"] for r in results[:5]] == [[i, i] for i in range(5)]


async def test_batch__one_bad_item_stores_nothing_and_names_it(writer: httpx.AsyncClient, database_url: str) -> None:
    items = [{"name": "add"}, {"name": "add"}, {"name": "unknown_task"}]

    response = await writer.post(f"{TASKS}/batch", json={"tasks": items})

    assert_problem(response, 422, "body.tasks.2.name")
    with psycopg.connect(database_url) as conn:
        assert conn.execute("SELECT count(*) FROM conveyor_tasks").fetchone() == (0,)


async def test_batch__size_is_bounded(writer: httpx.AsyncClient) -> None:
    assert_problem(await writer.post(f"{TASKS}/batch", json={"tasks": []}), 422, "body.tasks")
    too_many = [{"name": "add"}] * 1001
    assert_problem(await writer.post(f"{TASKS}/batch", json={"tasks": too_many}), 422, "body.tasks")


# -- list ---------------------------------------------------------------------------------------------


async def seed(conveyor_app: App, count: int, **options: Any) -> list[int]:
    handles = await conveyor_app.enqueue_many_async([{"name": "add", "args": [i, 0], **options} for i in range(count)])
    return [h.id for h in handles]


async def test_list__newest_first_by_default(reader: httpx.AsyncClient, conveyor_app: App) -> None:
    ids = await seed(conveyor_app, 3)

    body = (await reader.get(TASKS)).json()

    assert [item["id"] for item in body["items"]] == sorted(ids, reverse=True)
    assert body["next_cursor"] is None
    assert set(body["items"][0]) >= {"id", "name", "queue", "state", "attempt", "created_at", "error_type"}
    assert "args" not in body["items"][0]  # lists leave payloads out


async def test_list__cursor_pages_cover_every_task_once(reader: httpx.AsyncClient, conveyor_app: App) -> None:
    ids = await seed(conveyor_app, 23)
    seen: list[int] = []
    cursor = None
    pages = 0
    while True:
        params: dict[str, Any] = {"limit": 5, **({"cursor": cursor} if cursor else {})}
        body = (await reader.get(TASKS, params=params)).json()
        seen.extend(item["id"] for item in body["items"])
        pages += 1
        cursor = body["next_cursor"]
        if cursor is None:
            break

    assert pages == 5
    assert seen == sorted(ids, reverse=True)


async def test_list__filters_combine(reader: httpx.AsyncClient, conveyor_app: App, writer: httpx.AsyncClient) -> None:
    math = await seed(conveyor_app, 3, queue="math")
    other = await seed(conveyor_app, 2)
    await writer.post(f"{TASKS}/{math[0]}/cancel")

    async def ids(**params: Any) -> list[int]:
        response = await reader.get(TASKS, params=params)
        assert response.status_code == 200, response.text
        return sorted(item["id"] for item in response.json()["items"])

    assert await ids(queue="math") == math
    assert await ids(queue=["math", "default"]) == sorted(math + other)
    assert await ids(state="cancelled") == [math[0]]
    assert await ids(state="queued", queue="math") == math[1:]
    assert await ids(name="add", state=["queued", "cancelled"]) == sorted(math + other)
    assert await ids(name="fail") == []
    assert await ids(created_after=(datetime.now(UTC) + timedelta(hours=1)).isoformat()) == []
    assert await ids(created_before=(datetime.now(UTC) + timedelta(hours=1)).isoformat()) == sorted(math + other)


async def test_list__sorts_by_run_at_and_finished_at(reader: httpx.AsyncClient, conveyor_app: App) -> None:
    later = (await conveyor_app.enqueue_async("add", [1, 1], delay=7200)).id
    sooner = (await conveyor_app.enqueue_async("add", [1, 1], delay=3600)).id
    now = (await conveyor_app.enqueue_async("add", [1, 1])).id
    await conveyor_app.handle(now).cancel_async()

    by_run_at = (await reader.get(TASKS, params={"state": ["scheduled", "queued"], "sort": "run_at"})).json()
    finished = (await reader.get(TASKS, params={"sort": "-finished_at"})).json()

    assert [item["id"] for item in by_run_at["items"]] == [sooner, later]
    assert [item["id"] for item in finished["items"]] == [now]


async def test_list__run_at_sort_needs_waiting_states(reader: httpx.AsyncClient) -> None:
    assert_problem(await reader.get(TASKS, params={"sort": "run_at"}), 422, "query.sort")
    assert_problem(await reader.get(TASKS, params={"sort": "run_at", "state": "dead"}), 422, "query.sort")


async def test_list__bad_parameters_are_422(reader: httpx.AsyncClient, conveyor_app: App) -> None:
    await seed(conveyor_app, 3)
    cursor = (await reader.get(TASKS, params={"limit": 1})).json()["next_cursor"]

    assert_problem(await reader.get(TASKS, params={"limit": 201}), 422, "query.limit")
    assert_problem(await reader.get(TASKS, params={"limit": 0}), 422, "query.limit")
    assert_problem(await reader.get(TASKS, params={"state": "sleeping"}), 422, "query.state.0")
    assert_problem(await reader.get(TASKS, params={"sort": "name; DROP TABLE x"}), 422, "query.sort")
    assert_problem(await reader.get(TASKS, params={"cursor": "not-a-cursor"}), 422, "query.cursor")
    assert_problem(await reader.get(TASKS, params={"cursor": cursor, "sort": "id"}), 422, "query.cursor")
    assert_problem(await reader.get(TASKS, params={"created_after": "yesterday"}), 422, "query.created_after")


async def test_list__filter_text_is_never_sql(reader: httpx.AsyncClient, conveyor_app: App, database_url: str) -> None:
    await seed(conveyor_app, 2)
    hostile = "x' OR '1'='1"

    response = await reader.get(TASKS, params={"name": hostile})

    assert_problem(response, 422, "query.name.0")  # not a task name
    quoted = await reader.get(TASKS, params={"queue": "a:b.c-d_e"})
    assert quoted.json()["items"] == []


# -- one task -----------------------------------------------------------------------------------------


async def test_get__404_and_out_of_range_ids(reader: httpx.AsyncClient) -> None:
    body = assert_problem(await reader.get(f"{TASKS}/999"), 404)
    assert body["task_id"] == 999
    assert_problem(await reader.get(f"{TASKS}/0"), 422, "path.task_id")
    assert_problem(await reader.get(f"{TASKS}/{2**63}"), 422, "path.task_id")
    assert_problem(await reader.get(f"{TASKS}/abc"), 422, "path.task_id")


async def test_result__waits_for_the_worker(writer: httpx.AsyncClient, conveyor_app: App) -> None:
    task_id = await enqueue(writer)

    async with running_worker(conveyor_app):
        response = await writer.get(f"{TASKS}/{task_id}/result", params={"wait": 10})

    assert response.json() == {"id": task_id, "state": "succeeded", "ready": True, "result": 3, "error": None}


async def test_result__not_ready_after_the_wait(reader: httpx.AsyncClient, conveyor_app: App) -> None:
    [task_id] = await seed(conveyor_app, 1)

    started = asyncio.get_running_loop().time()
    response = await reader.get(f"{TASKS}/{task_id}/result", params={"wait": 0.3})

    assert asyncio.get_running_loop().time() - started >= 0.3
    assert response.json() == {"id": task_id, "state": "queued", "ready": False, "result": None, "error": None}
    assert_problem(await reader.get(f"{TASKS}/{task_id}/result", params={"wait": 31}), 422, "query.wait")


async def test_events_and_attempts__tell_the_story(writer: httpx.AsyncClient, conveyor_app: App) -> None:
    task_id = await enqueue(writer, "fail", args=["bad input"])

    async with running_worker(conveyor_app, burst=True) as worker:
        await wait_until("the task to fail", lambda: _state_is(writer, task_id, "dead"))
        assert worker

    events = (await writer.get(f"{TASKS}/{task_id}/events")).json()["items"]
    attempts = (await writer.get(f"{TASKS}/{task_id}/attempts")).json()["items"]
    result = (await writer.get(f"{TASKS}/{task_id}/result")).json()

    assert [e["kind"] for e in events] == ["enqueued", "claimed", "failed"]
    assert len(attempts) == 1
    assert attempts[0]["number"] == 1
    assert attempts[0]["outcome"] == "failed"
    assert attempts[0]["error"]["message"] == "bad input"
    assert attempts[0]["next_state"] == "dead"
    assert result["ready"] is True
    assert result["error"]["type"].endswith("RuntimeError")
    assert_problem(await writer.get(f"{TASKS}/12345/events"), 404)
    assert_problem(await writer.get(f"{TASKS}/12345/attempts"), 404)


async def _state_is(client: httpx.AsyncClient, task_id: int, state: str) -> bool:
    return (await task(client, task_id))["state"] == state


# -- cancel, retry ------------------------------------------------------------------------------------


async def test_cancel__a_waiting_task(writer: httpx.AsyncClient) -> None:
    task_id = await enqueue(writer)

    response = await writer.post(f"{TASKS}/{task_id}/cancel")

    assert response.status_code == 200
    assert response.json()["state"] == "cancelled"


async def test_cancel__a_finished_task_is_409_and_changes_nothing(writer: httpx.AsyncClient, database_url: str) -> None:
    task_id = await enqueue(writer)
    with psycopg.connect(database_url, autocommit=True) as conn:  # as a worker would have left it
        conn.execute(
            "UPDATE conveyor_tasks SET state = 'succeeded', attempt = 1, result = '3', finished_at = now() "
            "WHERE id = %s",
            (task_id,),
        )
    before = await task(writer, task_id)

    response = await writer.post(f"{TASKS}/{task_id}/cancel")

    body = assert_problem(response, 409)
    assert body["state"] == "succeeded"
    assert await task(writer, task_id) == before


async def test_cancel__a_running_task_asks_its_worker(writer: httpx.AsyncClient, conveyor_app: App) -> None:
    task_id = await enqueue(writer, "slow", args=[30])
    async with running_worker(conveyor_app):
        await wait_until("the task to run", lambda: _state_is(writer, task_id, "running"))

        response = await writer.post(f"{TASKS}/{task_id}/cancel")

        assert response.json()["state"] == "running"
        assert response.json()["cancel_requested"] is True
        await wait_until("the worker to stop it", lambda: _state_is(writer, task_id, "cancelled"))


async def test_retry__a_cancelled_task_and_not_a_queued_one(writer: httpx.AsyncClient) -> None:
    task_id = await enqueue(writer)
    assert_problem(await writer.post(f"{TASKS}/{task_id}/retry"), 409)
    await writer.post(f"{TASKS}/{task_id}/cancel")

    response = await writer.post(f"{TASKS}/{task_id}/retry")

    assert response.status_code == 200
    assert response.json()["state"] == "queued"


# -- patch, delete ------------------------------------------------------------------------------------


async def test_patch__priority_and_run_time_of_a_waiting_task(writer: httpx.AsyncClient) -> None:
    task_id = await enqueue(writer)

    later = await writer.patch(f"{TASKS}/{task_id}", json={"priority": 7, "delay_s": 3600})
    now = await writer.patch(f"{TASKS}/{task_id}", json={"run_at": datetime.now(UTC).isoformat()})

    assert later.status_code == 200, later.text
    assert (later.json()["priority"], later.json()["state"]) == (7, "scheduled")
    assert (now.json()["priority"], now.json()["state"]) == (7, "queued")
    events = (await writer.get(f"{TASKS}/{task_id}/events")).json()["items"]
    assert [e["kind"] for e in events] == ["enqueued", "updated", "updated"]


async def test_patch__refuses_what_cannot_be_changed(writer: httpx.AsyncClient) -> None:
    task_id = await enqueue(writer)
    assert_problem(await writer.patch(f"{TASKS}/{task_id}", json={}), 422, "body")
    assert_problem(await writer.patch(f"{TASKS}/{task_id}", json={"run_at": "2030-01-01T00:00:00"}), 422)
    assert_problem(await writer.patch(f"{TASKS}/{task_id}", json={"state": "queued"}), 422, "body.state")
    assert_problem(await writer.patch(f"{TASKS}/999", json={"priority": 1}), 404)
    await writer.post(f"{TASKS}/{task_id}/cancel")

    body = assert_problem(await writer.patch(f"{TASKS}/{task_id}", json={"priority": 1}), 409)

    assert body["state"] == "cancelled"
    assert (await task(writer, task_id))["priority"] == 0


async def test_patch_and_delete__refuse_a_running_task(writer: httpx.AsyncClient, conveyor_app: App) -> None:
    task_id = await enqueue(writer, "slow", args=[30])
    async with running_worker(conveyor_app):
        await wait_until("the task to run", lambda: _state_is(writer, task_id, "running"))

        assert_problem(await writer.patch(f"{TASKS}/{task_id}", json={"priority": 3}), 409)
        assert_problem(await writer.delete(f"{TASKS}/{task_id}"), 409)
        assert (await task(writer, task_id))["state"] == "running"
        await writer.post(f"{TASKS}/{task_id}/cancel")


async def test_delete__removes_the_task_and_its_history(writer: httpx.AsyncClient, database_url: str) -> None:
    task_id = await enqueue(writer)
    await writer.post(f"{TASKS}/{task_id}/cancel")

    response = await writer.delete(f"{TASKS}/{task_id}")

    assert response.status_code == 204
    assert response.content == b""
    assert_problem(await writer.get(f"{TASKS}/{task_id}"), 404)
    assert_problem(await writer.delete(f"{TASKS}/{task_id}"), 404)
    with psycopg.connect(database_url) as conn:
        events = conn.execute("SELECT count(*) FROM conveyor_task_events WHERE task_id = %s", (task_id,))
        assert events.fetchone() == (0,)


# -- bulk ---------------------------------------------------------------------------------------------


async def test_bulk_cancel__by_ids(writer: httpx.AsyncClient, conveyor_app: App) -> None:
    ids = await seed(conveyor_app, 3)
    await writer.post(f"{TASKS}/{ids[0]}/cancel")

    response = await writer.post(f"{TASKS}/bulk/cancel", json={"ids": [*ids, 999_999]})

    assert response.json() == {"matched": 4, "cancelled": 2, "cancel_requested": 0, "more": False}
    states = {(await task(writer, i))["state"] for i in ids}
    assert states == {"cancelled"}


async def test_bulk_cancel__by_filter_in_batches_with_a_limit(writer: httpx.AsyncClient, conveyor_app: App) -> None:
    await seed(conveyor_app, 2500, queue="bulk")
    untouched = await seed(conveyor_app, 3)

    first = await writer.post(f"{TASKS}/bulk/cancel", json={"filter": {"queue": ["bulk"]}, "limit": 2200})
    rest = await writer.post(f"{TASKS}/bulk/cancel", json={"filter": {"queue": ["bulk"]}})

    assert first.json() == {"matched": 2200, "cancelled": 2200, "cancel_requested": 0, "more": True}
    assert rest.json() == {"matched": 300, "cancelled": 300, "cancel_requested": 0, "more": False}
    assert {(await task(writer, i))["state"] for i in untouched} == {"queued"}


async def test_bulk_retry__dead_by_default_and_skips_held_unique_keys(
    writer: httpx.AsyncClient, conveyor_app: App
) -> None:
    plain = await seed(conveyor_app, 2)
    keyed = (await conveyor_app.enqueue_async("add", [0, 0], unique_key="only-one")).id
    for task_id in (*plain, keyed):
        await writer.post(f"{TASKS}/{task_id}/cancel")
    holder = (await conveyor_app.enqueue_async("add", [1, 1], unique_key="only-one")).id

    dead_only = await writer.post(f"{TASKS}/bulk/retry", json={"filter": {"name": ["add"]}})
    cancelled = await writer.post(f"{TASKS}/bulk/retry", json={"filter": {"state": ["cancelled"]}})

    assert dead_only.json() == {"matched": 0, "retried": 0, "more": False}
    assert cancelled.json() == {"matched": 3, "retried": 2, "more": False}
    assert [(await task(writer, i))["state"] for i in plain] == ["queued", "queued"]
    assert (await task(writer, keyed))["state"] == "cancelled"
    assert (await task(writer, holder))["state"] == "queued"


async def test_bulk__needs_exactly_one_selection(writer: httpx.AsyncClient) -> None:
    for body in ({}, {"ids": [1], "filter": {"state": ["queued"]}}, {"filter": {}}, {"ids": []}):
        assert_problem(await writer.post(f"{TASKS}/bulk/cancel", json=body), 422)
    assert_problem(await writer.post(f"{TASKS}/bulk/retry", json={"ids": [0]}), 422, "body.ids.0")
