"""One error shape everywhere; the body limit; no 500 for bad input; no internals in a 500."""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
from fastapi import FastAPI

from conveyor.api.app import create_app
from conveyor.app import App
from tests.api.conftest import TEST_AUTH, Keys, assert_problem, client_for, make_keys, new_app


async def test_404_405_and_unparsable_bodies_are_problems(admin: httpx.AsyncClient) -> None:
    assert_problem(await admin.get("/api/v1/nothing"), 404)
    not_allowed = await admin.put("/api/v1/tasks")
    assert_problem(not_allowed, 405)
    assert not_allowed.headers["allow"]
    wrong_type = await admin.post("/api/v1/tasks", content=b"name=add", headers={"content-type": "text/plain"})
    assert_problem(wrong_type, 422)


async def test_body_over_the_limit__413_from_the_declared_length(api: FastAPI, keys: Keys) -> None:
    limit = 2 * 1_048_576 + 64 * 1024
    async with client_for(api, keys.writer) as client:
        response = await client.post(
            "/api/v1/tasks", content=b"{" + b" " * limit + b"}", headers={"content-type": "application/json"}
        )
    body = assert_problem(response, 413)
    assert str(limit) in body["detail"]


async def test_body_over_the_limit__413_while_streaming_without_a_length(api: FastAPI, keys: Keys) -> None:
    sent = 0

    async def chunks() -> AsyncIterator[bytes]:
        nonlocal sent
        for _ in range(100):  # 6.4 MB if all were read
            sent += 1
            yield b" " * 65536

    async with client_for(api, keys.writer) as client:
        response = await client.post("/api/v1/tasks", content=chunks(), headers={"content-type": "application/json"})

    assert_problem(response, 413)
    assert sent < 40  # refused once past the limit (2.06 MB), not after reading everything


async def test_bad_content_length__400(api: FastAPI, keys: Keys) -> None:
    async with client_for(api, keys.writer) as client:
        request = client.build_request("POST", "/api/v1/tasks", content=b"{}")
        request.headers["content-length"] = "lots"
        assert_problem(await client.send(request), 400)


async def test_unexpected_errors__500_without_internals(conveyor_app: App, keys: Keys) -> None:
    api = create_app(conveyor_app, auth=TEST_AUTH)

    async def broken() -> None:
        raise RuntimeError("secret internals: password=hunter2")

    api.add_api_route("/boom", broken)
    transport = httpx.ASGITransport(app=api, raise_app_exceptions=False)
    headers = {"Authorization": f"Bearer {keys.admin}"}
    async with httpx.AsyncClient(transport=transport, base_url="http://t", headers=headers) as client:
        response = await client.get("/boom")

    body = assert_problem(response, 500)
    assert "hunter2" not in response.text
    assert "RuntimeError" not in response.text
    assert body["detail"] == "an unexpected error occurred; it has been logged"


async def test_database_down__503_with_retry_after(database_url: str) -> None:
    from sqlalchemy.engine import make_url

    app = new_app(database_url)
    made = await make_keys(app)
    await app.aclose()
    app.close()
    # Same key table, but the server is now unreachable (port 1 refuses connections).
    dead_url = make_url(database_url).set(port=1, password="hunter2-secret").render_as_string(hide_password=False)
    unreachable = new_app(dead_url)
    try:
        api = create_app(unreachable, auth=TEST_AUTH)
        async with client_for(api, made.admin) as client:
            refused = await client.get("/api/v1/tasks")
            ready = await client.get("/health/ready")
            live = await client.get("/health/live")
        body = assert_problem(refused, 503)
        assert refused.headers["retry-after"] == "5"
        assert "hunter2" not in refused.text and "hunter2" not in ready.text
        assert "unavailable" in body["detail"]
        assert_problem(ready, 503)
        assert live.status_code == 200
    finally:
        await unreachable.aclose()
        unreachable.close()


async def test_every_error_route_answers_problem_json(admin: httpx.AsyncClient, anonymous: httpx.AsyncClient) -> None:
    responses = [
        await anonymous.get("/api/v1/queues"),
        await admin.get("/api/v1/tasks/1"),
        await admin.post("/api/v1/tasks", json={}),
        await admin.post("/api/v1/tasks", json={"name": "nope"}),
        await admin.get("/api/v1/tasks", params={"limit": "many"}),
    ]
    for response in responses:
        assert response.headers["content-type"] == "application/problem+json"
        assert set(response.json()) >= {"type", "title", "status", "detail"}
