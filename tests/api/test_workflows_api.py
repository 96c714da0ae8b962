"""``/api/v1/workflows`` against a real PostgreSQL: submit by task names, read the graph, list, cancel,
retry, and the errors that name the step at fault."""

from __future__ import annotations

from typing import Any

import httpx

from conveyor.app import App
from tests.api.conftest import assert_problem, running_worker, wait_until

WORKFLOWS = "/api/v1/workflows"

DIAMOND = {
    "name": "diamond",
    "steps": [
        {"name": "a", "task": "add", "args": [1, 2]},
        {"name": "b", "task": "add", "args": [10], "depends_on": ["a"]},
        {"name": "c", "task": "add", "args": [20], "depends_on": ["a"]},
        {"name": "d", "task": "add", "depends_on": ["b", "c"], "pass_results": False, "args": [0, 0]},
    ],
}


async def submit(client: httpx.AsyncClient, body: dict[str, Any]) -> dict[str, Any]:
    response = await client.post(WORKFLOWS, json=body)
    assert response.status_code == 201, response.text
    created: dict[str, Any] = response.json()
    return created


async def get(client: httpx.AsyncClient, workflow_id: int) -> dict[str, Any]:
    response = await client.get(f"{WORKFLOWS}/{workflow_id}")
    assert response.status_code == 200, response.text
    found: dict[str, Any] = response.json()
    return found


async def finished(client: httpx.AsyncClient, workflow_id: int) -> dict[str, Any] | None:
    found = await get(client, workflow_id)
    return found if found["state"] != "running" else None


async def test_submit__201_with_location_step_ids_and_the_graph(writer: httpx.AsyncClient) -> None:
    response = await writer.post(WORKFLOWS, json=DIAMOND)
    assert response.status_code == 201, response.text
    created = response.json()
    assert response.headers["location"].endswith(f"{WORKFLOWS}/{created['id']}")
    assert created["state"] == "running" and created["kind"] == "dag" and created["on_failure"] == "stop"
    assert sorted(created["step_ids"]) == ["a", "b", "c", "d"]
    graph = await get(writer, created["id"])
    assert [(s["name"], s["state"], s["depends_on"], s["deps_pending"]) for s in graph["steps"]] == [
        ("a", "queued", [], 0),
        ("b", "blocked", ["a"], 1),
        ("c", "blocked", ["a"], 1),
        ("d", "blocked", ["b", "c"], 2),
    ]
    assert [(e["parent"], e["child"], e["position"], e["needs_result"]) for e in graph["edges"]] == [
        ("a", "b", 0, True),
        ("a", "c", 0, True),
        ("b", "d", 0, False),
        ("c", "d", 1, False),
    ]
    assert {s["task_id"] for s in graph["steps"]} == set(created["step_ids"].values())


async def test_submitted_workflow_runs__results_and_states_in_the_graph(
    conveyor_app: App, writer: httpx.AsyncClient
) -> None:
    created = await submit(writer, DIAMOND)
    async with running_worker(conveyor_app):
        done = await wait_until("the workflow to finish", lambda: finished(writer, created["id"]))
    assert done["state"] == "succeeded" and done["steps_remaining"] == 0 and done["finished_at"]
    assert {s["name"]: s["result"] for s in done["steps"]} == {"a": 3, "b": 13, "c": 23, "d": 0}


async def test_list__newest_first_filtered_and_paginated(writer: httpx.AsyncClient, reader: httpx.AsyncClient) -> None:
    ids = [(await submit(writer, {**DIAMOND, "name": f"wf-{i % 2}"}))["id"] for i in range(5)]
    seen: list[int] = []
    cursor = None
    while True:
        params: dict[str, Any] = {"limit": 2, **({"cursor": cursor} if cursor else {})}
        page = (await reader.get(WORKFLOWS, params=params)).json()
        seen += [item["id"] for item in page["items"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seen == sorted(ids, reverse=True)
    named = (await reader.get(WORKFLOWS, params={"name": "wf-1"})).json()["items"]
    assert [item["id"] for item in named] == [ids[3], ids[1]]
    assert (await reader.get(WORKFLOWS, params={"state": "succeeded"})).json()["items"] == []
    assert_problem(await reader.get(WORKFLOWS, params={"cursor": "garbage"}), 422, "query.cursor")


async def test_cancel__200_then_409_once_finished(conveyor_app: App, writer: httpx.AsyncClient) -> None:
    created = await submit(writer, DIAMOND)
    response = await writer.post(f"{WORKFLOWS}/{created['id']}/cancel")
    assert response.status_code == 200, response.text
    assert response.json()["state"] == "cancelled" and response.json()["cancel_requested"] is True
    graph = await get(writer, created["id"])
    assert {s["state"] for s in graph["steps"]} == {"cancelled"}
    body = assert_problem(await writer.post(f"{WORKFLOWS}/{created['id']}/cancel"), 409)
    assert body["state"] == "cancelled" and body["workflow_id"] == created["id"]


async def test_retry__reruns_the_failed_step_and_its_dependents(conveyor_app: App, writer: httpx.AsyncClient) -> None:
    created = await submit(
        writer,
        {
            "on_failure": "continue",
            "steps": [
                {"name": "ok", "task": "add", "args": [1, 1]},
                {"name": "bad", "task": "fail", "depends_on": ["ok"], "pass_results": False},
                {"name": "after", "task": "add", "args": [1, 1], "depends_on": ["bad"], "pass_results": False},
            ],
        },
    )
    assert_problem(await writer.post(f"{WORKFLOWS}/{created['id']}/retry"), 409)  # still running
    async with running_worker(conveyor_app):
        done = await wait_until("the workflow to fail", lambda: finished(writer, created["id"]))
        assert done["state"] == "failed"
        assert {s["name"]: s["state"] for s in done["steps"]} == {
            "ok": "succeeded",
            "bad": "dead",
            "after": "succeeded",
        }
        assert next(s for s in done["steps"] if s["name"] == "bad")["error"]["message"] == "boom"
        response = await writer.post(f"{WORKFLOWS}/{created['id']}/retry")
        assert response.status_code == 200, response.text
        assert response.json()["state"] == "running"
        again = await wait_until("the workflow to fail again", lambda: finished(writer, created["id"]))
    steps = {s["name"]: s for s in again["steps"]}
    assert (steps["bad"]["state"], steps["bad"]["attempt"], steps["ok"]["attempt"]) == ("dead", 2, 1)


async def test_unknown_workflow__404(reader: httpx.AsyncClient, writer: httpx.AsyncClient) -> None:
    body = assert_problem(await reader.get(f"{WORKFLOWS}/999999"), 404)
    assert body["workflow_id"] == 999999
    assert_problem(await writer.post(f"{WORKFLOWS}/999999/cancel"), 404)
    assert_problem(await writer.post(f"{WORKFLOWS}/999999/retry"), 404)


async def test_bad_graphs__422_naming_the_step_and_field(writer: httpx.AsyncClient) -> None:
    def steps(*items: dict[str, Any]) -> dict[str, Any]:
        return {"steps": list(items)}

    cases = {
        "body.steps.1.depends_on": steps(
            {"name": "a", "task": "add"}, {"name": "b", "task": "add", "depends_on": ["x"]}
        ),
        "body.steps.0.depends_on": steps(
            {"name": "a", "task": "add", "depends_on": ["b"]}, {"name": "b", "task": "add", "depends_on": ["a"]}
        ),
        "body.steps.1.name": steps({"name": "a", "task": "add"}, {"name": "a", "task": "add"}),
        "body.steps.1.task": steps({"name": "a", "task": "add"}, {"name": "b", "task": "nope", "depends_on": ["a"]}),
        "body.steps.1.options": steps(
            {"name": "a", "task": "add"},
            {"name": "b", "task": "add", "depends_on": ["a"], "options": {"delay_s": 5}},
        ),
        "body.steps": {"steps": []},
        "body.on_failure": {"on_failure": "panic", "steps": [{"name": "a", "task": "add"}]},
        "body.steps.0.retries": steps({"name": "a", "task": "add", "retries": 3}),
    }
    for field, body in cases.items():
        problem = assert_problem(await writer.post(WORKFLOWS, json=body), 422, field)
        assert problem["detail"], field
    assert (await writer.get(WORKFLOWS)).json()["items"] == []  # nothing was stored


async def test_unknown_task__422_kind_unknown_task(writer: httpx.AsyncClient) -> None:
    body = assert_problem(await writer.post(WORKFLOWS, json={"steps": [{"name": "a", "task": "nope"}]}), 422)
    assert body["type"].endswith("unknown-task")


async def test_scopes__reader_reads_writer_acts(reader: httpx.AsyncClient, writer: httpx.AsyncClient) -> None:
    created = await submit(writer, DIAMOND)
    assert_problem(await reader.post(WORKFLOWS, json=DIAMOND), 403)
    assert_problem(await reader.post(f"{WORKFLOWS}/{created['id']}/cancel"), 403)
    assert_problem(await reader.post(f"{WORKFLOWS}/{created['id']}/retry"), 403)
    assert (await reader.get(f"{WORKFLOWS}/{created['id']}")).status_code == 200


async def test_anonymous__401(anonymous: httpx.AsyncClient) -> None:
    assert_problem(await anonymous.get(WORKFLOWS), 401)
