"""Task definitions (what ``@app.task`` makes), their options, and the registry of names."""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from typing import Any, Literal

from conveyor.core.retry import RetryPolicy
from conveyor.errors import UnknownTask

ExecutorKind = Literal["async", "thread", "process"]

_QUEUE_NAME = re.compile(r"^[A-Za-z0-9_.:-]{1,100}$")
_TASK_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_.:-]{0,199}$")

PRIORITY_MIN, PRIORITY_MAX = -32768, 32767


def check_queue_name(queue: str) -> str:
    if not isinstance(queue, str) or not _QUEUE_NAME.match(queue):
        raise ValueError(f"queue name {queue!r} must be 1-100 characters of letters, digits, '_', '.', ':', '-'")
    return queue


def check_task_name(name: str) -> str:
    if not isinstance(name, str) or not _TASK_NAME.match(name):
        raise ValueError(f"task name {name!r} must start with a letter or '_' and use letters, digits, '_.:-'")
    return name


def check_priority(priority: int) -> int:
    if isinstance(priority, bool) or not isinstance(priority, int) or not PRIORITY_MIN <= priority <= PRIORITY_MAX:
        raise ValueError(f"priority must be an integer from {PRIORITY_MIN} to {PRIORITY_MAX}, got {priority!r}")
    return priority


@dataclass(frozen=True)
class TaskOptions:
    """Defaults a task definition gives every enqueue of it (each may be overridden per call)."""

    queue: str = "default"
    priority: int = 0
    max_attempts: int = 3
    timeout_s: float | None = None
    executor: ExecutorKind | None = None  # None: async functions on the loop, others on threads
    retry: RetryPolicy = field(default_factory=RetryPolicy)

    def __post_init__(self) -> None:
        check_queue_name(self.queue)
        check_priority(self.priority)
        if self.max_attempts < 1:
            raise ValueError("max_attempts must be >= 1")
        if self.timeout_s is not None and self.timeout_s <= 0:
            raise ValueError("timeout must be > 0 seconds")
        if self.executor not in (None, "async", "thread", "process"):
            raise ValueError(f"executor must be 'async', 'thread' or 'process', got {self.executor!r}")


@dataclass(frozen=True)
class TaskDefinition:
    name: str
    func: Callable[..., Any]
    options: TaskOptions

    is_async: bool = field(init=False, repr=False, compare=False)

    @property
    def executor(self) -> ExecutorKind:
        if self.options.executor is not None:
            return self.options.executor
        return "async" if self.is_async else "thread"

    def __post_init__(self) -> None:
        # Computed once: the worker asks for every attempt, and inspect's check is not free.
        object.__setattr__(self, "is_async", inspect.iscoroutinefunction(self.func))
        check_task_name(self.name)
        if self.options.executor == "async" and not self.is_async:
            raise ValueError(f"task {self.name!r}: executor='async' needs an `async def` function")


@dataclass(frozen=True)
class EnqueueOptions:
    """Per-call choices; ``None`` means "the task definition's default"."""

    queue: str | None = None
    priority: int | None = None
    delay: float | timedelta | None = None  # seconds from now, on the database clock
    eta: datetime | None = None  # an absolute time (timezone-aware)
    max_attempts: int | None = None
    timeout: float | None = None  # seconds
    idempotency_key: str | None = None
    unique_key: str | None = None
    metadata: Mapping[str, Any] | None = None

    def __post_init__(self) -> None:
        if self.queue is not None:
            check_queue_name(self.queue)
        if self.priority is not None:
            check_priority(self.priority)
        if self.delay is not None and self.eta is not None:
            raise ValueError("give either delay or eta, not both")
        if self.delay is not None and delay_seconds(self.delay) < 0:
            raise ValueError("delay must be >= 0 seconds")
        if self.eta is not None and self.eta.tzinfo is None:
            raise ValueError("eta must be timezone-aware (e.g. datetime.now(timezone.utc))")
        if self.max_attempts is not None and self.max_attempts < 1:
            raise ValueError("max_attempts must be >= 1")
        if self.timeout is not None and self.timeout <= 0:
            raise ValueError("timeout must be > 0 seconds")
        for key_name in ("idempotency_key", "unique_key"):
            key = getattr(self, key_name)
            if key is not None and (not isinstance(key, str) or not 1 <= len(key) <= 255):
                raise ValueError(f"{key_name} must be a string of 1-255 characters")

    def merged(self, other: EnqueueOptions) -> EnqueueOptions:
        """These options with every value ``other`` sets laid over them."""
        changes = {k: v for k, v in vars(other).items() if v is not None}
        # A run time given later replaces the earlier one, whichever way each was expressed.
        if other.delay is not None:
            changes["eta"] = None
        if other.eta is not None:
            changes["delay"] = None
        return replace(self, **changes)


def delay_seconds(delay: float | timedelta) -> float:
    return delay.total_seconds() if isinstance(delay, timedelta) else float(delay)


class TaskRegistry:
    """Task definitions by name. Names are unique; registering a second function under one is an error."""

    def __init__(self) -> None:
        self._by_name: dict[str, TaskDefinition] = {}

    def add(self, definition: TaskDefinition) -> None:
        existing = self._by_name.get(definition.name)
        if existing is not None and existing.func is not definition.func:
            raise ValueError(f"a task named {definition.name!r} is already registered")
        self._by_name[definition.name] = definition

    def get(self, name: str) -> TaskDefinition:
        try:
            return self._by_name[name]
        except KeyError:
            raise UnknownTask(f"no task named {name!r} is registered") from None

    def __contains__(self, name: object) -> bool:
        return name in self._by_name

    def __iter__(self) -> Iterator[TaskDefinition]:
        return iter(self._by_name.values())

    def names(self) -> list[str]:
        return sorted(self._by_name)


def default_task_name(func: Callable[..., Any]) -> str:
    """``module.function``, or just ``function`` for code run as ``__main__``."""
    module = getattr(func, "__module__", None) or "__main__"
    qualname = getattr(func, "__qualname__", getattr(func, "__name__", "task"))
    return qualname if module == "__main__" else f"{module}.{qualname}"
