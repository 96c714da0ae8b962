"""Authentication and authorisation: default deny over every route, scopes, revocation, rate limiting."""

from __future__ import annotations

import asyncio
import re
import uuid
from typing import Any

import httpx
import psycopg
import pytest
from fastapi import APIRouter, FastAPI
from fastapi.routing import APIRoute
from starlette.responses import PlainTextResponse
from starlette.routing import BaseRoute, Mount, Route

from conveyor.api.app import create_app
from conveyor.api.auth import AuthConfig, Scope, grants, hash_key, new_key
from conveyor.api.deps import PUBLIC_PATHS, required_scope
from conveyor.app import App
from tests.api.conftest import Keys, assert_problem, client_for

_WEAKER = {Scope.TASKS_WRITE: Scope.TASKS_READ, Scope.ADMIN: Scope.TASKS_WRITE}


def concrete(path: str) -> str:
    """A route template with its parameters filled with values of the right type."""
    # key_id: one that does not exist, or walking DELETE /admin/api-keys/{key_id} would revoke our own key.
    values = {"task_id": "1", "key_id": "999999", "worker_id": str(uuid.UUID(int=1)), "name": "default"}
    return re.sub(r"\{(\w+)(?::\w+)?\}", lambda m: values.get(m.group(1), "x"), path)


def effective_routes(api: FastAPI) -> list[tuple[str, set[str] | None, BaseRoute]]:
    """(full path, methods, route) of every route of the app, documented or not, through included routers."""
    try:
        from fastapi.routing import iter_route_contexts  # FastAPI versions that keep included routers nested
    except ImportError:
        return [(getattr(r, "path", ""), getattr(r, "methods", None), r) for r in api.routes]
    return [(c.path or "", c.methods, c.original_route) for c in iter_route_contexts(api.routes)]


def requests_for(api: FastAPI) -> list[tuple[str, str, BaseRoute]]:
    """(method, concrete path, route) for every route of the app."""
    found = []
    for path, methods, route in effective_routes(api):
        assert path, route
        for method in sorted((methods or {"GET"}) - {"HEAD"}):
            found.append((method, concrete(path), route))
    return found


async def call(
    client: httpx.AsyncClient, method: str, path: str, headers: dict[str, str] | None = None
) -> httpx.Response:
    return await client.request(method, path, headers=headers)


async def test_matrix__every_route_refuses_missing_malformed_revoked_and_weak_keys(
    api: FastAPI, keys: Keys, database_url: str
) -> None:
    key_for = {Scope.TASKS_READ: keys.reader, Scope.TASKS_WRITE: keys.writer, Scope.ADMIN: keys.admin}
    routes = requests_for(api)
    assert len(routes) >= 40  # tasks, queues, workers, keys, health, metrics, docs
    checked_weak = 0
    async with client_for(api) as client:
        for method, path, route in routes:
            if path in PUBLIC_PATHS:
                assert (await call(client, method, path)).status_code == 200, path
                continue
            anonymous = await call(client, method, path)
            assert_problem(anonymous, 401)
            assert anonymous.headers["www-authenticate"].startswith("Bearer")
            for header in ("Bearer", "Basic dXNlcjpwYXNz", "Bearer cvk_short", f"Token {keys.admin}", keys.admin):
                assert_problem(await call(client, method, path, {"Authorization": header}), 401)
            assert_problem(await call(client, method, path, {"Authorization": f"Bearer {keys.revoked}"}), 401)
            weaker = _WEAKER.get(required_scope(route))
            if weaker is not None:
                response = await call(client, method, path, {"Authorization": f"Bearer {key_for[weaker]}"})
                assert_problem(response, 403)
                checked_weak += 1
        assert checked_weak >= 25
        # Every refusal happened before any route ran: nothing changed.
        with psycopg.connect(database_url) as conn:
            assert conn.execute("SELECT count(*) FROM conveyor_queues").fetchone() == (0,)
            assert conn.execute("SELECT count(*) FROM conveyor_api_keys").fetchone() == (4,)
        # And the right key gets through.
        for method, path, route in routes:
            if path not in PUBLIC_PATHS:
                key = key_for[required_scope(route)]
                try:
                    # Refusals are immediate; a stream (server-sent events) that is still going after a
                    # moment has let us in (the in-process transport waits for a response to end).
                    async with asyncio.timeout(3):
                        allowed = await call(client, method, path, {"Authorization": f"Bearer {key}"})
                except TimeoutError:
                    continue
                assert allowed.status_code not in (401, 403), (method, path, allowed.text)


def test_scopes__declared_on_every_route_as_intended(api: FastAPI) -> None:
    scopes = {
        (method, path): required_scope(route)
        for path, methods, route in effective_routes(api)
        if isinstance(route, APIRoute)
        for method in methods or ()
    }
    assert scopes[("GET", "/api/v1/tasks")] == Scope.TASKS_READ
    assert scopes[("POST", "/api/v1/tasks")] == Scope.TASKS_WRITE
    assert scopes[("DELETE", "/api/v1/tasks/{task_id}")] == Scope.TASKS_WRITE
    assert scopes[("GET", "/api/v1/queues")] == Scope.TASKS_READ
    assert scopes[("POST", "/api/v1/queues/{name}/pause")] == Scope.ADMIN
    assert scopes[("PUT", "/api/v1/queues/{name}/limits")] == Scope.ADMIN
    assert scopes[("GET", "/api/v1/workers/{worker_id}")] == Scope.TASKS_READ
    assert scopes[("POST", "/api/v1/workers/{worker_id}/drain")] == Scope.ADMIN
    assert scopes[("GET", "/api/v1/admin/api-keys")] == Scope.ADMIN
    assert scopes[("GET", "/metrics")] == Scope.TASKS_READ
    assert scopes[("GET", "/api/v1/scheduler")] == Scope.TASKS_READ


def test_scopes__admin_implies_all_and_write_implies_read() -> None:
    assert grants(["admin"], Scope.TASKS_READ) and grants(["admin"], Scope.TASKS_WRITE)
    assert grants(["tasks:write"], Scope.TASKS_READ)
    assert not grants(["tasks:write"], Scope.ADMIN)
    assert not grants(["tasks:read"], Scope.TASKS_WRITE)
    assert not grants(["unheard-of"], Scope.TASKS_READ)


async def test_default_deny__routes_added_later_need_a_key_and_admin(api: FastAPI, keys: Keys) -> None:
    async def secret() -> dict[str, str]:
        return {"secret": "yes"}

    async def plain(request: Any) -> PlainTextResponse:
        return PlainTextResponse("plain")

    api.add_api_route("/undeclared", secret, include_in_schema=False)
    later = APIRouter(prefix="/later")
    later.add_api_route("/also-undeclared", secret)
    api.include_router(later, prefix="/api/v1")
    api.router.routes.append(Route("/starlette-route", plain))
    api.router.routes.append(Mount("/mounted", app=PlainTextResponse("mounted")))

    async with (
        client_for(api) as anonymous,
        client_for(api, keys.writer) as writer,
        client_for(api, keys.admin) as admin,
    ):
        for path in ("/undeclared", "/starlette-route", "/mounted/x", "/nowhere", "/api/v1/nothing-here"):
            assert_problem(await anonymous.get(path), 401)
        for path in ("/undeclared", "/api/v1/later/also-undeclared"):
            assert_problem(await anonymous.get(path), 401)
            assert_problem(await writer.get(path), 403)  # declared no scope: admin only
            assert (await admin.get(path)).json() == {"secret": "yes"}
        assert_problem(await admin.get("/nowhere"), 404)  # with a key, the truth


async def test_public_paths__answer_without_a_key(anonymous: httpx.AsyncClient) -> None:
    assert (await anonymous.get("/health/live")).json() == {"status": "ok"}
    assert (await anonymous.get("/health/ready")).status_code == 200
    assert (await anonymous.get("/openapi.json")).status_code == 200
    assert "swagger" in (await anonymous.get("/docs")).text.lower()
    assert_problem(await anonymous.get("/redoc"), 401)
    assert_problem(await anonymous.get("/health/live/../../metrics"), 401)


async def test_revocation__at_once_here_and_within_the_cache_ttl_elsewhere(
    api: FastAPI, conveyor_app: App, admin: httpx.AsyncClient
) -> None:
    made = (await admin.post("/api/v1/admin/api-keys", json={"name": "ci", "scopes": ["tasks:read"]})).json()
    elsewhere = create_app(conveyor_app, auth=AuthConfig(cache_ttl_s=0.5))  # as another server process
    async with client_for(api, made["key"]) as here, client_for(elsewhere, made["key"]) as other:
        assert (await here.get("/api/v1/tasks")).status_code == 200
        assert (await other.get("/api/v1/tasks")).status_code == 200  # now cached there

        assert (await admin.delete(f"/api/v1/admin/api-keys/{made['id']}")).status_code == 204

        assert_problem(await here.get("/api/v1/tasks"), 401)  # the revoking process: at once
        await asyncio.sleep(0.6)
        assert_problem(await other.get("/api/v1/tasks"), 401)  # any other: once its cache entry expires


async def test_rate_limit__repeated_bad_keys_get_429_with_retry_after(conveyor_app: App, keys: Keys) -> None:
    api = create_app(conveyor_app, auth=AuthConfig(max_failures=3, failure_window_s=60))
    bad = new_key().key
    async with client_for(api, bad) as attacker, client_for(api, keys.admin) as same_client, client_for(api) as anon:
        for _ in range(3):
            assert_problem(await attacker.get("/api/v1/tasks"), 401)
        blocked = await attacker.get("/api/v1/tasks")

        body = assert_problem(blocked, 429)
        assert 1 <= int(blocked.headers["retry-after"]) <= 60
        assert "too many" in body["detail"]
        assert_problem(await same_client.get("/api/v1/tasks"), 429)  # the client is blocked, whatever its key
        assert (await anon.get("/health/live")).status_code == 200  # probes still answer
    other_client = httpx.AsyncClient(
        transport=httpx.ASGITransport(app=api, client=("10.1.2.3", 5000)),
        base_url="http://testserver",
        headers={"Authorization": f"Bearer {keys.admin}"},
    )
    async with other_client:
        assert (await other_client.get("/api/v1/tasks")).status_code == 200


async def test_rate_limit__missing_keys_are_not_counted(conveyor_app: App) -> None:
    api = create_app(conveyor_app, auth=AuthConfig(max_failures=2))
    async with client_for(api) as anonymous:
        for _ in range(5):
            assert_problem(await anonymous.get("/api/v1/tasks"), 401)


# -- key management -----------------------------------------------------------------------------------


async def test_keys__made_listed_and_revoked_through_the_api(admin: httpx.AsyncClient, database_url: str) -> None:
    created = await admin.post("/api/v1/admin/api-keys", json={"name": "reporting", "scopes": ["tasks:read"]})

    assert created.status_code == 201
    made = created.json()
    assert re.fullmatch(r"cvk_[A-Za-z0-9_-]{43}", made["key"])
    assert made["prefix"] == made["key"][:12]
    assert (made["name"], made["scopes"], made["active"]) == ("reporting", ["tasks:read"], True)
    listed = (await admin.get("/api/v1/admin/api-keys")).json()["items"]
    assert [k["name"] for k in listed] == ["admin", "writer", "reader", "revoked", "reporting"]
    assert all("key" not in k and "key_hash" not in k for k in listed)
    # Stored as a hash only.
    with psycopg.connect(database_url) as conn:
        rows = conn.execute("SELECT key_hash FROM conveyor_api_keys WHERE id = %s", (made["id"],)).fetchall()
        everything = str(conn.execute("SELECT * FROM conveyor_api_keys").fetchall())
    assert rows == [(hash_key(made["key"]),)]
    assert made["key"] not in everything

    assert (await admin.delete(f"/api/v1/admin/api-keys/{made['id']}")).status_code == 204
    assert (await admin.delete(f"/api/v1/admin/api-keys/{made['id']}")).status_code == 204  # idempotent
    revoked = [k for k in (await admin.get("/api/v1/admin/api-keys")).json()["items"] if k["id"] == made["id"]]
    assert revoked[0]["active"] is False and revoked[0]["revoked_at"] is not None
    assert_problem(await admin.delete("/api/v1/admin/api-keys/9999"), 404)


async def test_keys__invalid_requests(admin: httpx.AsyncClient) -> None:
    url = "/api/v1/admin/api-keys"
    assert_problem(await admin.post(url, json={"name": "x", "scopes": []}), 422, "body.scopes")
    assert_problem(await admin.post(url, json={"name": "x", "scopes": ["root"]}), 422, "body.scopes.0")
    assert_problem(await admin.post(url, json={"name": "", "scopes": ["admin"]}), 422, "body.name")


async def test_keys__last_used_is_recorded(admin: httpx.AsyncClient) -> None:
    keys = (await admin.get("/api/v1/admin/api-keys")).json()["items"]
    used = {k["name"]: k["last_used_at"] for k in keys}
    assert used["admin"] is not None
    assert used["reader"] is None


@pytest.mark.parametrize("scheme", ["bearer", "BEARER", "Bearer"])
async def test_bearer_scheme__is_case_insensitive(api: FastAPI, keys: Keys, scheme: str) -> None:
    async with client_for(api) as client:
        response = await client.get("/api/v1/tasks", headers={"Authorization": f"{scheme} {keys.reader}"})
    assert response.status_code == 200
