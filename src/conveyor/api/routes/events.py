"""``GET /api/v1/events``: a server-sent event stream of task and worker changes.

See :mod:`conveyor.api.event_hub` for what is streamed and how. Each message is::

    id: <task event id>.<task id>
    event: task.succeeded
    data: {"event_id": 12, "task_id": 5, "name": "add", "queue": "default", ...}

with a ``: keep-alive`` comment after every 15 seconds of silence (so proxies keep the
connection open). The stream ends cleanly when the client goes away, when the server shuts down
(a final ``shutdown`` event), or when the client reads too slowly (a final ``dropped`` event):
reconnecting with ``Last-Event-ID`` (browsers' EventSource does it by itself) resumes where it left off.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from typing import Annotated, Any

from fastapi import APIRouter, Header, Query, Request
from fastapi.responses import Response
from starlette.types import Receive, Scope, Send

from conveyor.api.auth import Scope as ApiScope
from conveyor.api.deps import require
from conveyor.api.errors import PROBLEM_JSON, ApiProblem, invalid_field
from conveyor.api.event_hub import (
    EventHub,
    StreamEnd,
    StreamEvent,
    Subscription,
    TooManySubscribers,
    format_cursor,
    parse_cursor,
)
from conveyor.api.operations import OpsDep
from conveyor.api.schemas import QueueName
from conveyor.resilience.circuit_breaker import CircuitOpen

log = logging.getLogger("conveyor.api.events")

router = APIRouter(prefix="/events", tags=["events"])

_READ = [require(ApiScope.TASKS_READ)]

#: What EventSource waits before reconnecting (ms), sent once at the start.
RETRY_MS = 2_000

KindParam = Annotated[
    str,
    Query(
        pattern=r"^(task|worker)(\.[a-z_]{1,40})?$",
        max_length=50,
        description="`task`, `worker`, or one kind such as `task.succeeded`, `worker.lost`.",
    ),
]


@router.get(
    "",
    dependencies=_READ,
    response_class=Response,
    responses={
        200: {
            "description": "A text/event-stream of task and worker events (see the description).",
            "content": {"text/event-stream": {"schema": {"type": "string"}}},
        },
        406: {
            "description": "The request did not accept text/event-stream.",
            "content": {PROBLEM_JSON: {"schema": {"$ref": "#/components/schemas/Problem"}}},
        },
    },
)
async def stream_events(
    request: Request,
    ops: OpsDep,
    queue: Annotated[list[QueueName] | None, Query(max_length=50, description="Only events of these queues.")] = None,
    kind: Annotated[list[KindParam] | None, Query(max_length=20, description="Only these kinds.")] = None,
    last_event_id: Annotated[
        str | None,
        Header(alias="Last-Event-ID", max_length=64, description="Resume after this event (EventSource sends it)."),
    ] = None,
    since: Annotated[
        str | None, Query(max_length=64, description="As Last-Event-ID, for clients that cannot set headers.")
    ] = None,
) -> Response:
    """Server-sent events: `task.enqueued`, `task.claimed`, `task.succeeded`, `task.failed`,
    `task.retried`, `task.rescued`, `task.released`, `task.cancel_requested`, `task.cancelled`,
    `task.updated`; `worker.started`, `worker.stopped`, `worker.lost`, `worker.changed`. Each has an
    `id` to resume from (`Last-Event-ID`), an `event` kind, and JSON `data`. Events arrive within about
    half a second; they may repeat after a resume (deduplicate by `event_id` / `task_id`).

    The request must accept `text/event-stream` (EventSource does; with curl, add
    `-H 'Accept: text/event-stream'`): anything else is a 406, not an endless response."""
    if not _accepts_event_stream(request.headers.get("accept", "")):
        # An endless response must be asked for: a generic client (or a crawler) that accepts
        # anything would otherwise hang on it. EventSource always sends this header.
        raise ApiProblem(
            406,
            "this is a server-sent event stream: send 'Accept: text/event-stream'",
            kind="not-acceptable",
        )
    resume = None
    given, field = (last_event_id, "header.Last-Event-ID") if last_event_id is not None else (since, "query.since")
    if given is not None:
        resume = parse_cursor(given)
        if resume is None:
            raise invalid_field(field, "is not an event id this API sent")
    hub = ops.events
    try:
        subscription = await hub.subscribe(
            queues=frozenset(queue) if queue else None, kinds=frozenset(kind) if kind else None
        )
    except CircuitOpen as exc:
        raise ApiProblem(
            503,
            "the database is unavailable (circuit breaker open); try again shortly",
            kind="database-unavailable",
            headers={"Retry-After": str(max(1, round(exc.retry_after_s)))},
        ) from None
    except TooManySubscribers as exc:
        raise ApiProblem(503, str(exc), kind="too-many-streams", headers={"Retry-After": "30"}) from None
    try:
        backlog: list[StreamEvent] = []
        current = hub.cursor
        if resume is not None and current is not None:
            since_cursor = (min(resume[0], current[0]), min(resume[1], current[1]))
            backlog = await hub.backfill(subscription, since_cursor, current)
    except BaseException:
        await hub.unsubscribe(subscription)
        raise
    return EventStreamResponse(hub, subscription, backlog, keepalive_s=hub.keepalive_s)


class EventStreamResponse(Response):
    """The stream itself, as a plain ASGI response: it watches for the client's disconnect, sends the
    backlog, then each event as it comes (keep-alives in between), and always unsubscribes."""

    media_type = "text/event-stream"

    def __init__(
        self, hub: EventHub, subscription: Subscription, backlog: list[StreamEvent], *, keepalive_s: float
    ) -> None:
        # As StreamingResponse does: no body attribute, so no Content-Length header.
        self.status_code = 200
        self.background = None
        # no-transform and X-Accel-Buffering: proxies (nginx) must not buffer the stream.
        self.init_headers({"Cache-Control": "no-cache, no-transform", "X-Accel-Buffering": "no"})
        self.hub = hub
        self.subscription = subscription
        self.backlog = backlog
        self.keepalive_s = keepalive_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        watcher = asyncio.create_task(self._watch_disconnect(receive), name="sse-disconnect-watch")
        started = False
        try:
            await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
            started = True
            await _body(send, f"retry: {RETRY_MS}\n: connected\n\n".encode())
            for event in self.backlog:
                await _body(send, encode(event))
            while True:
                item = await self.subscription.next(self.keepalive_s)
                if item is None:
                    await _body(send, b": keep-alive\n\n")
                elif isinstance(item, StreamEnd):
                    if item.reason != "disconnected":
                        await _body(send, _final(item))
                        await send({"type": "http.response.body", "body": b"", "more_body": False})
                    return
                else:
                    await _body(send, encode(item))
        except asyncio.CancelledError:
            # The server is stopping and cancels what is still running. Finish the response properly
            # so the client sees a clean end (and resumes elsewhere) rather than a broken connection.
            task = asyncio.current_task()
            if task is not None:
                task.uncancel()
            if started:
                with contextlib.suppress(Exception):
                    await _body(send, _final(StreamEnd("shutdown")))
                    await send({"type": "http.response.body", "body": b"", "more_body": False})
        except OSError:
            pass  # the client's connection broke mid-write: nothing left to tell it
        finally:
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher
            await self.hub.unsubscribe(self.subscription)

    async def _watch_disconnect(self, receive: Receive) -> None:
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                self.subscription.end(StreamEnd("disconnected"))
                return


def _accepts_event_stream(accept: str) -> bool:
    """Whether an Accept header names text/event-stream (with a non-zero quality)."""
    for part in accept.split(","):
        media, *parameters = (p.strip().lower() for p in part.split(";"))
        if media != "text/event-stream":
            continue
        for parameter in parameters:
            name, _, value = parameter.partition("=")
            if name.strip() == "q":
                try:
                    return float(value) > 0
                except ValueError:
                    return False
        return True
    return False


def encode(event: StreamEvent) -> bytes:
    """One SSE message. The data is one line of JSON (json.dumps never emits a raw newline)."""
    data = json.dumps(event.data, separators=(",", ":"), default=str)
    return f"id: {format_cursor(event.cursor)}\nevent: {event.kind}\ndata: {data}\n\n".encode()


def _final(end: StreamEnd) -> bytes:
    why: dict[str, Any] = {
        "dropped": {"reason": "the client read too slowly", "resume": "reconnect with Last-Event-ID"},
        "shutdown": {"reason": "the server is shutting down", "resume": "reconnect with Last-Event-ID"},
    }.get(end.reason, {"reason": end.reason})
    return f"event: {end.reason}\ndata: {json.dumps(why, separators=(',', ':'))}\n\n".encode()


async def _body(send: Send, chunk: bytes) -> None:
    await send({"type": "http.response.body", "body": chunk, "more_body": True})
