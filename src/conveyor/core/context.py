"""What a running task can learn about itself: ``conveyor.current_task()``."""

from __future__ import annotations

import threading
from contextvars import ContextVar
from dataclasses import dataclass, field


@dataclass
class TaskContext:
    """The attempt being executed. ``cancel_requested`` turns true when an operator cancels the task,
    its timeout passes or its lease is lost; long-running code should check it and return early."""

    id: int
    name: str
    queue: str
    attempt: int
    max_attempts: int
    worker_id: str | None = None
    _cancel: threading.Event = field(default_factory=threading.Event, repr=False)

    @property
    def cancel_requested(self) -> bool:
        return self._cancel.is_set()

    def request_cancel(self) -> None:
        self._cancel.set()


_current: ContextVar[TaskContext | None] = ContextVar("conveyor_current_task", default=None)


def current_task() -> TaskContext:
    """The task this code runs as. Raises ``RuntimeError`` outside a task."""
    ctx = _current.get()
    if ctx is None:
        raise RuntimeError("conveyor.current_task() called outside a running task")
    return ctx


def set_current_task(ctx: TaskContext | None) -> object:
    """Bind ``ctx`` for the calling context; returns a token for :func:`reset_current_task`."""
    return _current.set(ctx)


def reset_current_task(token: object) -> None:
    _current.reset(token)  # type: ignore[arg-type]
