"""The event stream's bookkeeping: ids that commit out of order, cursors, subscriptions (no I/O)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from conveyor.api.event_hub import (
    IdTracker,
    StreamEnd,
    StreamEvent,
    Subscription,
    _merge,
    format_cursor,
    parse_cursor,
)
from conveyor.db.event_feed import NewTaskRow, TaskEventRow


class FakeClock:
    def __init__(self) -> None:
        self.now = 50.0

    def __call__(self) -> float:
        return self.now


def test_tracker__skipped_ids_are_awaited_then_forgotten() -> None:
    clock = FakeClock()
    tracker = IdTracker(10, grace_s=5.0, clock=clock)
    tracker.advance([11, 14, 15])
    assert tracker.high == 15
    assert tracker.gaps() == [12, 13]
    assert tracker.filled([13, 99]) == [13]  # 13 committed late; 99 was never awaited
    assert tracker.filled([13]) == []  # reported once
    clock.now += 5.0
    assert tracker.gaps() == []  # 12 never came (a rollback): forgotten


def test_tracker__ignores_ids_already_passed_and_bounds_the_gaps() -> None:
    tracker = IdTracker(100, max_gaps=3, clock=FakeClock())
    tracker.advance([50, 100])
    assert tracker.high == 100
    assert tracker.gaps() == []
    tracker.advance([1_000_000])
    assert tracker.gaps() == [999_997, 999_998, 999_999]


def test_cursor__round_trip_and_rejects_anything_else() -> None:
    assert parse_cursor(format_cursor((12, 345))) == (12, 345)
    assert parse_cursor(" 0.0 ") == (0, 0)
    for bad in [
        "",
        "12",
        "1.2.3",
        "a.b",
        "-1.2",
        "1;DROP TABLE x.2",
        "99999999999999999999.1",
        "9223372036854775808.1",
    ]:
        assert parse_cursor(bad) is None, bad


def _event(event_id: int, at: datetime, queue: str = "q") -> TaskEventRow:
    return TaskEventRow(event_id, event_id * 10, "claimed", at, 1, None, None, queue, "add", "running")


def _task(task_id: int, at: datetime, queue: str = "q") -> NewTaskRow:
    return NewTaskRow(task_id, "add", queue, "queued", 0, at)


def test_merge__keeps_each_source_in_id_order_and_moves_the_cursor_by_prefix() -> None:
    t0 = datetime(2030, 1, 1, tzinfo=UTC)
    # Event 8 has a later time than event 9 (its transaction started earlier): id order wins.
    events = [_event(8, t0 + timedelta(seconds=3)), _event(9, t0 + timedelta(seconds=1))]
    tasks = [_task(70, t0 + timedelta(seconds=2)), _task(71, t0 + timedelta(seconds=4))]
    merged = _merge(events, tasks, (7, 69))
    assert [(e.kind, e.cursor) for e in merged] == [
        ("task.enqueued", (7, 70)),
        ("task.claimed", (8, 70)),
        ("task.claimed", (9, 70)),
        ("task.enqueued", (9, 71)),
    ]
    late = _merge([_event(5, t0)], [], (9, 71), fixed=True)
    assert late[0].cursor == (9, 71)  # a late arrival does not move the cursor


def test_subscription__filters_by_queue_and_kind() -> None:
    event = StreamEvent("task.succeeded", frozenset({"emails"}), {}, (1, 1))
    worker = StreamEvent("worker.lost", frozenset({"emails", "reports"}), {}, (1, 1))
    assert Subscription(None, None, 10).matches(event)
    assert Subscription(frozenset({"emails"}), None, 10).matches(event)
    assert not Subscription(frozenset({"other"}), None, 10).matches(event)
    assert Subscription(frozenset({"reports"}), frozenset({"worker"}), 10).matches(worker)
    assert Subscription(None, frozenset({"task.succeeded"}), 10).matches(event)
    assert not Subscription(None, frozenset({"task.failed"}), 10).matches(event)
    assert not Subscription(None, frozenset({"worker"}), 10).matches(event)


async def test_subscription__a_slow_reader_is_dropped_with_a_final_event() -> None:
    subscription = Subscription(None, None, 3)
    for i in range(4):
        subscription.offer(StreamEvent("task.enqueued", frozenset({"q"}), {"i": i}, (0, i)))
    assert subscription.ended == StreamEnd("dropped")
    assert await subscription.next(0.1) == StreamEnd("dropped")  # the backlog was discarded
    subscription.offer(StreamEvent("task.enqueued", frozenset({"q"}), {}, (0, 9)))
    assert await subscription.next(0.01) is None  # nothing more after the end


async def test_subscription__shutdown_keeps_what_is_queued() -> None:
    subscription = Subscription(None, None, 2)
    first = StreamEvent("task.enqueued", frozenset({"q"}), {}, (0, 1))
    subscription.offer(first)
    subscription.end(StreamEnd("shutdown"))
    assert await subscription.next(0.1) == first
    assert await subscription.next(0.1) == StreamEnd("shutdown")


@pytest.mark.parametrize("reason", ["dropped", "shutdown", "disconnected"])
async def test_subscription__end_fits_even_when_full(reason: str) -> None:
    subscription = Subscription(None, None, 1)
    subscription.offer(StreamEvent("task.enqueued", frozenset({"q"}), {}, (0, 1)))
    subscription.end(StreamEnd(reason))
    items = [await subscription.next(0.05), await subscription.next(0.05)]
    assert StreamEnd(reason) in items
