"""A small async circuit breaker, and a registry of named breakers.

A breaker stands between callers and a dependency that can go away (the database, Redis). While the
dependency works the breaker is **closed** and calls pass. After ``failure_threshold`` failures in a
row it **opens**: calls are refused at once with :class:`CircuitOpen` instead of each waiting for a
connect timeout, so requests fail fast rather than pile up. Once ``reset_timeout_s`` has passed it is
**half-open**: up to ``half_open_max_calls`` trial calls go through (everyone else is still refused);
a trial that succeeds closes the breaker, one that fails opens it again for another ``reset_timeout_s``.

Time is read from a monotonic clock (injectable, so tests move it by hand); nothing here sleeps or
schedules anything, so the state machine is plain synchronous logic and safe to share between tasks.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from enum import StrEnum
from typing import TypeVar

from conveyor.errors import ConveyorError

__all__ = [
    "BreakerRegistry",
    "BreakerSnapshot",
    "BreakerState",
    "CircuitBreaker",
    "CircuitOpen",
    "Permit",
]

T = TypeVar("T")

#: Longest error text a breaker remembers (it is shown to operators; never a whole traceback).
_ERROR_TEXT_LIMIT = 300


class BreakerState(StrEnum):
    CLOSED = "closed"  # calls pass; failures are counted
    OPEN = "open"  # calls are refused until the reset timeout has passed
    HALF_OPEN = "half_open"  # a few trial calls pass; their outcome closes or re-opens the breaker


class CircuitOpen(ConveyorError):
    """A call was refused because the breaker ``name`` is open; try again in ``retry_after_s``."""

    def __init__(self, name: str, retry_after_s: float) -> None:
        super().__init__(f"circuit breaker {name!r} is open; retry in {retry_after_s:.1f} s")
        self.name = name
        self.retry_after_s = retry_after_s


@dataclass(frozen=True)
class BreakerSnapshot:
    """What a breaker looks like at one moment (for the API and logs)."""

    name: str
    state: BreakerState
    failure_threshold: int
    reset_timeout_s: float
    consecutive_failures: int
    total_calls: int
    total_failures: int
    total_rejected: int
    times_opened: int
    since_change_s: float  # seconds in the current state
    retry_after_s: float | None  # when open: seconds until trial calls are let through
    last_error: str | None


class Permit:
    """One admitted call. Report its outcome exactly once with :meth:`success` or :meth:`failure`; a
    permit dropped without an outcome (the caller was cancelled) must be given back with :meth:`release`
    so a half-open breaker does not wait forever for a trial that will never report."""

    __slots__ = ("_breaker", "_done", "trial")

    def __init__(self, breaker: CircuitBreaker, trial: bool) -> None:
        self._breaker = breaker
        self._done = False
        #: True when this call is a half-open trial: its outcome decides the breaker's state.
        self.trial = trial

    def success(self) -> None:
        if not self._done:
            self._done = True
            self._breaker._on_success(self.trial)

    def failure(self, error: BaseException | str | None = None) -> None:
        if not self._done:
            self._done = True
            self._breaker._on_failure(self.trial, error)

    def release(self) -> None:
        """No outcome (e.g. cancelled): neither a success nor a failure."""
        if not self._done:
            self._done = True
            self._breaker._on_release(self.trial)


class CircuitBreaker:
    """Closed, open, half-open; see the module docstring.

    ``failure_threshold``: failures in a row that open the breaker (at least 1).
    ``reset_timeout_s``: seconds an open breaker refuses calls before letting trials through.
    ``half_open_max_calls``: trial calls admitted at once while half-open.
    ``is_failure``: which exceptions count against the dependency (default: every ``Exception``);
    the others pass through as a success of the dependency (e.g. "task not found" is the database
    answering). ``clock``: a monotonic clock in seconds.
    """

    def __init__(
        self,
        name: str,
        *,
        failure_threshold: int = 5,
        reset_timeout_s: float = 10.0,
        half_open_max_calls: int = 1,
        is_failure: Callable[[BaseException], bool] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if failure_threshold < 1:
            raise ValueError("failure_threshold must be at least 1")
        if not reset_timeout_s > 0:
            raise ValueError("reset_timeout_s must be positive")
        if half_open_max_calls < 1:
            raise ValueError("half_open_max_calls must be at least 1")
        self.name = name
        self.failure_threshold = failure_threshold
        self.reset_timeout_s = reset_timeout_s
        self.half_open_max_calls = half_open_max_calls
        self.is_failure = is_failure or (lambda exc: isinstance(exc, Exception))
        self._clock = clock
        # Several event loops may share a registry (a server thread and a test's loop); every state
        # change is a few assignments under this lock, never an await.
        self._lock = threading.Lock()
        self._state = BreakerState.CLOSED
        self._changed_at = clock()
        self._consecutive_failures = 0
        self._trials_in_flight = 0
        self._total_calls = 0
        self._total_failures = 0
        self._total_rejected = 0
        self._times_opened = 0
        self._last_error: str | None = None

    # -- reading ---------------------------------------------------------------------------------

    @property
    def state(self) -> BreakerState:
        with self._lock:
            self._advance()
            return self._state

    def retry_after_s(self) -> float:
        """Seconds until an open breaker lets a trial through (0 when it would now)."""
        with self._lock:
            self._advance()
            return self._retry_after()

    def snapshot(self) -> BreakerSnapshot:
        with self._lock:
            self._advance()
            return BreakerSnapshot(
                name=self.name,
                state=self._state,
                failure_threshold=self.failure_threshold,
                reset_timeout_s=self.reset_timeout_s,
                consecutive_failures=self._consecutive_failures,
                total_calls=self._total_calls,
                total_failures=self._total_failures,
                total_rejected=self._total_rejected,
                times_opened=self._times_opened,
                since_change_s=max(0.0, self._clock() - self._changed_at),
                retry_after_s=self._retry_after() if self._state == BreakerState.OPEN else None,
                last_error=self._last_error,
            )

    # -- calling ---------------------------------------------------------------------------------

    def acquire(self) -> Permit:
        """Admit one call or raise :class:`CircuitOpen`. Report the outcome on the permit."""
        with self._lock:
            self._advance()
            if self._state == BreakerState.CLOSED:
                self._total_calls += 1
                return Permit(self, trial=False)
            if self._state == BreakerState.HALF_OPEN and self._trials_in_flight < self.half_open_max_calls:
                self._trials_in_flight += 1
                self._total_calls += 1
                return Permit(self, trial=True)
            self._total_rejected += 1
            # Half-open with its trials taken: ask again in a moment, not after a whole reset timeout.
            wait_s = self._retry_after() if self._state == BreakerState.OPEN else min(1.0, self.reset_timeout_s)
            raise CircuitOpen(self.name, wait_s)

    async def call(self, func: Callable[[], Awaitable[T]]) -> T:
        """Run ``func()`` through the breaker: refused at once when open, its outcome recorded."""
        permit = self.acquire()
        try:
            result = await func()
        except BaseException as exc:
            if isinstance(exc, Exception) and self.is_failure(exc):
                permit.failure(exc)
            elif isinstance(exc, Exception):
                permit.success()  # the dependency answered; the answer was an error of the caller's
            else:
                permit.release()  # cancelled or exiting: says nothing about the dependency
            raise
        permit.success()
        return result

    def reset(self) -> None:
        """Close the breaker now and forget the failures in a row (an operator's override)."""
        with self._lock:
            self._to(BreakerState.CLOSED)

    # -- transitions (called with the lock held, or through a Permit) ----------------------------

    def _advance(self) -> None:
        if self._state == BreakerState.OPEN and self._clock() - self._changed_at >= self.reset_timeout_s:
            self._to(BreakerState.HALF_OPEN)

    def _retry_after(self) -> float:
        if self._state != BreakerState.OPEN:
            return 0.0
        return max(0.0, self.reset_timeout_s - (self._clock() - self._changed_at))

    def _to(self, state: BreakerState) -> None:
        if state == BreakerState.OPEN:
            self._times_opened += 1
        if state == BreakerState.CLOSED:
            self._consecutive_failures = 0
        self._state = state
        self._changed_at = self._clock()
        self._trials_in_flight = 0

    def _on_success(self, trial: bool) -> None:
        with self._lock:
            if trial:
                if self._state == BreakerState.HALF_OPEN:
                    self._to(BreakerState.CLOSED)
                return
            if self._state == BreakerState.CLOSED:
                self._consecutive_failures = 0

    def _on_failure(self, trial: bool, error: BaseException | str | None) -> None:
        with self._lock:
            self._total_failures += 1
            if error is not None:
                text = error if isinstance(error, str) else f"{type(error).__name__}: {error}"
                self._last_error = text[:_ERROR_TEXT_LIMIT]
            if trial:
                if self._state == BreakerState.HALF_OPEN:
                    self._to(BreakerState.OPEN)
                return
            if self._state != BreakerState.CLOSED:
                return  # a call admitted before the breaker opened; it is already open
            self._consecutive_failures += 1
            if self._consecutive_failures >= self.failure_threshold:
                self._to(BreakerState.OPEN)

    def _on_release(self, trial: bool) -> None:
        with self._lock:
            if trial and self._state == BreakerState.HALF_OPEN and self._trials_in_flight > 0:
                self._trials_in_flight -= 1


class BreakerRegistry:
    """Named breakers of one process (or one API application), created on first use."""

    def __init__(self, *, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._breakers: dict[str, CircuitBreaker] = {}
        self._lock = threading.Lock()

    def get_or_create(
        self,
        name: str,
        *,
        failure_threshold: int = 5,
        reset_timeout_s: float = 10.0,
        half_open_max_calls: int = 1,
        is_failure: Callable[[BaseException], bool] | None = None,
    ) -> CircuitBreaker:
        """The breaker called ``name``; the options apply only when it is created here."""
        with self._lock:
            breaker = self._breakers.get(name)
            if breaker is None:
                breaker = CircuitBreaker(
                    name,
                    failure_threshold=failure_threshold,
                    reset_timeout_s=reset_timeout_s,
                    half_open_max_calls=half_open_max_calls,
                    is_failure=is_failure,
                    clock=self._clock,
                )
                self._breakers[name] = breaker
            return breaker

    def get(self, name: str) -> CircuitBreaker | None:
        with self._lock:
            return self._breakers.get(name)

    def __iter__(self) -> Iterator[CircuitBreaker]:
        with self._lock:
            found = sorted(self._breakers.values(), key=lambda b: b.name)
        return iter(found)

    def snapshots(self) -> list[BreakerSnapshot]:
        return [breaker.snapshot() for breaker in self]
