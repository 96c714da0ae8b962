"""The circuit breaker's state machine, on a fake monotonic clock (no sleeping, no I/O)."""

from __future__ import annotations

import asyncio

import pytest

from conveyor.errors import DatabaseError, TaskNotFound
from conveyor.resilience.circuit_breaker import BreakerRegistry, BreakerState, CircuitBreaker, CircuitOpen


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def breaker(clock: FakeClock, **options: object) -> CircuitBreaker:
    settings: dict[str, object] = {"failure_threshold": 3, "reset_timeout_s": 10.0, **options}
    return CircuitBreaker("db", clock=clock, **settings)  # type: ignore[arg-type]


def fail(b: CircuitBreaker, times: int = 1) -> None:
    for _ in range(times):
        b.acquire().failure(DatabaseError("down"))


def test_closed__opens_after_threshold_failures_in_a_row() -> None:
    clock = FakeClock()
    b = breaker(clock)
    fail(b, 2)
    assert b.state == BreakerState.CLOSED
    fail(b)
    assert b.state == BreakerState.OPEN
    snap = b.snapshot()
    assert snap.times_opened == 1
    assert snap.total_failures == 3
    assert snap.last_error == "DatabaseError: down"


def test_closed__a_success_resets_the_failures_in_a_row() -> None:
    b = breaker(FakeClock())
    fail(b, 2)
    b.acquire().success()
    fail(b, 2)
    assert b.state == BreakerState.CLOSED
    assert b.snapshot().consecutive_failures == 2


def test_open__refuses_at_once_with_the_time_left() -> None:
    clock = FakeClock()
    b = breaker(clock)
    fail(b, 3)
    clock.advance(4)
    with pytest.raises(CircuitOpen) as refused:
        b.acquire()
    assert refused.value.name == "db"
    assert refused.value.retry_after_s == pytest.approx(6.0)
    assert b.snapshot().total_rejected == 1
    assert b.snapshot().retry_after_s == pytest.approx(6.0)


def test_open__becomes_half_open_after_the_reset_timeout() -> None:
    clock = FakeClock()
    b = breaker(clock)
    fail(b, 3)
    clock.advance(9.999)
    assert b.state == BreakerState.OPEN
    clock.advance(0.001)
    assert b.state == BreakerState.HALF_OPEN
    assert b.retry_after_s() == 0.0


def test_half_open__admits_one_trial_and_refuses_the_rest() -> None:
    clock = FakeClock()
    b = breaker(clock)
    fail(b, 3)
    clock.advance(10)
    trial = b.acquire()
    assert trial.trial
    with pytest.raises(CircuitOpen) as refused:
        b.acquire()
    assert 0 < refused.value.retry_after_s <= 1.0  # "ask again shortly", not a whole reset timeout


def test_half_open__a_successful_trial_closes() -> None:
    clock = FakeClock()
    b = breaker(clock)
    fail(b, 3)
    clock.advance(10)
    b.acquire().success()
    assert b.state == BreakerState.CLOSED
    assert b.snapshot().consecutive_failures == 0
    fail(b, 2)
    assert b.state == BreakerState.CLOSED  # the count started again from zero


def test_half_open__a_failed_trial_opens_again_for_a_full_timeout() -> None:
    clock = FakeClock()
    b = breaker(clock)
    fail(b, 3)
    clock.advance(10)
    b.acquire().failure("still down")
    assert b.state == BreakerState.OPEN
    snap = b.snapshot()
    assert snap.times_opened == 2
    assert snap.retry_after_s == pytest.approx(10.0)
    assert snap.last_error == "still down"


def test_half_open__a_released_trial_frees_the_slot() -> None:
    clock = FakeClock()
    b = breaker(clock)
    fail(b, 3)
    clock.advance(10)
    b.acquire().release()
    assert b.state == BreakerState.HALF_OPEN
    assert b.acquire().trial


def test_half_open__max_calls_admits_that_many_trials() -> None:
    clock = FakeClock()
    b = breaker(clock, half_open_max_calls=2)
    fail(b, 3)
    clock.advance(10)
    first, second = b.acquire(), b.acquire()
    with pytest.raises(CircuitOpen):
        b.acquire()
    first.success()
    assert b.state == BreakerState.CLOSED
    second.failure()  # a trial reporting after the breaker closed changes nothing
    assert b.state == BreakerState.CLOSED


def test_a_permit_reports_once() -> None:
    b = breaker(FakeClock())
    permit = b.acquire()
    permit.failure()
    permit.failure()
    permit.success()
    assert b.snapshot().total_failures == 1
    assert b.snapshot().consecutive_failures == 1


def test_failures_admitted_before_opening_do_not_extend_the_open_period() -> None:
    clock = FakeClock()
    b = breaker(clock)
    late = [b.acquire() for _ in range(5)]
    for permit in late[:3]:
        permit.failure()
    assert b.state == BreakerState.OPEN
    clock.advance(5)
    for permit in late[3:]:
        permit.failure()
    assert b.snapshot().retry_after_s == pytest.approx(5.0)
    assert b.snapshot().times_opened == 1


def test_reset__closes_at_once() -> None:
    b = breaker(FakeClock())
    fail(b, 3)
    b.reset()
    assert b.state == BreakerState.CLOSED
    assert b.acquire().trial is False


async def test_call__records_outcomes_by_kind_of_error() -> None:
    clock = FakeClock()
    b = breaker(clock, is_failure=lambda exc: isinstance(exc, DatabaseError))

    async def answers() -> str:
        return "ok"

    async def not_found() -> None:
        raise TaskNotFound(1)

    async def down() -> None:
        raise DatabaseError("down")

    assert await b.call(answers) == "ok"
    for _ in range(5):
        with pytest.raises(TaskNotFound):
            await b.call(not_found)  # the database answered: not a failure
    assert b.state == BreakerState.CLOSED
    for _ in range(3):
        with pytest.raises(DatabaseError):
            await b.call(down)
    assert b.state == BreakerState.OPEN
    with pytest.raises(CircuitOpen):
        await b.call(answers)


async def test_call__a_cancelled_trial_gives_its_slot_back() -> None:
    clock = FakeClock()
    b = breaker(clock)
    fail(b, 3)
    clock.advance(10)

    async def hangs() -> None:
        await asyncio.Event().wait()

    running = asyncio.create_task(b.call(hangs))
    await asyncio.sleep(0)
    running.cancel()
    with pytest.raises(asyncio.CancelledError):
        await running
    assert b.state == BreakerState.HALF_OPEN
    assert b.acquire().trial


def test_options_are_checked() -> None:
    with pytest.raises(ValueError, match="failure_threshold"):
        CircuitBreaker("x", failure_threshold=0)
    with pytest.raises(ValueError, match="reset_timeout_s"):
        CircuitBreaker("x", reset_timeout_s=0)
    with pytest.raises(ValueError, match="half_open_max_calls"):
        CircuitBreaker("x", half_open_max_calls=0)


def test_registry__one_breaker_per_name_sorted_snapshots() -> None:
    clock = FakeClock()
    registry = BreakerRegistry(clock=clock)
    redis = registry.get_or_create("redis", failure_threshold=1)
    database = registry.get_or_create("database")
    assert registry.get_or_create("redis", failure_threshold=99) is redis
    assert redis.failure_threshold == 1
    assert registry.get("database") is database
    assert registry.get("nope") is None
    assert [s.name for s in registry.snapshots()] == ["database", "redis"]
    redis.acquire().failure()
    assert registry.get_or_create("redis").state == BreakerState.OPEN
