"""Probes and Prometheus metrics."""

from __future__ import annotations

import httpx

from conveyor.api.app import create_app
from conveyor.app import App
from conveyor.db import migrate
from tests.api.conftest import TEST_AUTH, assert_problem, client_for, new_app


async def test_ready__ok_on_a_current_schema(anonymous: httpx.AsyncClient) -> None:
    response = await anonymous.get("/health/ready")

    assert response.json() == {"status": "ok", "database": "ok", "schema_revision": migrate.head_revision()}


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
    assert 'conveyor_api_requests_total{method="GET",route="list_tasks",status="200"} 1.0' in text
    assert 'conveyor_api_requests_total{method="GET",route="unmatched",status="401"} 1.0' in text
    assert 'conveyor_api_request_duration_seconds_count{method="GET",route="list_tasks"} 2.0' not in text
    assert "conveyor_api_request_duration_seconds_bucket" in text


async def test_metrics__needs_a_key(anonymous: httpx.AsyncClient) -> None:
    assert_problem(await anonymous.get("/metrics"), 401)
