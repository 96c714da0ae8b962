"""Turning how an attempt ended into the task's next state. Pure: no I/O, no clock but the one passed in."""

from __future__ import annotations

import random
import traceback
from dataclasses import dataclass
from typing import Any

from conveyor.core.retry import RetryPolicy, error_type_names
from conveyor.core.states import TaskState
from conveyor.errors import NonRetryable, Retry


@dataclass(frozen=True)
class ErrorInfo:
    """An attempt's failure as stored: JSON-safe, with a bounded traceback."""

    type: str
    types: tuple[str, ...]
    message: str
    traceback: str
    retry_requested: bool = False
    retry_delay: float | None = None
    non_retryable: bool = False

    def to_json(self, attempt: int) -> dict[str, Any]:
        return {"type": self.type, "message": self.message, "traceback": self.traceback, "attempt": attempt}

    @classmethod
    def from_exception(cls, exc: BaseException, traceback_limit_bytes: int) -> ErrorInfo:
        types = error_type_names(exc)
        text = "".join(traceback.format_exception(exc))
        return cls(
            type=types[0],
            types=tuple(types),
            message=str(exc)[:2000],
            traceback=cap_traceback(text, traceback_limit_bytes),
            retry_requested=isinstance(exc, Retry),
            retry_delay=exc.delay if isinstance(exc, Retry) else None,
            non_retryable=isinstance(exc, NonRetryable),
        )

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ErrorInfo:
        """From the error object a process child reports."""
        return cls(
            type=str(data.get("type", "Exception")),
            types=tuple(data.get("types") or [data.get("type", "Exception")]),
            message=str(data.get("message", "")),
            traceback=str(data.get("traceback", "")),
            retry_requested=bool(data.get("retry_requested")),
            retry_delay=data.get("retry_delay"),
            non_retryable=bool(data.get("non_retryable")),
        )

    @classmethod
    def synthetic(cls, type_name: str, message: str, *, retryable: bool = True) -> ErrorInfo:
        """A failure Conveyor itself diagnosed (timeout, unknown task, oversized result)."""
        return cls(type=type_name, types=(type_name,), message=message, traceback="", non_retryable=not retryable)


def cap_traceback(text: str, limit_bytes: int) -> str:
    """Keep the end of a traceback (where the error is) within ``limit_bytes``, marking the cut."""
    data = text.encode()
    if len(data) <= limit_bytes:
        return text
    marker = "[... traceback cut ...]\n"
    keep = max(0, limit_bytes - len(marker.encode()))
    return marker + data[len(data) - keep :].decode(errors="ignore")


def next_after_failure(
    error: ErrorInfo, attempt: int, max_attempts: int, policy: RetryPolicy, rng: random.Random | None = None
) -> tuple[TaskState, float | None]:
    """The state after a failed attempt number ``attempt`` (1-based), and the delay before a retry."""
    if error.non_retryable or attempt >= max_attempts:
        return TaskState.DEAD, None
    if error.retry_requested:
        delay = error.retry_delay if error.retry_delay is not None else policy.delay_s(attempt, rng)
    elif policy.should_retry(error.types):
        delay = policy.delay_s(attempt, rng)
    else:
        return TaskState.DEAD, None
    return (TaskState.SCHEDULED if delay > 0 else TaskState.QUEUED), delay
