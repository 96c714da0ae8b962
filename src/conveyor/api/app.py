"""``create_app(conveyor_app)``: the HTTP API as a FastAPI application.

Routes are thin adapters over the stores (no SQL here). The app holds the Conveyor :class:`~conveyor.App`
in its state and reaches the database through ``conveyor_app.runtime()``, so the engine is always the
one of the event loop serving the request (uvicorn's, or a test's).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from importlib.metadata import PackageNotFoundError, version
from typing import Any

from fastapi import APIRouter, Depends, FastAPI
from fastapi.middleware.cors import CORSMiddleware
from fastapi.openapi.utils import get_openapi
from fastapi.routing import APIRoute

from conveyor.api import operations
from conveyor.api.auth import AuthConfig, Authenticator
from conveyor.api.deps import PUBLIC_PATHS, default_deny
from conveyor.api.errors import install_error_handlers
from conveyor.api.middleware import AuthMiddleware, BodyLimitMiddleware, MetricsMiddleware
from conveyor.api.routes import (
    AUTHENTICATED,
    admin,
    admin_keys,
    analytics,
    dead,
    debug,
    events,
    health,
    metrics,
    queues,
    resilience,
    schedules,
    search,
    tasks,
    workers,
    workflows,
)
from conveyor.api.schemas import Problem
from conveyor.app import App
from conveyor.db import migrate
from conveyor.monitoring.metrics import ApiMetrics

API_PREFIX = "/api/v1"

#: Room in a request body for what surrounds a task's payload (name, options, JSON syntax), in bytes.
_ENVELOPE_BYTES = 64 * 1024

_DESCRIPTION = """\
The whole control surface of Conveyor over HTTP: enqueue and inspect tasks, watch and steer queues
and workers, manage API keys.

**Authentication.** Every route needs an API key (`Authorization: Bearer cvk_...`) except
`/health/live`, `/health/ready`, `/docs` and `/openapi.json`. Scopes: `tasks:read` (reads and
metrics), `tasks:write` (enqueue and act on tasks; implies `tasks:read`), `admin` (queues, workers
and keys; implies every scope). Too many bad keys from one client answer 429 with `Retry-After`.

**Errors** are RFC 9457 problem details (`application/problem+json`); a 422 names each invalid field
in `errors`.

**Lists** are paginated with opaque cursors: pass `next_cursor` back as `cursor`.
"""

_TAGS = [
    {"name": "tasks", "description": "Enqueue, list, inspect and act on tasks."},
    {"name": "queues", "description": "Depth and throughput per queue; pause, resume, purge, limits."},
    {"name": "workers", "description": "Running workers; pause, resume, drain, forget."},
    {"name": "admin", "description": "API keys, retention (prune), configuration, maintenance mode."},
    {"name": "health", "description": "Liveness and readiness probes (no key needed)."},
    {"name": "metrics", "description": "Prometheus metrics."},
    {"name": "search", "description": "Find tasks by a structured filter, with a count."},
    {"name": "analytics", "description": "Throughput, latency percentiles, top errors, per-task numbers."},
    {"name": "dead letters", "description": "Tasks that failed for good: list, retry or delete in bulk."},
    {"name": "resilience", "description": "Dependencies, circuit breakers, degradation; recovery passes."},
    {"name": "events", "description": "A server-sent event stream of task and worker changes."},
    {"name": "debug", "description": "Database statistics and locks, worker stack dumps (if enabled)."},
]


def create_app(conveyor_app: App, *, auth: AuthConfig | None = None, close_on_shutdown: bool = False) -> FastAPI:
    """The API for ``conveyor_app``. ``auth`` tunes key caching and the bad-key rate limit.

    ``close_on_shutdown``: release the app's connections when the server stops (for a server process
    that owns the app; ``conveyor up`` shares it with a worker and closes it itself)."""

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        await operations.close(api)  # ends the event streams
        if close_on_shutdown:
            await conveyor_app.aclose()

    api = FastAPI(
        lifespan=lifespan,
        title="Conveyor API",
        version=_version(),
        description=_DESCRIPTION,
        openapi_tags=_TAGS,
        docs_url="/docs",
        redoc_url=None,
        openapi_url="/openapi.json",
        swagger_ui_oauth2_redirect_url=None,
        # Default deny: a route that declares no scope needs admin (see conveyor.api.deps).
        dependencies=[Depends(default_deny)],
        generate_unique_id_function=_operation_id,
    )
    api.state.conveyor = conveyor_app
    api.state.authenticator = Authenticator(auth)
    api.state.metrics = ApiMetrics()
    api.state.schema_head = migrate.head_revision()
    install_error_handlers(api)

    api.include_router(health.router)
    api.include_router(metrics.router)
    v1 = APIRouter(prefix=API_PREFIX, responses=AUTHENTICATED)
    for module in (tasks, queues, workers, admin_keys, schedules, workflows):
        v1.include_router(module.router)
    for module in (search, analytics, dead, admin, resilience, events):
        v1.include_router(module.router)
    if conveyor_app.settings.api.debug_routes:  # otherwise /debug does not exist (404, even for admin)
        v1.include_router(debug.router)
    api.include_router(v1)

    # Added innermost first: metrics wraps authentication, which wraps the body limit.
    limit = 2 * conveyor_app.settings.payload_limit_bytes + _ENVELOPE_BYTES
    api.add_middleware(BodyLimitMiddleware, max_body_bytes=limit)
    api.add_middleware(
        AuthMiddleware,
        conveyor_app=conveyor_app,
        authenticator=api.state.authenticator,
        public_paths=PUBLIC_PATHS,
    )
    # Outside authentication (a key check is database access): the database circuit breaker.
    operations.install(api, conveyor_app, api_prefix=API_PREFIX)
    api.add_middleware(MetricsMiddleware, metrics=api.state.metrics)
    origins = list(conveyor_app.settings.api.cors_origins)
    if origins:
        # Outermost, so a browser's preflight (which carries no key) is answered here.
        api.add_middleware(
            CORSMiddleware,
            allow_origins=origins,
            allow_methods=["GET", "POST", "PUT", "PATCH", "DELETE"],
            allow_headers=["Authorization", "Content-Type", "Idempotency-Key"],
        )
    _document_problems(api)
    return api


def _operation_id(route: APIRoute) -> str:
    # The function names are unique and read well in generated clients: `enqueue_task`, `list_queues`.
    return route.name


def _document_problems(api: FastAPI) -> None:
    """Put the Problem schema in the document's components (responses refer to it by $ref)."""

    def openapi() -> dict[str, Any]:
        if api.openapi_schema is None:
            schema = get_openapi(
                title=api.title,
                version=api.version,
                description=api.description,
                routes=api.routes,
                tags=api.openapi_tags,
            )
            definitions = Problem.model_json_schema(ref_template="#/components/schemas/{model}")
            components = schema.setdefault("components", {}).setdefault("schemas", {})
            components.update(definitions.pop("$defs", {}))
            components["Problem"] = definitions
            api.openapi_schema = schema
        return api.openapi_schema

    api.openapi = openapi  # type: ignore[method-assign]


def _version() -> str:
    try:
        return version("conveyor")
    except PackageNotFoundError:
        return "0.0.0"
