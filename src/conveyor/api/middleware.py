"""Pure ASGI middleware around the whole API: metrics, authentication, the request body limit.

Order, outermost first: metrics (so refusals are counted too) -> authentication (so an anonymous
client never gets as far as sending us a body) -> body limit -> the application.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Sequence
from typing import Any

import fastapi.routing
from starlette.datastructures import Headers
from starlette.routing import BaseRoute
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from conveyor.api.auth import Authenticator, AuthError
from conveyor.api.deps import route_path
from conveyor.api.errors import problem_response
from conveyor.app import App
from conveyor.db.api_key_store import ApiKeyStore
from conveyor.errors import DatabaseError
from conveyor.monitoring.metrics import ApiMetrics

log = logging.getLogger("conveyor.api")


class MetricsMiddleware:
    def __init__(self, app: ASGIApp, *, metrics: ApiMetrics) -> None:
        self.app = app
        self.metrics = metrics
        self.routes: RouteTemplates | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500

        async def sending(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, sending)
        finally:
            if self.routes is None:
                # Built at the first request, when every route has been added.
                self.routes = RouteTemplates(getattr(scope.get("app"), "routes", []))
            method = scope["method"] if scope["method"] in KNOWN_METHODS else "OTHER"
            self.metrics.observe(method, self.routes.label(scope), status, time.perf_counter() - started)


#: Methods counted under their own name; any other (a client may send any token) counts as "OTHER".
KNOWN_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
#: The route label of a request that matched no route.
UNMATCHED = "unmatched"


class RouteTemplates:
    """The path templates of an app's routes (``/api/v1/tasks/{task_id}``), as metric labels: as few
    label values as there are routes, whatever paths clients send, and :data:`UNMATCHED` for the rest.

    The route the router records in the scope does not carry its full path (FastAPI resolves the
    prefixes of included routers apart from it), and a request refused before routing (no key, a body
    over the limit, the database breaker open) has none: so the templates come from the app's routes,
    prefixes included, and a request is matched against them when its scope has no route."""

    def __init__(self, routes: Sequence[BaseRoute]) -> None:
        # FastAPI versions that resolve included routers lazily list them through iter_route_contexts;
        # earlier ones flatten them into app.routes, prefixes included.
        expand = getattr(fastapi.routing, "iter_route_contexts", None)
        resolved: list[Any] = list(expand(routes)) if expand is not None else list(routes)
        self._table: list[tuple[re.Pattern[str], str, frozenset[str] | None]] = []
        templates: dict[int, set[str]] = {}
        for route in resolved:
            template, pattern = getattr(route, "path_format", None), getattr(route, "path_regex", None)
            if not isinstance(template, str) or not isinstance(pattern, re.Pattern):
                continue
            methods = getattr(route, "methods", None)
            self._table.append((pattern, template, None if methods is None else frozenset(methods)))
            original = getattr(route, "original_route", route)
            templates.setdefault(id(original), set()).add(template)
        # A route included once has one template; one included under two prefixes is matched instead.
        self._by_route = {key: found.pop() for key, found in templates.items() if len(found) == 1}

    def label(self, scope: Scope) -> str:
        routed = scope.get("route")
        if routed is not None and id(routed) in self._by_route:
            return self._by_route[id(routed)]
        path, other_method = route_path(scope), None
        for pattern, template, methods in self._table:
            if pattern.match(path):
                if methods is None or scope["method"] in methods:
                    return template
                other_method = other_method or template  # the router's 405: still that route
        return other_method or UNMATCHED


class AuthMiddleware:
    """Every request needs a valid API key, except those for ``public_paths`` (see ``api.deps``)."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        conveyor_app: App,
        authenticator: Authenticator,
        public_paths: frozenset[str],
    ) -> None:
        self.app = app
        self.conveyor_app = conveyor_app
        self.authenticator = authenticator
        self.public_paths = public_paths

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket") or route_path(scope) in self.public_paths:
            await self.app(scope, receive, send)
            return
        client = scope.get("client")
        address = client[0] if client else "unknown"
        authorization = Headers(scope=scope).get("authorization")
        try:
            store = ApiKeyStore(self.conveyor_app.runtime().engine)
            caller = await self.authenticator.authenticate(store, authorization, address)
        except AuthError as exc:
            kind = "rate-limited" if exc.status == 429 else "unauthorized"
            await self._refuse(scope, receive, send, exc.status, exc.detail, kind, exc.headers)
            return
        except DatabaseError as exc:
            log.warning("cannot check API keys: %s", exc)
            headers = {"Retry-After": "5"}
            detail = "the database is unavailable; try again shortly"
            await self._refuse(scope, receive, send, 503, detail, "database-unavailable", headers)
            return
        scope.setdefault("state", {})["principal"] = caller
        await self.app(scope, receive, send)

    @staticmethod
    async def _refuse(
        scope: Scope, receive: Receive, send: Send, status: int, detail: str, kind: str, headers: dict[str, str]
    ) -> None:
        if scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008, "reason": detail[:120]})
            return
        response = problem_response(status, detail, kind=kind, headers=headers)
        await response(scope, receive, send)


class BodyLimitMiddleware:
    """Refuse request bodies over ``max_body_bytes`` with 413, before reading them whole.

    A declared ``Content-Length`` over the limit is refused before a byte of body is read; a body
    without one (chunked) is counted as it arrives and refused as soon as it passes the limit.
    Accepted bodies are handed on unchanged.
    """

    def __init__(self, app: ASGIApp, *, max_body_bytes: int) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = Headers(scope=scope).get("content-length")
        if declared is not None:
            if not declared.strip().isdigit():
                await self._refuse(scope, receive, send, 400, "Content-Length must be a whole number of bytes")
                return
            if int(declared) > self.max_body_bytes:
                await self._refuse(scope, receive, send, 413, self._too_large())
                return
        buffered: list[Message] = []
        size = 0
        while True:
            message = await receive()
            buffered.append(message)
            if message["type"] != "http.request":
                break  # the client went away; let the app see that
            size += len(message.get("body", b""))
            if size > self.max_body_bytes:
                await self._refuse(scope, receive, send, 413, self._too_large())
                return
            if not message.get("more_body", False):
                break
        await self.app(scope, _replay(buffered, receive), send)

    def _too_large(self) -> str:
        return f"the request body is over the limit of {self.max_body_bytes} bytes"

    @staticmethod
    async def _refuse(scope: Scope, receive: Receive, send: Send, status: int, detail: str) -> None:
        kind = "payload-too-large" if status == 413 else "bad-request"
        # Close the connection: the rest of the body is still on its way and will not be read.
        response = problem_response(status, detail, kind=kind, headers={"Connection": "close"})
        await response(scope, receive, send)


def _replay(buffered: list[Message], receive: Receive) -> Receive:
    async def replayed() -> Message:
        if buffered:
            return buffered.pop(0)
        return await receive()

    return replayed
