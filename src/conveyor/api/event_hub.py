"""The event stream's engine: one poller per API process, fanned out to every subscriber.

**What is streamed.** Every row appended to ``conveyor_task_events`` (claimed, succeeded, failed,
retried, rescued, released, cancel_requested, cancelled, updated, and whatever else is recorded there),
as ``task.<kind>``; every new task as ``task.enqueued`` (an enqueue writes no event row: the task row
is the record); and changes in the worker registry as ``worker.started``, ``worker.stopped``,
``worker.lost`` (heartbeat older than the lease timeout) and ``worker.changed`` (paused, draining, back).

**How.** NOTIFY is not enough (not every change notifies, and a notification sent while nobody listens
is gone), so one background task per process polls by primary key (``id > last seen``) every
``poll_interval_s`` (at once again while pages come back full) and hands each event to every matching
subscriber's bounded queue. A subscriber that falls ``queue_size`` events behind is dropped with a
final ``dropped`` event rather than let it hold memory or slow the others; it reconnects with
``Last-Event-ID`` and catches up from the database.

**Ids and resuming.** An SSE id is ``<task event id>.<task id>``: everything up to both has been sent.
A client that reconnects with ``Last-Event-ID`` first gets what it missed (up to :data:`BACKFILL_MAX`
events, read from the database), then the live stream. Worker events carry the id of the moment; they
are not replayed (``GET /workers`` has the current state).

**Ids that commit out of order.** Two transactions can take ids 7 and 8 and commit 8 first; a poller
that moved past 8 would never see 7. So an id skipped over is remembered as a gap for
``gap_grace_s`` seconds and looked for again at every poll; most gaps are such transactions and
fill within milliseconds, the others are ids that were never used (a rollback, a conflicting
enqueue) and are forgotten. (So a row whose transaction commits more than ``gap_grace_s`` after a
later id, say a huge bulk enqueue in one transaction, is not streamed as it appears; its later events
are.) Events may therefore arrive slightly out of id order, and a client that resumes may see an event
twice: deduplicate by ``event_id`` / ``task_id`` if it matters.

The poller starts with the first subscriber and stops with the last; it goes through the ``database``
circuit breaker, and like every background loop it logs a failure and carries on.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from functools import partial
from typing import Any

from conveyor.app import App
from conveyor.db.event_feed import EventFeed, NewTaskRow, TaskEventRow, WorkerRow
from conveyor.errors import DatabaseError
from conveyor.resilience.circuit_breaker import CircuitBreaker, CircuitOpen

log = logging.getLogger("conveyor.api.events")

#: Most missed events sent to a client that resumes; beyond that it gets a ``gap`` event.
BACKFILL_MAX = 10_000
#: Rows read per source per poll.
PAGE = 1_000

Cursor = tuple[int, int]  # (last task event id, last task id)

_CURSOR = re.compile(r"(\d{1,19})\.(\d{1,19})")


def parse_cursor(text: str) -> Cursor | None:
    """The cursor in an SSE id (``"123.456"``); None if it is not one this API sent."""
    found = _CURSOR.fullmatch(text.strip())
    if found is None:
        return None
    event_id, task_id = int(found[1]), int(found[2])
    if event_id >= 2**63 or task_id >= 2**63:
        return None
    return event_id, task_id


def format_cursor(cursor: Cursor) -> str:
    return f"{cursor[0]}.{cursor[1]}"


@dataclass(frozen=True)
class StreamEvent:
    kind: str  # "task.succeeded", "task.enqueued", "worker.lost", ...
    queues: frozenset[str]  # what the queue filter matches against
    data: dict[str, Any]
    cursor: Cursor
    at: datetime | None = None


@dataclass(frozen=True)
class StreamEnd:
    """The last thing a subscription yields: why its stream ends."""

    reason: str  # "dropped" (too slow), "shutdown" or "disconnected" (the client went away)


class TooManySubscribers(Exception):
    """This process already serves its maximum number of streams (0: it is shutting down)."""

    def __init__(self, limit: int) -> None:
        message = f"this server already serves {limit} event streams" if limit else "this server is shutting down"
        super().__init__(message)
        self.limit = limit


class IdTracker:
    """The highest id seen of one table, and the ids skipped over that may still commit (gaps).

    Pure bookkeeping (no I/O) so its rules can be tested exactly: ids above ``high`` are new; ids
    skipped over become gaps for ``grace_s`` seconds; at most ``max_gaps`` are remembered."""

    def __init__(
        self, high: int, *, grace_s: float = 5.0, max_gaps: int = 10_000, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.high = high
        self.grace_s = grace_s
        self.max_gaps = max_gaps
        self._clock = clock
        self._gaps: dict[int, float] = {}  # id -> when to stop looking for it

    def advance(self, ids: Sequence[int]) -> None:
        """Ids read above ``high`` (ascending): move past them, remembering what was skipped."""
        deadline = self._clock() + self.grace_s
        for found in ids:
            if found <= self.high:
                continue
            skipped_from = max(self.high + 1, found - self.max_gaps)
            for missing in range(skipped_from, found):
                self._gaps[missing] = deadline
            self.high = found
        if len(self._gaps) > self.max_gaps:
            for old in sorted(self._gaps)[: len(self._gaps) - self.max_gaps]:
                del self._gaps[old]

    def filled(self, ids: Iterable[int]) -> list[int]:
        """Of ``ids`` read among the gaps, those that were still awaited (each is reported once)."""
        return [i for i in ids if self._gaps.pop(i, None) is not None]

    def gaps(self) -> list[int]:
        """The ids still awaited, after forgetting those whose grace has run out."""
        now = self._clock()
        for expired in [i for i, deadline in self._gaps.items() if deadline <= now]:
            del self._gaps[expired]
        return sorted(self._gaps)


class Subscription:
    """One client's view of the stream: a bounded queue, filtered by queue name and event kind."""

    def __init__(self, queues: frozenset[str] | None, kinds: frozenset[str] | None, size: int) -> None:
        self.queues = queues
        self.kinds = kinds
        self._items: asyncio.Queue[StreamEvent | StreamEnd] = asyncio.Queue(maxsize=size)
        self.ended: StreamEnd | None = None

    def matches(self, event: StreamEvent) -> bool:
        if self.queues is not None and not (event.queues & self.queues):
            return False
        if self.kinds is not None:
            family = event.kind.partition(".")[0]
            return event.kind in self.kinds or family in self.kinds
        return True

    def offer(self, event: StreamEvent) -> None:
        if self.ended is not None or not self.matches(event):
            return
        try:
            self._items.put_nowait(event)
        except asyncio.QueueFull:
            self.end(StreamEnd("dropped"))

    def end(self, reason: StreamEnd) -> None:
        """End the stream: after what is queued (``shutdown``), or at once, discarding the backlog
        (``dropped``: the client resumes from the database with its Last-Event-ID; ``disconnected``)."""
        if self.ended is not None:
            return
        self.ended = reason
        if reason.reason != "shutdown":
            while not self._items.empty():
                self._items.get_nowait()
        if self._items.full():
            self._items.get_nowait()  # room for the marker; the client resumes from its Last-Event-ID
        self._items.put_nowait(reason)

    async def next(self, timeout_s: float) -> StreamEvent | StreamEnd | None:
        """The next event, or None when ``timeout_s`` seconds pass without one (time for a keep-alive)."""
        try:
            return await asyncio.wait_for(self._items.get(), timeout_s)
        except TimeoutError:
            return None


@dataclass
class _WorkerView:
    rows: dict[str, WorkerRow] = field(default_factory=dict)
    known: bool = False  # False until the first read: the registry as found is not "news"


class EventHub:
    """The per-process poller and its subscribers."""

    def __init__(
        self,
        conveyor_app: App,
        *,
        breaker: CircuitBreaker | None = None,
        poll_interval_s: float = 0.5,
        queue_size: int = 1_000,
        worker_stale_after_s: float = 30.0,
        gap_grace_s: float = 5.0,
        keepalive_s: float = 15.0,
        max_subscribers: int = 1_000,
    ) -> None:
        self.conveyor_app = conveyor_app
        #: Seconds of silence after which a stream sends a keep-alive comment.
        self.keepalive_s = keepalive_s
        self.breaker = breaker
        self.poll_interval_s = poll_interval_s
        self.queue_size = queue_size
        self.worker_stale_after_s = worker_stale_after_s
        self.gap_grace_s = gap_grace_s
        #: Streams one process serves at once; more are refused (each holds a connection and a queue).
        self.max_subscribers = max_subscribers
        self._subscribers: set[Subscription] = set()
        self._poller: asyncio.Task[None] | None = None
        self._events: IdTracker | None = None
        self._tasks: IdTracker | None = None
        self._workers = _WorkerView()
        self._start_lock = asyncio.Lock()
        self._closed = False

    @property
    def cursor(self) -> Cursor | None:
        if self._events is None or self._tasks is None:
            return None
        return self._events.high, self._tasks.high

    @property
    def subscribers(self) -> int:
        return len(self._subscribers)

    def _feed(self) -> EventFeed:
        return EventFeed(self.conveyor_app.runtime().engine)

    async def _guarded(self, call: Callable[[], Any]) -> Any:
        if self.breaker is None:
            return await call()
        return await self.breaker.call(call)

    # -- subscribing -----------------------------------------------------------------------------

    async def subscribe(
        self, *, queues: frozenset[str] | None = None, kinds: frozenset[str] | None = None
    ) -> Subscription:
        """A new subscription receiving every matching event from now on. Raises ``DatabaseError`` (or
        ``CircuitOpen``) when the stream cannot start."""
        if self._closed:
            raise TooManySubscribers(0)  # shutting down: no new streams
        if len(self._subscribers) >= self.max_subscribers:
            raise TooManySubscribers(self.max_subscribers)
        async with self._start_lock:
            if self._poller is None or self._poller.done():
                high = await self._guarded(lambda: self._feed().high_water())
                self._events = IdTracker(high[0], grace_s=self.gap_grace_s)
                self._tasks = IdTracker(high[1], grace_s=self.gap_grace_s)
                self._workers = _WorkerView()
                self._poller = asyncio.create_task(self._run(), name="conveyor-event-poller")
            subscription = Subscription(queues, kinds, self.queue_size)
            self._subscribers.add(subscription)
        return subscription

    async def unsubscribe(self, subscription: Subscription) -> None:
        # Under the start lock: a subscriber arriving while the last one leaves must not be handed the
        # poller being stopped.
        async with self._start_lock:
            self._subscribers.discard(subscription)
            if not self._subscribers:
                await self._stop_poller()

    async def backfill(self, subscription: Subscription, since: Cursor, upto: Cursor) -> list[StreamEvent]:
        """What ``subscription`` missed in (``since``, ``upto``], oldest first, up to BACKFILL_MAX;
        past that, a final ``gap`` event says how far it got (the client may resume from there)."""
        feed = self._feed()
        found: list[StreamEvent] = []
        events_after, tasks_after = since
        while len(found) < BACKFILL_MAX and (events_after < upto[0] or tasks_after < upto[1]):
            events: list[TaskEventRow] = []
            tasks: list[NewTaskRow] = []
            if events_after < upto[0]:
                events = await self._guarded(partial(feed.events, events_after, PAGE, upto[0]))
            if tasks_after < upto[1]:
                tasks = await self._guarded(partial(feed.new_tasks, tasks_after, PAGE, upto[1]))
            if not events and not tasks:
                break
            batch = _merge(events, tasks, (events_after, tasks_after))
            found.extend(e for e in batch if subscription.matches(e))
            events_after = events[-1].id if len(events) == PAGE else upto[0]
            tasks_after = tasks[-1].id if len(tasks) == PAGE else upto[1]
        if events_after < upto[0] or tasks_after < upto[1]:
            reached = (events_after, tasks_after)
            detail = {"reason": f"more than {BACKFILL_MAX} events were missed", "resume_from": format_cursor(reached)}
            found.append(StreamEvent("gap", frozenset(), detail, reached))
        return found

    # -- shutting down ---------------------------------------------------------------------------

    def end_streams(self) -> None:
        """End every stream now (each gets a final ``shutdown`` event) and refuse new ones.

        For the start of a server's shutdown: a server waits for open responses to finish before it
        runs the application's shutdown, and a stream never finishes by itself. Not a coroutine, so a
        signal handler can call it; the poller stops with the last stream, or at :meth:`close`."""
        self._closed = True
        for subscription in list(self._subscribers):
            subscription.end(StreamEnd("shutdown"))

    async def close(self) -> None:
        """End every stream (each gets a final ``shutdown`` event) and stop polling."""
        self.end_streams()
        self._subscribers.clear()
        await self._stop_poller()

    async def _stop_poller(self) -> None:
        poller, self._poller = self._poller, None
        if poller is not None and not poller.done():
            poller.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await poller

    # -- polling ---------------------------------------------------------------------------------

    async def _run(self) -> None:
        failures = 0
        while True:
            try:
                more = await self.poll_once()
                failures = 0
            except CircuitOpen as exc:
                await asyncio.sleep(min(max(exc.retry_after_s, self.poll_interval_s), 5.0))
                continue
            except DatabaseError as exc:
                failures += 1
                if failures == 1 or failures % 60 == 0:
                    log.warning("event stream: polling failed (%s); retrying", exc)
                await asyncio.sleep(min(self.poll_interval_s * failures, 5.0))
                continue
            except Exception:
                # A bug, not the database: log it and keep the stream alive (a dead poller is a silent
                # stream for every client).
                log.exception("event stream: unexpected error while polling; retrying")
                await asyncio.sleep(self.poll_interval_s)
                continue
            if not more:
                await asyncio.sleep(self.poll_interval_s)

    async def poll_once(self) -> bool:
        """Read what is new, fan it out; True when a page came back full (poll again at once)."""
        assert self._events is not None and self._tasks is not None
        feed = self._feed()
        event_tracker, task_tracker = self._events, self._tasks
        start: Cursor = (event_tracker.high, task_tracker.high)
        events: list[TaskEventRow] = await self._guarded(lambda: feed.events(event_tracker.high, PAGE))
        tasks: list[NewTaskRow] = await self._guarded(lambda: feed.new_tasks(task_tracker.high, PAGE))
        event_gaps, task_gaps = event_tracker.gaps(), task_tracker.gaps()
        late_events: list[TaskEventRow] = []
        late_tasks: list[NewTaskRow] = []
        if event_gaps:
            late_events = await self._guarded(lambda: feed.events_by_id(event_gaps))
        if task_gaps:
            late_tasks = await self._guarded(lambda: feed.new_tasks_by_id(task_gaps))
        workers: list[WorkerRow] = await self._guarded(lambda: feed.workers(self.worker_stale_after_s))

        event_tracker.advance([e.id for e in events])
        task_tracker.advance([t.id for t in tasks])
        filled_events = set(event_tracker.filled(e.id for e in late_events))
        filled_tasks = set(task_tracker.filled(t.id for t in late_tasks))
        late = _merge(
            [e for e in late_events if e.id in filled_events],
            [t for t in late_tasks if t.id in filled_tasks],
            start,
            fixed=True,
        )
        batch = [*late, *_merge(events, tasks, start)]
        batch.extend(self._worker_changes(workers, (event_tracker.high, task_tracker.high)))
        for event in batch:
            for subscription in list(self._subscribers):
                subscription.offer(event)
        return len(events) == PAGE or len(tasks) == PAGE

    def _worker_changes(self, rows: list[WorkerRow], cursor: Cursor) -> list[StreamEvent]:
        view = self._workers
        current = {row.id: row for row in rows}
        changes: list[StreamEvent] = []
        if view.known:
            for worker_id, row in current.items():
                before = view.rows.get(worker_id)
                kind = _worker_change(before, row)
                if kind is not None:
                    changes.append(StreamEvent(kind, frozenset(row.queues), _worker_data(row), cursor))
        view.rows = current
        view.known = True
        return changes


def _worker_change(before: WorkerRow | None, now: WorkerRow) -> str | None:
    if before is None:
        return None if now.state == "stopped" else "worker.started"
    if now.state == "stopped" and before.state != "stopped":
        return "worker.stopped"
    if now.state == "stopped":
        return None
    if before.alive and not now.alive:
        return "worker.lost"
    if (before.state, before.paused, before.drain_requested, before.alive) != (
        now.state,
        now.paused,
        now.drain_requested,
        now.alive,
    ):
        return "worker.changed"
    return None


def _worker_data(row: WorkerRow) -> dict[str, Any]:
    return {
        "worker_id": row.id,
        "name": row.name,
        "host": row.host,
        "pid": row.pid,
        "queues": list(row.queues),
        "state": row.state,
        "paused": row.paused,
        "drain_requested": row.drain_requested,
        "alive": row.alive,
        "last_heartbeat_at": row.last_heartbeat_at.isoformat(),
        "stopped_at": None if row.stopped_at is None else row.stopped_at.isoformat(),
    }


def _merge(
    events: Sequence[TaskEventRow], tasks: Sequence[NewTaskRow], start: Cursor, *, fixed: bool = False
) -> list[StreamEvent]:
    """Both sources as one list, each item carrying the cursor up to which everything has then been
    sent (``fixed``: late arrivals, which do not move it). A merge, not a sort: each source keeps its
    id order (so what was sent of each is always a prefix), and between them the earlier time goes
    first."""
    merged: list[StreamEvent] = []
    events_high, tasks_high = start
    e = t = 0
    while e < len(events) or t < len(tasks):
        take_event = t >= len(tasks) or (e < len(events) and events[e].at <= tasks[t].created_at)
        if take_event:
            row = events[e]
            e += 1
            if not fixed:
                events_high = max(events_high, row.id)
            merged.append(_task_event(row, (events_high, tasks_high)))
        else:
            new = tasks[t]
            t += 1
            if not fixed:
                tasks_high = max(tasks_high, new.id)
            merged.append(_enqueued(new, (events_high, tasks_high)))
    return merged


def _task_event(row: TaskEventRow, cursor: Cursor) -> StreamEvent:
    data = {
        "event_id": row.id,
        "task_id": row.task_id,
        "name": row.name,
        "queue": row.queue,
        "state": row.state,
        "attempt": row.attempt,
        "worker_id": row.worker_id,
        "at": row.at.isoformat(),
        "detail": row.detail,
    }
    return StreamEvent(f"task.{row.kind}", frozenset({row.queue}), data, cursor, row.at)


def _enqueued(row: NewTaskRow, cursor: Cursor) -> StreamEvent:
    data = {
        "task_id": row.id,
        "name": row.name,
        "queue": row.queue,
        "state": row.state,
        "priority": row.priority,
        "at": row.created_at.isoformat(),
    }
    return StreamEvent("task.enqueued", frozenset({row.queue}), data, cursor, row.created_at)
