"""Retry policy: how long to wait before the next attempt, and which errors are worth one."""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff with a cap and proportional jitter.

    The delay before attempt ``n + 1`` (after ``n`` failed attempts) is
    ``min(cap_s, base_s * factor ** (n - 1))``, then scaled by a random factor in
    ``[1 - jitter, 1 + jitter]`` and clipped to ``[0, cap_s]``.
    """

    base_s: float = 1.0
    factor: float = 2.0
    cap_s: float = 3600.0
    jitter: float = 0.1
    retry_on: tuple[type[BaseException], ...] = (Exception,)
    dont_retry_on: tuple[type[BaseException], ...] = field(default=())

    def __post_init__(self) -> None:
        if self.base_s < 0:
            raise ValueError("retry base_s must be >= 0")
        if self.factor < 1:
            raise ValueError("retry factor must be >= 1")
        if self.cap_s < 0:
            raise ValueError("retry cap_s must be >= 0")
        if not 0 <= self.jitter <= 1:
            raise ValueError("retry jitter must be between 0 and 1")

    def delay_s(self, failed_attempts: int, rng: random.Random | None = None) -> float:
        """Seconds to wait after ``failed_attempts`` failures (>= 1)."""
        exponent = max(0, failed_attempts - 1)
        # Compare in log space first so factor ** exponent cannot overflow for large attempt counts.
        try:
            raw = self.base_s * self.factor**exponent
        except OverflowError:
            raw = self.cap_s
        bounded = min(self.cap_s, raw)
        if self.jitter == 0:
            return bounded
        spread = (rng or random).uniform(1 - self.jitter, 1 + self.jitter)
        return min(self.cap_s, max(0.0, bounded * spread))

    def bounds_s(self, failed_attempts: int) -> tuple[float, float]:
        """The smallest and largest delay :meth:`delay_s` can return for this attempt."""
        exponent = max(0, failed_attempts - 1)
        try:
            raw = self.base_s * self.factor**exponent
        except OverflowError:
            raw = self.cap_s
        bounded = min(self.cap_s, raw)
        return bounded * (1 - self.jitter), min(self.cap_s, bounded * (1 + self.jitter))

    def should_retry(self, error_types: Sequence[str]) -> bool:
        """Whether an error whose class hierarchy is ``error_types`` (``module.QualName``, most
        specific first) is retryable. Names, not classes, so errors from a child process can be judged."""
        names = set(error_types)
        if any(qualified_name(t) in names for t in self.dont_retry_on):
            return False
        return any(qualified_name(t) in names for t in self.retry_on)


def qualified_name(cls: type[BaseException]) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def error_type_names(exc: BaseException) -> list[str]:
    """The qualified names of ``exc``'s class and its bases, most specific first."""
    return [qualified_name(c) for c in type(exc).__mro__ if issubclass(c, BaseException)]
