"""Probes and Prometheus metrics."""

from __future__ import annotations

import re

import httpx

from conveyor.api.app import create_app
from conveyor.app import App
from conveyor.db import migrate
from tests.api.conftest import TEST_AUTH, assert_problem, client_for, new_app


async def test_ready__ok_on_a_current_schema(anonymous: httpx.AsyncClient) -> None:
    response = await anonymous.get("/health/ready")

    assert response.json() == {
        "status": "ok",
        "database": "ok",
        "schema_revision": migrate.head_revision(),
        "scheduler": "no-leader",  # none runs here: information only, still ready
    }


async def test_ready__503_when_migrations_are_behind(empty_database_url: str) -> None:
    migrate.upgrade(empty_database_url, "0001")
    app = new_app(empty_database_url)
    try:
        async with client_for(create_app(app, auth=TEST_AUTH)) as client:
            response = await client.get("/health/ready")
            live = await client.get("/health/live")
        body = assert_problem(response, 503)
        assert "0001" in body["detail"]
        assert live.json() == {"status": "ok"}
    finally:
        await app.aclose()
        app.close()


async def test_metrics__queue_gauges_and_request_counters(
    reader: httpx.AsyncClient, conveyor_app: App, anonymous: httpx.AsyncClient
) -> None:
    await conveyor_app.enqueue_many_async([{"name": "add", "args": [i, 0]} for i in range(3)])
    await reader.get("/api/v1/tasks")
    await anonymous.get("/api/v1/tasks")

    response = await reader.get("/metrics")

    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    text = response.text
    assert 'conveyor_queue_tasks{queue="default",state="queued"} 3.0' in text
    assert 'conveyor_queue_tasks{queue="default",state="dead"} 0.0' in text
    assert 'conveyor_queue_paused{queue="default"} 0.0' in text
    assert 'conveyor_api_requests_total{method="GET",route="/api/v1/tasks",status="200"} 1.0' in text
    # Refused before routing (no key), yet counted under the route it was for.
    assert 'conveyor_api_requests_total{method="GET",route="/api/v1/tasks",status="401"} 1.0' in text
    assert 'conveyor_api_request_duration_seconds_count{method="GET",route="/api/v1/tasks"} 2.0' in text
    assert "conveyor_api_request_duration_seconds_bucket" in text


def route_labels(text: str) -> dict[str, set[str]]:
    """Each route label value of conveyor_api_requests_total, with the methods seen for it."""
    found: dict[str, set[str]] = {}
    for method, route in re.findall(r'conveyor_api_requests_total\{method="([^"]*)",route="([^"]*)"', text):
        found.setdefault(route, set()).add(method)
    return found


async def test_metrics__routes_are_labelled_by_their_path_template(
    reader: httpx.AsyncClient, anonymous: httpx.AsyncClient
) -> None:
    for task_id in (1, 2, 99_999):
        await reader.get(f"/api/v1/tasks/{task_id}")
    await anonymous.get("/api/v1/tasks/12345")
    await reader.post("/api/v1/search", json={})
    await reader.delete("/api/v1/search")  # a route, another method: 405

    labels = route_labels((await reader.get("/metrics")).text)

    assert labels["/api/v1/tasks/{task_id}"] == {"GET"}
    assert labels["/api/v1/search"] == {"POST", "DELETE"}
    assert not [route for route in labels if re.search(r"/\d", route)]  # no ids in labels


async def test_metrics__unknown_paths_and_methods_share_one_label(
    reader: httpx.AsyncClient, anonymous: httpx.AsyncClient
) -> None:
    # What a scanner does: many paths that exist nowhere, with a key and without, and odd methods.
    for i in range(60):
        client = reader if i % 2 else anonymous
        await client.get(f"/wp-admin/{i}/setup.php?x={i}")
        await client.get(f"/api/v1/nothing-{i}")
        await client.request(f"PROBE{i}", f"/api/v1/tasks/{i}")

    text = (await reader.get("/metrics")).text
    labels = route_labels(text)

    assert labels["unmatched"] == {"GET"}
    assert not [route for route in labels if "wp-admin" in route or "nothing" in route]
    assert labels["/api/v1/tasks/{task_id}"] == {"OTHER"}  # the route exists; the method does not
    assert len(labels) <= 4  # unmatched, tasks/{task_id}, and the /metrics scrape's own


async def test_metrics__needs_a_key(anonymous: httpx.AsyncClient) -> None:
    assert_problem(await anonymous.get("/metrics"), 401)
