"""``GET /api/v1/events``: a server-sent event stream, read over a real HTTP connection (uvicorn in
this event loop; httpx's in-process transport cannot stream). Every read is bounded by a timeout."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
import uvicorn
from fastapi import FastAPI

from conveyor.api.event_hub import EventHub
from conveyor.app import App
from tests.api.conftest import Keys, assert_problem, running_worker, wait_until

EVENTS = "/api/v1/events"
SSE = {"Accept": "text/event-stream"}


class _Server(uvicorn.Server):
    @contextmanager
    def capture_signals(self) -> Iterator[None]:  # the test runner owns the signals
        yield


@asynccontextmanager
async def serving(api: FastAPI, *, graceful_s: float = 2.0) -> AsyncIterator[tuple[str, _Server]]:
    config = uvicorn.Config(
        api, host="127.0.0.1", port=0, log_level="warning", lifespan="on", timeout_graceful_shutdown=graceful_s
    )
    server = _Server(config)
    running = asyncio.create_task(server.serve())
    await wait_until("the server to start", lambda: _started(server), timeout_s=10)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}", server
    finally:
        server.should_exit = True
        await asyncio.wait_for(running, timeout=20)


async def _started(server: _Server) -> bool:
    return bool(server.started)


@dataclass
class Message:
    id: str | None
    event: str | None
    data: dict[str, Any] | None


@dataclass
class Stream:
    """An open SSE response, read message by message with a deadline."""

    response: httpx.Response
    lines: AsyncIterator[str] = field(init=False)
    comments: list[str] = field(default_factory=list)
    ended: bool = False

    def __post_init__(self) -> None:
        self.lines = self.response.aiter_lines()

    async def next(self, timeout_s: float = 10.0) -> Message | None:
        """The next message; None when the stream ends."""
        async with asyncio.timeout(timeout_s):
            fields: dict[str, str] = {}
            async for line in self.lines:
                if line == "":
                    if "data" in fields or "event" in fields:
                        data = json.loads(fields["data"]) if "data" in fields else None
                        return Message(fields.get("id"), fields.get("event"), data)
                    fields = {}  # e.g. the opening "retry:" alone
                    continue
                if line.startswith(":"):
                    self.comments.append(line[1:].strip())
                    continue
                name, _, value = line.partition(":")
                fields[name] = value.removeprefix(" ")
            self.ended = True
            return None

    async def until(self, predicate: Any, timeout_s: float = 15.0) -> list[Message]:
        """Messages read until one satisfies ``predicate`` (included)."""
        seen: list[Message] = []
        async with asyncio.timeout(timeout_s):
            while True:
                message = await self.next(timeout_s)
                if message is None:
                    raise AssertionError(f"the stream ended; seen: {seen}")
                seen.append(message)
                if predicate(message):
                    return seen


@asynccontextmanager
async def stream(url: str, key: str, **params: Any) -> AsyncIterator[Stream]:
    headers = {**SSE, "Authorization": f"Bearer {key}"}
    last = params.pop("last_event_id", None)
    if last is not None:
        headers["Last-Event-ID"] = last
    async with (
        httpx.AsyncClient(base_url=url, timeout=httpx.Timeout(10.0, read=30.0)) as client,
        client.stream("GET", EVENTS, headers=headers, params=params) as response,
    ):
        assert response.status_code == 200, await response.aread()
        assert response.headers["content-type"].startswith("text/event-stream")
        opened = Stream(response)
        yield opened


def hub_of(api: FastAPI) -> EventHub:
    hub = api.state.event_hub
    assert isinstance(hub, EventHub)
    return hub


async def test_stream__events_of_a_task_a_worker_runs(api: FastAPI, conveyor_app: App, keys: Keys) -> None:
    async with serving(api) as (url, _), stream(url, keys.reader) as events:
        handle = await conveyor_app.enqueue_async("add", [2, 3])
        async with running_worker(conveyor_app):
            seen = await events.until(lambda m: m.event == "task.succeeded" and m.data["task_id"] == handle.id)
        mine = [m for m in seen if m.data and m.data.get("task_id") == handle.id]
        assert [m.event for m in mine] == ["task.enqueued", "task.claimed", "task.succeeded"]
        enqueued, claimed, succeeded = mine
        assert enqueued.data == {
            "task_id": handle.id,
            "name": "add",
            "queue": "default",
            "state": enqueued.data["state"],
            "priority": 0,
            "at": enqueued.data["at"],
        }
        assert claimed.data["worker_id"] and claimed.data["attempt"] == 1
        assert succeeded.data["queue"] == "default" and succeeded.data["event_id"] > claimed.data["event_id"]
        cursors = [tuple(int(part) for part in m.id.split(".")) for m in mine if m.id]
        assert cursors == sorted(cursors)  # ids only move forward
        assert "connected" in events.comments


async def test_stream__filters_by_queue_and_kind(api: FastAPI, conveyor_app: App, keys: Keys) -> None:
    async with (
        serving(api) as (url, _),
        stream(url, keys.reader, queue="other") as other_queue,
        stream(url, keys.reader, kind="task.succeeded") as successes,
    ):
        await conveyor_app.enqueue_async("add", [1, 1])
        marker = await conveyor_app.enqueue_async("other.queue_task")
        async with running_worker(conveyor_app, queues=["default", "other"]):
            seen = await other_queue.until(lambda m: m.event == "task.succeeded")
            assert {m.data["queue"] for m in seen if m.data} == {"other"}
            assert seen[-1].data["task_id"] == marker.id
            done = [await successes.next(), await successes.next()]
        assert {m.event for m in done if m} == {"task.succeeded"}


async def test_stream__resumes_from_last_event_id_with_what_was_missed(
    api: FastAPI, conveyor_app: App, keys: Keys
) -> None:
    async with serving(api) as (url, _):
        async with stream(url, keys.reader) as first:
            one = await conveyor_app.enqueue_async("add", [1, 2])
            received = (await first.until(lambda m: m.event == "task.enqueued"))[-1]
            assert received.data["task_id"] == one.id
            last_id = received.id
        await wait_until("the stream to be let go", lambda: _no_subscribers(api))
        missed = [await conveyor_app.enqueue_async("add", [i, i]) for i in range(3)]
        async with stream(url, keys.reader, last_event_id=last_id) as resumed:
            seen = await resumed.until(lambda m: m.data and m.data.get("task_id") == missed[-1].id)
        assert [m.data["task_id"] for m in seen if m.event == "task.enqueued"] == [h.id for h in missed]
        async with stream(url, keys.reader, since=last_id) as by_query:
            again = await by_query.until(lambda m: m.data and m.data.get("task_id") == missed[-1].id)
        assert len([m for m in again if m.event == "task.enqueued"]) == 3


async def _no_subscribers(api: FastAPI) -> bool:
    return hub_of(api).subscribers == 0


async def test_stream__worker_events_and_keep_alives(api: FastAPI, conveyor_app: App, keys: Keys) -> None:
    hub_of(api).keepalive_s = 0.3
    async with serving(api) as (url, _), stream(url, keys.reader, kind="worker") as workers:
        await asyncio.sleep(0.7)  # the poller has seen the registry as it was
        async with running_worker(conveyor_app, name="watched") as worker:
            started = (await workers.until(lambda m: m.event == "worker.started"))[-1]
            assert started.data["worker_id"] == worker.id and started.data["name"] == "watched"
        stopped = (await workers.until(lambda m: m.event == "worker.stopped"))[-1]
        assert stopped.data["worker_id"] == worker.id
        assert "keep-alive" in workers.comments


async def test_stream__ends_cleanly_when_the_client_goes_away(api: FastAPI, keys: Keys) -> None:
    hub = hub_of(api)
    async with serving(api) as (url, _):
        for _ in range(3):
            async with stream(url, keys.reader) as events:
                await wait_until("a subscriber", lambda: _has_subscribers(api))
                assert events.comments == [] or "connected" in events.comments
        await wait_until("the subscribers to be let go", lambda: _no_subscribers(api))
        await wait_until("the poller to stop", lambda: _poller_stopped(hub))


async def _has_subscribers(api: FastAPI) -> bool:
    return hub_of(api).subscribers > 0


async def _poller_stopped(hub: EventHub) -> bool:
    return hub._poller is None


async def test_stream__ends_cleanly_when_the_server_shuts_down(
    api: FastAPI, keys: Keys, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.ERROR)
    async with serving(api, graceful_s=0.5) as (url, server), stream(url, keys.reader) as events:
        await wait_until("a subscriber", lambda: _has_subscribers(api))
        server.should_exit = True
        final = await events.next(timeout_s=10)
        assert final is not None and final.event == "shutdown"
        assert await events.next(timeout_s=10) is None  # and then the response ends
    assert not [r for r in caplog.records if "Exception in ASGI application" in r.getMessage()]


async def test_stream__ends_with_a_shutdown_event_when_the_hub_closes(api: FastAPI, keys: Keys) -> None:
    async with serving(api) as (url, _), stream(url, keys.reader) as events:
        await wait_until("a subscriber", lambda: _has_subscribers(api))
        await hub_of(api).close()
        final = await events.next(timeout_s=10)
        assert final is not None and final.event == "shutdown"
        assert final.data == {"reason": "the server is shutting down", "resume": "reconnect with Last-Event-ID"}
        assert await events.next(timeout_s=10) is None


async def test_stream__bad_requests(reader: httpx.AsyncClient) -> None:
    # An endless response must be asked for (in-process, the refusals come before any streaming).
    assert_problem(await reader.get(EVENTS), 406)
    assert_problem(await reader.get(EVENTS, headers={"Accept": "text/event-stream;q=0"}), 406)
    bad_id = {**SSE, "Last-Event-ID": "12;DROP TABLE conveyor_tasks"}
    assert_problem(await reader.get(EVENTS, headers=bad_id), 422, "header.Last-Event-ID")
    assert_problem(await reader.get(EVENTS, headers=SSE, params={"since": "x.y"}), 422, "query.since")
    assert_problem(await reader.get(EVENTS, headers=SSE, params={"kind": "tasks"}), 422, "query.kind.0")
    assert_problem(await reader.get(EVENTS, headers=SSE, params={"queue": "bad queue!"}), 422, "query.queue.0")


async def test_stream__refuses_streams_beyond_the_limit(api: FastAPI, keys: Keys) -> None:
    hub_of(api).max_subscribers = 1
    async with serving(api) as (url, _), stream(url, keys.reader):
        await wait_until("a subscriber", lambda: _has_subscribers(api))
        async with httpx.AsyncClient(base_url=url, headers={**SSE, "Authorization": f"Bearer {keys.reader}"}) as client:
            problem = assert_problem(await client.get(EVENTS), 503)
            assert problem["type"].endswith("too-many-streams")
