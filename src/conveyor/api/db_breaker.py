"""The ``database`` circuit breaker around the API: while PostgreSQL is down, requests fail fast.

Without it, every request during an outage waits for a connect timeout (seconds each) before its 503,
and they pile up: in the server, in the connection pool, in the clients' retries. With it, after
``failure_threshold`` requests in a row found the database unavailable, the next ones get their 503
at once (with ``Retry-After``), without touching the database. After ``reset_timeout_s`` one request
is let through as a trial: it first pings the database itself (bounded by ``probe_timeout_s``); if the
ping answers the breaker closes and the request proceeds, otherwise it stays open.

This is ASGI middleware outside authentication, because checking an API key is itself database
access. A request "found the database unavailable" when it was answered with the API's
``database-unavailable`` problem (whichever layer produced it: the key check, a route, an error
handler); any other answer is a success. The health probes, the API document and the resilience routes
(an operator must be able to look at, and reset, the breaker) are never refused by it.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
from collections.abc import Callable

from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from conveyor.api.errors import PROBLEM_JSON, problem_response
from conveyor.app import App
from conveyor.db.health import schema_revision
from conveyor.errors import DatabaseError
from conveyor.resilience.circuit_breaker import CircuitBreaker, CircuitOpen, Permit

log = logging.getLogger("conveyor.api")

#: The breaker's name in the registry (``GET /resilience/breakers``).
DATABASE_BREAKER = "database"
#: The problem type suffix that means "the database could not be used" (see ``api.errors``).
_UNAVAILABLE = ":database-unavailable"
#: Largest 503 body inspected (ours are a few hundred bytes).
_BODY_LIMIT = 64 * 1024


class DatabaseBreakerMiddleware:
    def __init__(
        self,
        app: ASGIApp,
        *,
        conveyor_app: App,
        breaker: CircuitBreaker,
        exempt: Callable[[str], bool],
        probe_timeout_s: float = 2.0,
    ) -> None:
        self.app = app
        self.conveyor_app = conveyor_app
        self.breaker = breaker
        self.exempt = exempt
        self.probe_timeout_s = probe_timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or self.exempt(_route_path(scope)):
            await self.app(scope, receive, send)
            return
        try:
            permit = self.breaker.acquire()
            if permit.trial:
                await self._trial(permit)
                permit = self.breaker.acquire()  # closed now: this request counts like any other
        except CircuitOpen as exc:
            await _refuse(scope, receive, send, exc.retry_after_s)
            return
        watcher = _Watcher(send)
        try:
            await self.app(scope, receive, watcher.send)
        except BaseException:
            permit.release()  # an unhandled error or a cancellation says nothing about the database
            raise
        if watcher.database_unavailable:
            permit.failure("a request found the database unavailable")
        else:
            permit.success()

    async def _trial(self, permit: Permit) -> None:
        try:
            async with asyncio.timeout(self.probe_timeout_s):
                await schema_revision(self.conveyor_app.runtime().engine)
        except (DatabaseError, TimeoutError) as exc:
            permit.failure(exc)
            log.warning("database still unavailable (circuit breaker stays open): %s", exc)
            raise CircuitOpen(self.breaker.name, self.breaker.retry_after_s()) from None
        except BaseException:
            permit.release()
            raise
        permit.success()
        log.info("database reachable again: circuit breaker closed")


class _Watcher:
    """Passes the response on, noting whether it is the ``database-unavailable`` problem."""

    def __init__(self, send: Send) -> None:
        self._send = send
        self._inspecting = False
        self._body = bytearray()
        self.database_unavailable = False

    async def send(self, message: Message) -> None:
        if message["type"] == "http.response.start":
            headers = Headers(raw=message.get("headers", []))
            self._inspecting = message["status"] == 503 and headers.get("content-type", "").startswith(PROBLEM_JSON)
        elif message["type"] == "http.response.body" and self._inspecting:
            if len(self._body) < _BODY_LIMIT:
                self._body.extend(message.get("body", b""))
            if not message.get("more_body", False):
                self._inspecting = False
                self.database_unavailable = _is_unavailable(bytes(self._body))
        await self._send(message)


def _is_unavailable(body: bytes) -> bool:
    try:
        problem = json.loads(body)
    except ValueError:
        return False
    return isinstance(problem, dict) and str(problem.get("type", "")).endswith(_UNAVAILABLE)


async def _refuse(scope: Scope, receive: Receive, send: Send, retry_after_s: float) -> None:
    wait_s = max(1, math.ceil(retry_after_s))
    response = problem_response(
        503,
        "the database is unavailable (circuit breaker open); try again shortly",
        kind="database-unavailable",
        headers={"Retry-After": str(wait_s)},
        breaker=DATABASE_BREAKER,
    )
    await response(scope, receive, send)


def _route_path(scope: Scope) -> str:
    path = str(scope["path"])
    root = str(scope.get("root_path", ""))
    return path[len(root) :] if root and path.startswith(root) else path
