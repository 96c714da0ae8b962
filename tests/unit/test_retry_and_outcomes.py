from __future__ import annotations

import random

import pytest

from conveyor.core.outcomes import ErrorInfo, cap_traceback, next_after_failure
from conveyor.core.retry import RetryPolicy
from conveyor.core.states import TaskState
from conveyor.errors import NonRetryable, Retry


def test_delay__grows_exponentially_then_caps() -> None:
    policy = RetryPolicy(base_s=1, factor=2, cap_s=10, jitter=0)
    assert [policy.delay_s(n) for n in range(1, 7)] == [1, 2, 4, 8, 10, 10]


def test_delay__jitter_stays_within_bounds() -> None:
    policy = RetryPolicy(base_s=2, factor=3, cap_s=1000, jitter=0.25)
    rng = random.Random(7)
    for attempt in range(1, 6):
        low, high = policy.bounds_s(attempt)
        samples = [policy.delay_s(attempt, rng) for _ in range(500)]
        assert all(low <= s <= high for s in samples)
        # jitter really spreads values (not a constant)
        assert max(samples) - min(samples) > (high - low) * 0.5


def test_delay__huge_attempt_does_not_overflow() -> None:
    assert RetryPolicy(base_s=1, factor=10, cap_s=60, jitter=0).delay_s(10_000) == 60


@pytest.mark.parametrize("kwargs", [{"base_s": -1}, {"factor": 0.5}, {"jitter": 1.5}, {"cap_s": -2}])
def test_policy__rejects_nonsense(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        RetryPolicy(**kwargs)


def _error(exc: BaseException) -> ErrorInfo:
    try:
        raise exc
    except BaseException as caught:
        return ErrorInfo.from_exception(caught, 16384)


def test_next__retries_while_attempts_remain() -> None:
    policy = RetryPolicy(base_s=5, jitter=0)
    assert next_after_failure(_error(ValueError("x")), 1, 3, policy) == (TaskState.SCHEDULED, 5)
    assert next_after_failure(_error(ValueError("x")), 3, 3, policy) == (TaskState.DEAD, None)


def test_next__non_retryable_goes_dead_at_once() -> None:
    assert next_after_failure(_error(NonRetryable("no")), 1, 10, RetryPolicy()) == (TaskState.DEAD, None)


def test_next__retry_exception_uses_its_delay() -> None:
    assert next_after_failure(_error(Retry(delay=0)), 1, 3, RetryPolicy()) == (TaskState.QUEUED, 0)
    assert next_after_failure(_error(Retry(delay=7.5)), 2, 3, RetryPolicy()) == (TaskState.SCHEDULED, 7.5)


def test_next__retry_on_and_dont_retry_on() -> None:
    policy = RetryPolicy(jitter=0, retry_on=(OSError,), dont_retry_on=(FileNotFoundError,))
    assert next_after_failure(_error(ConnectionError()), 1, 5, policy)[0] == TaskState.SCHEDULED
    assert next_after_failure(_error(FileNotFoundError()), 1, 5, policy)[0] == TaskState.DEAD
    assert next_after_failure(_error(ValueError()), 1, 5, policy)[0] == TaskState.DEAD


def test_traceback__cap_keeps_the_end() -> None:
    text = "".join(f"line {i}\n" for i in range(10_000)) + "ValueError: the real error\n"
    capped = cap_traceback(text, 1000)
    assert len(capped.encode()) <= 1000
    assert capped.endswith("ValueError: the real error\n")
    assert capped.startswith("[... traceback cut ...]")
