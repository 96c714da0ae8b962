"""What routes depend on: the caller's key and its scopes, and the services they work through.

Default deny, in two layers:

1. :class:`~conveyor.api.middleware.AuthMiddleware` wraps the whole application, so *every* request,
   whatever it is routed to (an API route, a route not in the OpenAPI document, a mounted app, a path
   that matches nothing) needs a valid key, except the paths in :data:`PUBLIC_PATHS`.
2. Scopes are declared per route with ``dependencies=[require(Scope.X)]``. :func:`default_deny` is a
   dependency of the whole FastAPI app: a route that declares no scope needs ``admin``. So a route
   someone forgets to mark is closed, not open.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import Depends, Request
from fastapi.dependencies.models import Dependant
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.routing import BaseRoute
from starlette.types import Scope as Scope_

from conveyor.api.auth import Principal, Scope
from conveyor.api.errors import ApiProblem
from conveyor.app import App
from conveyor.db.api_key_store import ApiKeyStore
from conveyor.db.queue_store import QueueStore
from conveyor.db.task_queries import TaskQueries
from conveyor.db.task_store import TaskStore
from conveyor.db.worker_store import WorkerStore

#: The only paths answered without a key: probes, and the API's own description.
PUBLIC_PATHS = frozenset({"/health/live", "/health/ready", "/docs", "/openapi.json"})

_STRENGTH = {Scope.TASKS_READ: 0, Scope.TASKS_WRITE: 1, Scope.ADMIN: 2}

bearer = HTTPBearer(
    scheme_name="ApiKey",
    bearerFormat="cvk_...",
    description="A Conveyor API key: `Authorization: Bearer cvk_...`. Make one with "
    "`conveyor api-keys create --scopes ...` or `POST /api/v1/admin/api-keys`.",
    auto_error=False,  # the middleware has already refused requests without a valid key
)


class ScopeGuard:
    """A dependency that lets a request through only if its key holds ``scope`` (or one implying it)."""

    def __init__(self, scope: Scope) -> None:
        self.scope = scope

    async def __call__(
        self, request: Request, _credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]
    ) -> Principal:
        return check_scope(request, self.scope)


def require(scope: Scope) -> Any:
    """``dependencies=[require(Scope.TASKS_READ)]``: the scope a route needs."""
    return Depends(ScopeGuard(scope))


def principal_of(request: Request) -> Principal:
    found = request.scope.get("state", {}).get("principal")
    if not isinstance(found, Principal):
        # Only possible if the app were served without its AuthMiddleware: still closed.
        raise ApiProblem(401, "this endpoint needs an API key", kind="unauthorized")
    return found


def check_scope(request: Request, scope: Scope) -> Principal:
    caller = principal_of(request)
    if not caller.allows(scope):
        raise ApiProblem(403, f"this needs an API key with the '{scope.value}' scope", kind="forbidden")
    return caller


def required_scope(route: BaseRoute) -> Scope:
    """The scope ``route`` needs: the strongest it declares, ``admin`` if it declares none.

    Declarations are seen on the route itself and on the router it was defined on
    (``APIRouter(dependencies=[require(...)])``), not on ``include_router(dependencies=...)``: a route
    declared only there counts as undeclared and needs ``admin`` (closed, not open)."""
    dependant = getattr(route, "dependant", None)
    declared = _declared(dependant) if isinstance(dependant, Dependant) else []
    if not declared:
        return Scope.ADMIN
    return max(declared, key=_STRENGTH.__getitem__)


def route_path(scope: Scope_) -> str:
    """The path the router matches on: without the prefix a proxy mounts the app under (root_path)."""
    path = str(scope["path"])
    root = str(scope.get("root_path", ""))
    return path[len(root) :] if root and path.startswith(root) else path


async def default_deny(request: Request) -> None:
    """A dependency of every route: those that declare no scope need ``admin``."""
    if route_path(request.scope) in PUBLIC_PATHS:
        return
    route = request.scope.get("route")
    if route is not None and _declared(getattr(route, "dependant", None)):
        return  # the route's own guard checks its scope
    check_scope(request, Scope.ADMIN)


def _declared(dependant: Dependant | None) -> list[Scope]:
    if dependant is None:
        return []
    found: list[Scope] = []
    stack = [dependant]
    while stack:
        node = stack.pop()
        if isinstance(node.call, ScopeGuard):
            found.append(node.call.scope)
        stack.extend(node.dependencies)
    return found


# -- services ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Services:
    """The repositories a request works through, bound to this event loop's engine."""

    app: App
    tasks: TaskStore
    queries: TaskQueries
    queues: QueueStore
    workers: WorkerStore
    keys: ApiKeyStore


def conveyor_app(request: Request) -> App:
    found = request.app.state.conveyor
    assert isinstance(found, App)
    return found


async def services(request: Request) -> Services:
    app = conveyor_app(request)
    # runtime(): the engine of the event loop serving this request (created on first use).
    runtime = app.runtime()
    return Services(
        app=app,
        tasks=runtime.tasks,
        queries=TaskQueries(runtime.engine),
        queues=QueueStore(runtime.engine, worker_stale_after_s=app.settings.worker.lease_timeout_s),
        workers=runtime.workers,
        keys=ApiKeyStore(runtime.engine),
    )


ServicesDep = Annotated[Services, Depends(services)]


async def principal(request: Request) -> Principal:
    return principal_of(request)


PrincipalDep = Annotated[Principal, Depends(principal)]
