"""Every error Conveyor raises on purpose.

ConveyorError
├── ConfigError                 settings that do not validate (names the key)
├── DatabaseError               the database could not be reached or refused a statement
│   └── EmbeddedServerError     the embedded PostgreSQL could not be found, started or reached
├── TaskError
│   ├── UnknownTask             a task name no registry knows
│   ├── PayloadError            arguments or a result that are not JSON or are too large
│   ├── IdempotencyConflict     an idempotency key reused with a different payload
│   ├── TaskNotFound            no task with that id
│   ├── InvalidTransition       the task's state does not allow what was asked
│   ├── ResultTimeout           waiting for a result took longer than allowed
│   ├── TaskFailed              the task ended dead; its last error is attached
│   └── TaskCancelled           the task was cancelled before it produced a result
├── StaleLease                  a write for an attempt that no longer owns the task (fencing)
└── TaskOutcome                 raised *by task code* to steer its own outcome
    ├── Retry                   run again after `delay` seconds (counts as an attempt)
    └── NonRetryable            fail now and go to dead, whatever attempts are left
"""

from __future__ import annotations


class ConveyorError(Exception):
    """Base of every error Conveyor raises on purpose."""


class ConfigError(ConveyorError):
    """Settings that do not validate; the message names the offending key."""


class DatabaseError(ConveyorError):
    """The database could not be reached or refused a statement."""


class EmbeddedServerError(DatabaseError):
    """The embedded PostgreSQL server could not be found, started or reached."""


class TaskError(ConveyorError):
    """A request about a task that cannot be carried out."""


class UnknownTask(TaskError):
    """No registered task has this name."""


class PayloadError(TaskError):
    """Arguments or a result that are not JSON-serialisable or exceed the size limit."""


class IdempotencyConflict(TaskError):
    """An idempotency key was reused with a different payload."""

    def __init__(self, key: str, existing_id: int) -> None:
        super().__init__(f"idempotency key {key!r} already belongs to task {existing_id} with a different payload")
        self.key = key
        self.existing_id = existing_id


class TaskNotFound(TaskError):
    """No task with that id exists."""

    def __init__(self, task_id: int) -> None:
        super().__init__(f"task {task_id} does not exist")
        self.task_id = task_id


class InvalidTransition(TaskError):
    """The task's current state does not allow the requested change."""

    def __init__(self, task_id: int, state: str, action: str) -> None:
        super().__init__(f"cannot {action} task {task_id}: it is {state}")
        self.task_id = task_id
        self.state = state
        self.action = action


class ResultTimeout(TaskError):
    """The task did not finish within the time allowed to wait for it."""


class TaskFailed(TaskError):
    """The task went to dead; ``error`` is its last recorded error (type, message, traceback)."""

    def __init__(self, task_id: int, error: dict[str, object] | None) -> None:
        detail = f"{error.get('type')}: {error.get('message')}" if error else "no error recorded"
        super().__init__(f"task {task_id} failed: {detail}")
        self.task_id = task_id
        self.error = error


class TaskCancelled(TaskError):
    """The task was cancelled before it produced a result."""

    def __init__(self, task_id: int) -> None:
        super().__init__(f"task {task_id} was cancelled")
        self.task_id = task_id


class StaleLease(ConveyorError):
    """A heartbeat or outcome for an attempt that no longer owns the task."""


class TaskOutcome(Exception):
    """Raised by task code to choose its own outcome."""


class Retry(TaskOutcome):
    """Ask for the task to run again after ``delay`` seconds (``None``: the task's backoff).

    The attempt still counts against ``max_attempts``.
    """

    def __init__(self, delay: float | None = None, reason: str = "retry requested") -> None:
        super().__init__(reason)
        if delay is not None and delay < 0:
            raise ValueError("Retry delay must be >= 0 seconds")
        self.delay = delay
        self.reason = reason


class NonRetryable(TaskOutcome):
    """Fail this task now and send it to dead, whatever attempts are left."""
