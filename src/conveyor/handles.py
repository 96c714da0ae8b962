"""What users hold: ``Task`` (made by ``@app.task``), ``Signature`` (a task with its arguments, for bulk
enqueue and workflows) and ``TaskHandle`` (an enqueued task: result, status, cancel)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Generic, ParamSpec, TypeVar

from conveyor.core.records import TaskEvent, TaskRecord
from conveyor.core.states import TaskState
from conveyor.core.task import EnqueueOptions, TaskDefinition
from conveyor.errors import ResultTimeout, TaskCancelled, TaskFailed

if TYPE_CHECKING:
    from conveyor.app import App
    from conveyor.db.executors import AsyncConnectionLike, SyncConnectionLike

P = ParamSpec("P")
R = TypeVar("R")

_OPTION_NAMES = frozenset(EnqueueOptions.__dataclass_fields__)


def make_options(**options: Any) -> EnqueueOptions:
    unknown = set(options) - _OPTION_NAMES
    if unknown:
        raise TypeError(f"unknown enqueue option(s) {sorted(unknown)}; known: {sorted(_OPTION_NAMES)}")
    return EnqueueOptions(**options)


@dataclass(frozen=True)
class Signature:
    """A task name with its arguments and options, not yet enqueued."""

    name: str
    args: Sequence[Any] = ()
    kwargs: Mapping[str, Any] = field(default_factory=dict)
    options: EnqueueOptions = field(default_factory=EnqueueOptions)
    # The app of the task it was made from (``task.s()``), so that a workflow of such signatures knows
    # where to go without being told; None for one built by name. Not part of its value.
    app: App | None = field(default=None, compare=False, repr=False)

    def set(self, **options: Any) -> Signature:
        merged = self.options.merged(make_options(**options))
        return Signature(self.name, self.args, self.kwargs, merged, app=self.app)


class Task(Generic[P, R]):
    """A registered task. Calling it runs the function here and now; ``enqueue`` runs it on a worker."""

    def __init__(self, app: App, definition: TaskDefinition, options: EnqueueOptions | None = None) -> None:
        self.app = app
        self.definition = definition
        self._options = options or EnqueueOptions()
        self.__doc__ = definition.func.__doc__
        self.__name__ = getattr(definition.func, "__name__", definition.name)
        self.__wrapped__ = definition.func

    @property
    def name(self) -> str:
        return self.definition.name

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> R:
        result: R = self.definition.func(*args, **kwargs)
        return result

    def options(self, **options: Any) -> Task[P, R]:
        """A copy of this task whose enqueues use these options (queue, priority, delay, eta,
        max_attempts, timeout, idempotency_key, unique_key, metadata)."""
        return Task(self.app, self.definition, self._options.merged(make_options(**options)))

    def s(self, *args: Any, **kwargs: Any) -> Signature:
        return Signature(self.name, args, kwargs, self._options, app=self.app)

    def enqueue(self, *args: Any, connection: SyncConnectionLike | None = None, **kwargs: Any) -> TaskHandle:
        """Enqueue on a worker. With ``connection`` (a SQLAlchemy Connection or Session, or a psycopg
        Connection) the task is written inside the caller's transaction: it exists, and wakes a
        worker, only if and when that transaction commits."""
        return self.app.enqueue_signature(self.s(*args, **kwargs), connection=connection)

    async def enqueue_async(
        self, *args: Any, connection: AsyncConnectionLike | None = None, **kwargs: Any
    ) -> TaskHandle:
        return await self.app.enqueue_signature_async(self.s(*args, **kwargs), connection=connection)

    def __repr__(self) -> str:
        return f"<Task {self.name}>"


class TaskHandle:
    """An enqueued task. ``created`` is False when an existing task was returned instead (same
    idempotency key, or its unique key is held)."""

    def __init__(self, app: App, task_id: int, *, created: bool = True, state: TaskState | None = None) -> None:
        self.app = app
        self.id = task_id
        self.created = created
        self.initial_state = state

    def __repr__(self) -> str:
        return f"<TaskHandle {self.id}{'' if self.created else ' (existing)'}>"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, TaskHandle) and other.id == self.id

    def __hash__(self) -> int:
        return hash(self.id)

    # -- async -----------------------------------------------------------------------------------

    async def get_async(self) -> TaskRecord:
        return await self.app.store().get(self.id)

    async def status_async(self) -> TaskState:
        return (await self.get_async()).state

    async def events_async(self) -> list[TaskEvent]:
        return await self.app.store().events(self.id)

    async def cancel_async(self) -> TaskRecord:
        return await self.app.store().cancel(self.id)

    async def retry_async(self) -> TaskRecord:
        return await self.app.store().retry(self.id)

    async def result_async(self, timeout: float | None = None) -> Any:
        """Wait for the task to finish and return its result. Raises :class:`TaskFailed` if it went
        to dead, :class:`TaskCancelled` if cancelled, :class:`ResultTimeout` after ``timeout`` seconds."""
        deadline = None if timeout is None else time.monotonic() + timeout
        pause = 0.005
        while True:
            record = await self.get_async()
            outcome = _final(record)
            if outcome is not _PENDING:
                return outcome
            if deadline is not None and time.monotonic() >= deadline:
                raise ResultTimeout(f"task {self.id} is still {record.state} after {timeout} s")
            wait = pause if deadline is None else min(pause, max(0.0, deadline - time.monotonic()))
            await asyncio.sleep(wait)
            pause = min(pause * 2, 0.2)

    # -- sync ------------------------------------------------------------------------------------

    def get(self) -> TaskRecord:
        return self.app.run_sync(self.get_async())

    def status(self) -> TaskState:
        return self.app.run_sync(self.status_async())

    def events(self) -> list[TaskEvent]:
        return self.app.run_sync(self.events_async())

    def cancel(self) -> TaskRecord:
        return self.app.run_sync(self.cancel_async())

    def retry(self) -> TaskRecord:
        return self.app.run_sync(self.retry_async())

    def result(self, timeout: float | None = None) -> Any:
        return self.app.run_sync(self.result_async(timeout))


_PENDING = object()


def _final(record: TaskRecord) -> Any:
    if record.state == TaskState.SUCCEEDED:
        return record.result
    if record.state == TaskState.DEAD:
        raise TaskFailed(record.id, record.last_error)
    if record.state == TaskState.CANCELLED:
        raise TaskCancelled(record.id)
    return _PENDING


TaskDecorator = Callable[[Callable[P, R]], Task[P, R]]
