"""The composition root: settings -> database -> stores -> the user's API. The one module that wires layers."""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import logging
import threading
from collections.abc import Callable, Coroutine, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import timedelta
from functools import cached_property
from typing import Any, TypeVar, overload

from sqlalchemy.ext.asyncio import AsyncEngine

from conveyor.bulk_feed import ABORT, BatchFeed
from conveyor.config import Settings, load_settings
from conveyor.core.payload import encode, encode_arguments, payload_fingerprint
from conveyor.core.records import EnqueueRequest
from conveyor.core.retry import RetryPolicy
from conveyor.core.schedule import MisfirePolicy, ScheduleDefinition, ScheduleRegistry, Timing, interval_from
from conveyor.core.states import TaskState
from conveyor.core.task import (
    EnqueueOptions,
    ExecutorKind,
    TaskDefinition,
    TaskOptions,
    TaskRegistry,
    check_task_name,
    default_task_name,
    delay_seconds,
)
from conveyor.core.workflow import Canvas, Dag, FailurePolicy, WorkflowSpec, compile_canvas
from conveyor.core.workflow_records import InvalidWorkflow
from conveyor.db import migrate
from conveyor.db.engine import create_engine
from conveyor.db.executors import AsyncConnectionLike, SyncConnectionLike, drive_sync
from conveyor.db.hot_pool import HotPool
from conveyor.db.task_store import TaskStore, WrittenBatch, enqueue_plan, prepare_batch
from conveyor.db.worker_store import WorkerStore
from conveyor.db.workflow_store import WorkflowStore
from conveyor.errors import ConfigError, DatabaseError, PayloadError, UnknownTask
from conveyor.handles import P, R, Signature, Task, TaskHandle, make_options
from conveyor.sync_bridge import LoopThread
from conveyor.workflows import Workflow, WorkflowHandle

T = TypeVar("T")
log = logging.getLogger("conveyor.app")

#: Rows per INSERT statement in bulk enqueue: large enough to amortise the round trip, small enough
#: to keep one statement's memory and lock footprint modest.
BULK_BATCH = 5000


@dataclass
class _Runtime:
    """Per-event-loop resources: asyncio connections belong to the loop that opened them."""

    engine: AsyncEngine
    hot: HotPool
    tasks: TaskStore
    workers: WorkerStore


class App:
    """A Conveyor application: the task registry and the way to the database.

    ``App()`` reads settings from ``CONVEYOR_*`` and an optional config file; with no database URL it
    starts (or joins) the embedded PostgreSQL server. Nothing connects until first use.
    """

    def __init__(
        self,
        database_url: str | None = None,
        *,
        settings: Settings | None = None,
        config_file: str | None = None,
        strict_names: bool = True,
    ) -> None:
        if settings is None:
            settings = load_settings(config_file, overrides={"database_url": database_url})
        elif database_url is not None:
            raise ConfigError("give either database_url or settings, not both")
        self.settings = settings
        self.registry = TaskRegistry()
        #: When true, enqueue by name refuses names this app has not registered (typos fail fast).
        #: Producers that enqueue tasks defined in another code base set it to False.
        self.strict_names = strict_names
        self._url: str | None = None
        self._embedded: Any = None
        self._runtimes: dict[asyncio.AbstractEventLoop, _Runtime] = {}
        self._lock = threading.Lock()
        self._bridge = LoopThread()
        self._defaults_cache: dict[str, TaskOptions] = {}

    def configure(self, settings: Settings) -> None:
        """Replace the settings (the CLI does this with its flags) before anything has connected."""
        with self._lock:
            if self._url is not None or self._runtimes:
                raise ConfigError("cannot change settings after the app has connected to the database")
            self.settings = settings

    # -- task definitions ------------------------------------------------------------------------

    @overload
    def task(self, func: Callable[P, R]) -> Task[P, R]: ...

    @overload
    def task(
        self,
        *,
        name: str | None = None,
        queue: str = "default",
        priority: int = 0,
        max_attempts: int = 3,
        timeout: float | None = None,
        executor: ExecutorKind | None = None,
        retry: RetryPolicy | None = None,
        retry_on: Sequence[type[BaseException]] | None = None,
        dont_retry_on: Sequence[type[BaseException]] | None = None,
    ) -> Callable[[Callable[P, R]], Task[P, R]]: ...

    def task(
        self,
        func: Callable[P, R] | None = None,
        *,
        name: str | None = None,
        queue: str = "default",
        priority: int = 0,
        max_attempts: int = 3,
        timeout: float | None = None,
        executor: ExecutorKind | None = None,
        retry: RetryPolicy | None = None,
        retry_on: Sequence[type[BaseException]] | None = None,
        dont_retry_on: Sequence[type[BaseException]] | None = None,
    ) -> Task[P, R] | Callable[[Callable[P, R]], Task[P, R]]:
        """Register a task. ``timeout`` is in seconds; ``executor`` is "async", "thread" or "process"
        (default: async functions on the event loop, plain functions on a thread pool). Unknown
        options are a ``TypeError`` at import time, not a surprise at run time."""
        policy = retry or RetryPolicy()
        if retry_on is not None or dont_retry_on is not None:
            policy = RetryPolicy(
                base_s=policy.base_s,
                factor=policy.factor,
                cap_s=policy.cap_s,
                jitter=policy.jitter,
                retry_on=tuple(retry_on) if retry_on is not None else policy.retry_on,
                dont_retry_on=tuple(dont_retry_on) if dont_retry_on is not None else policy.dont_retry_on,
            )
        options = TaskOptions(
            queue=queue,
            priority=priority,
            max_attempts=max_attempts,
            timeout_s=timeout,
            executor=executor,
            retry=policy,
        )

        def register(fn: Callable[P, R]) -> Task[P, R]:
            definition = TaskDefinition(name=name or default_task_name(fn), func=fn, options=options)
            self.registry.add(definition)
            self._defaults_cache.pop(definition.name, None)
            return Task(self, definition)

        return register(func) if func is not None else register

    # -- schedules (periodic tasks) --------------------------------------------------------------
    # Declared here in code; every scheduler process writes them into the database as it starts
    # (conveyor.scheduler.sync). Schedules managed at run time go through the API or the CLI instead.

    @cached_property
    def schedules(self) -> ScheduleRegistry:
        """The schedules this app declares in code, by name."""
        return ScheduleRegistry()

    def periodic(
        self,
        *,
        cron: str | None = None,
        interval: float | timedelta | None = None,
        timezone: str = "UTC",
        name: str | None = None,
        args: Sequence[Any] = (),
        kwargs: Mapping[str, Any] | None = None,
        queue: str | None = None,
        priority: int | None = None,
        misfire: MisfirePolicy = "once",
        max_lateness: float | timedelta | None = None,
    ) -> Callable[[Callable[P, R]], Task[P, R]]:
        """Run the decorated function on a schedule: it is registered as a task (unless it already is one,
        e.g. ``@app.periodic(...)`` above ``@app.task(...)``) and as a schedule named ``name`` (default:
        the task's name). See :meth:`schedule` for the options."""

        def register(target: Callable[P, R]) -> Task[P, R]:
            task: Task[P, R] = target if isinstance(target, Task) else self.task(target)
            self.schedule(
                name or task.name,
                task,
                cron=cron,
                interval=interval,
                timezone=timezone,
                args=args,
                kwargs=kwargs,
                queue=queue,
                priority=priority,
                misfire=misfire,
                max_lateness=max_lateness,
            )
            return task

        return register

    def schedule(
        self,
        name: str,
        task: str | Task[..., Any],
        *,
        cron: str | None = None,
        interval: float | timedelta | None = None,
        timezone: str = "UTC",
        args: Sequence[Any] = (),
        kwargs: Mapping[str, Any] | None = None,
        queue: str | None = None,
        priority: int | None = None,
        misfire: MisfirePolicy = "once",
        max_lateness: float | timedelta | None = None,
    ) -> ScheduleDefinition:
        """Declare a schedule for a task (by name or handle). Exactly one of ``cron`` (5 fields, or 6 with
        seconds first, in ``timezone``) and ``interval`` (whole seconds, at least 1). ``queue`` and
        ``priority`` default to the task's. ``misfire`` says what to do with fire times missed while no
        scheduler ran: ``"skip"`` them, run ``"once"`` to catch up, or run ``"all"`` of them, none later
        than ``max_lateness`` seconds. Invalid values raise ``ValueError`` here, at import."""
        definition = ScheduleDefinition(
            name=name,
            task_name=task if isinstance(task, str) else task.name,
            timing=Timing(
                cron=cron, interval_s=None if interval is None else interval_from(interval), timezone=timezone
            ),
            args=tuple(args),
            kwargs=dict(kwargs or {}),
            queue=queue,
            priority=priority,
            misfire=misfire,
            max_lateness_s=delay_seconds(max_lateness) if max_lateness is not None else None,
        )
        self.schedules.add(definition)
        return definition

    # -- enqueue ---------------------------------------------------------------------------------

    def enqueue(
        self,
        name: str,
        args: Sequence[Any] = (),
        kwargs: Mapping[str, Any] | None = None,
        *,
        connection: SyncConnectionLike | None = None,
        **options: Any,
    ) -> TaskHandle:
        """Enqueue a task by name with JSON arguments."""
        return self.enqueue_signature(Signature(name, args, kwargs or {}, make_options(**options)), connection)

    async def enqueue_async(
        self,
        name: str,
        args: Sequence[Any] = (),
        kwargs: Mapping[str, Any] | None = None,
        *,
        connection: AsyncConnectionLike | None = None,
        **options: Any,
    ) -> TaskHandle:
        signature = Signature(name, args, kwargs or {}, make_options(**options))
        return await self.enqueue_signature_async(signature, connection)

    def enqueue_signature(self, signature: Signature, connection: SyncConnectionLike | None = None) -> TaskHandle:
        return self.enqueue_many([signature], connection=connection)[0]

    async def enqueue_signature_async(
        self, signature: Signature, connection: AsyncConnectionLike | None = None
    ) -> TaskHandle:
        return (await self.enqueue_many_async([signature], connection=connection))[0]

    def enqueue_many(
        self, items: Iterable[Signature | Mapping[str, Any]], *, connection: SyncConnectionLike | None = None
    ) -> list[TaskHandle]:
        """Enqueue many tasks, all or none, in batches of 5,000 rows (one COPY each). Items are
        signatures (``task.s(...)``) or mappings ``{"name", "args", "kwargs", ...options}``.

        Batches are validated here while the previous one is being written, in one transaction: an
        invalid item anywhere leaves nothing stored."""
        handles: list[TaskHandle] = []
        if connection is not None:
            requests = [self.build_request(item) for item in items]
            for start in range(0, len(requests), BULK_BATCH):
                results = drive_sync(enqueue_plan(requests[start : start + BULK_BATCH]), connection)
                handles.extend(TaskHandle(self, r.id, created=r.created, state=r.state) for r in results)
            return handles
        if isinstance(items, Sequence) and len(items) <= BULK_BATCH:
            # One batch: nothing to overlap, and the store's single-statement autocommit path (one round
            # trip) is what keeps a single enqueue's latency low.
            return self._bridge.run(self._enqueue_requests([self.build_request(item) for item in items]))
        feed = BatchFeed(self._bridge.loop)
        writer = asyncio.run_coroutine_threadsafe(self._write_feed(feed), self._bridge.loop)
        try:
            batch: list[EnqueueRequest] = []
            for item in items:
                batch.append(self.build_request(item))
                if len(batch) == BULK_BATCH:
                    feed.put(prepare_batch(batch), writer)
                    batch = []
                    # Handles for what is written already, made here while the writer's thread (the
                    # bottleneck) goes on with the next batch.
                    handles.extend(self._handles_for(feed.take_written()))
            if batch:
                feed.put(prepare_batch(batch), writer)
        except BaseException:
            # The writer raises on the marker, which rolls its transaction back: nothing of this call
            # is stored. Wait for that, so no half-written batch outlives the error.
            with contextlib.suppress(Exception):
                feed.put(ABORT, writer)
                writer.exception()
            raise
        feed.put(None, writer)
        writer.result()
        handles.extend(self._handles_for(feed.take_written()))
        return handles

    def _handles_for(self, written: Iterable[WrittenBatch]) -> list[TaskHandle]:
        handles: list[TaskHandle] = []
        for batch in written:
            if batch.keyed_indexes:
                handles.extend(TaskHandle(self, r.id, created=r.created, state=r.state) for r in batch.results())
            else:  # all copied: skip the per-row result objects
                handles.extend(TaskHandle(self, task_id, state=TaskState.QUEUED) for task_id in batch.copied_ids)
        return handles

    async def _write_feed(self, feed: BatchFeed) -> None:
        store = self.store()
        async with store.engine.begin() as conn:
            while (batch := await feed.get()) is not None:
                feed.written(await store.write_batch(conn, batch))

    async def enqueue_many_async(
        self, items: Iterable[Signature | Mapping[str, Any]], *, connection: AsyncConnectionLike | None = None
    ) -> list[TaskHandle]:
        requests = [self.build_request(item) for item in items]
        return await self._enqueue_requests(requests, connection)

    async def _enqueue_requests(
        self, requests: Sequence[EnqueueRequest], connection: AsyncConnectionLike | None = None
    ) -> list[TaskHandle]:
        handles: list[TaskHandle] = []
        store = self.store()
        if connection is None and len(requests) <= BULK_BATCH:
            # One batch is one transaction anyway; the store picks the fastest path for its size.
            results = await store.enqueue(requests)
            return [TaskHandle(self, r.id, created=r.created, state=r.state) for r in results]
        if connection is not None:
            for start in range(0, len(requests), BULK_BATCH):
                results = await store.enqueue(requests[start : start + BULK_BATCH], connection)
                handles.extend(TaskHandle(self, r.id, created=r.created, state=r.state) for r in results)
            return handles
        async with store.engine.begin() as conn:  # all or none, like the sync form
            for start in range(0, len(requests), BULK_BATCH):
                results = await store.enqueue_in(conn, requests[start : start + BULK_BATCH])
                handles.extend(TaskHandle(self, r.id, created=r.created, state=r.state) for r in results)
        return handles

    def build_request(self, item: Signature | Mapping[str, Any]) -> EnqueueRequest:
        """Validate and encode one enqueue; every path (Python, bulk, HTTP, workflows) goes through here."""
        signature = item if isinstance(item, Signature) else _signature_from_mapping(item)
        defaults = self._defaults_for(signature.name)
        options = signature.options
        limit = self.settings.payload_limit_bytes
        args_json, kwargs_json = encode_arguments(signature.args, signature.kwargs, limit_bytes=limit)
        queue = options.queue or defaults.queue
        return EnqueueRequest(
            name=signature.name,
            queue=queue,
            priority=options.priority if options.priority is not None else defaults.priority,
            args_json=args_json,
            kwargs_json=kwargs_json,
            metadata_json=encode(dict(options.metadata), what="metadata", limit_bytes=limit)
            if options.metadata
            else "{}",
            max_attempts=options.max_attempts or defaults.max_attempts,
            timeout_s=options.timeout if options.timeout is not None else defaults.timeout_s,
            delay_s=None if options.delay is None else delay_seconds(options.delay),
            eta=options.eta,
            idempotency_key=options.idempotency_key,
            payload_hash=(
                payload_fingerprint(signature.name, queue, args_json, kwargs_json)
                if options.idempotency_key is not None
                else None
            ),
            unique_key=options.unique_key,
        )

    def _defaults_for(self, name: str) -> TaskOptions:
        """The options a task name enqueues with; checked once per name, then remembered."""
        defaults = self._defaults_cache.get(name)
        if defaults is None or (name not in self.registry and self.strict_names):
            check_task_name(name)
            if name in self.registry:
                defaults = self.registry.get(name).options
            elif self.strict_names:
                raise UnknownTask(
                    f"no task named {name!r} is registered with this app "
                    "(create the App with strict_names=False to enqueue tasks defined elsewhere)"
                )
            else:
                defaults = _DEFAULT_OPTIONS
            self._defaults_cache[name] = defaults
        return defaults

    # -- task access -----------------------------------------------------------------------------

    def handle(self, task_id: int) -> TaskHandle:
        return TaskHandle(self, task_id)

    # -- workflows -------------------------------------------------------------------------------
    # Chains, groups and chords (conveyor.workflows) and DAGs (app.workflow()): stored in the database
    # and advanced there, in the transaction that finishes each step (conveyor.db.workflow_store).

    def workflow(self, name: str = "workflow", *, on_failure: FailurePolicy = "stop") -> Workflow:
        """A new DAG: ``.add(task.s(...), name=..., depends_on=[...], pass_results=True)`` each step, then
        ``.enqueue()``. ``on_failure="stop"``: a failed step cancels its dependents and stops the rest of
        the workflow; ``"continue"``: only the dependents that need the failed step's result are cancelled."""
        return Workflow(self, name, on_failure)

    def submit_workflow(
        self, workflow: Canvas | Dag | WorkflowSpec, *, name: str | None = None, on_failure: FailurePolicy = "stop"
    ) -> WorkflowHandle:
        return self.run_sync(self.submit_workflow_async(workflow, name=name, on_failure=on_failure))

    async def submit_workflow_async(
        self, workflow: Canvas | Dag | WorkflowSpec, *, name: str | None = None, on_failure: FailurePolicy = "stop"
    ) -> WorkflowHandle:
        """Store a workflow and start it: all of it, or nothing. ``name`` and ``on_failure`` apply to a
        chain, group or chord (a DAG carries its own). Raises :class:`InvalidWorkflow` naming the step
        for a bad graph, an unknown task, or arguments that cannot be stored."""
        if isinstance(workflow, Dag):
            spec = workflow.build()
        elif isinstance(workflow, WorkflowSpec):
            spec = workflow
        else:
            spec = compile_canvas(workflow, name=name, on_failure=on_failure)
        submitted = await self.workflow_store().submit(spec, self.workflow_requests(spec))
        return WorkflowHandle(self, submitted.id, submitted.step_ids)

    def workflow_requests(self, spec: WorkflowSpec) -> list[EnqueueRequest]:
        """Each step validated and encoded as any enqueue is (see :meth:`build_request`)."""
        requests = []
        for step in spec.steps:
            try:
                requests.append(self.build_request(Signature(step.task, step.args, step.kwargs, step.options)))
            except UnknownTask as exc:
                raise InvalidWorkflow(f"step {step.name!r}: {exc}", step=step.name, field="task") from exc
            except PayloadError as exc:
                raise InvalidWorkflow(f"step {step.name!r}: {exc}", step=step.name, field="args") from exc
            except ValueError as exc:
                raise InvalidWorkflow(f"step {step.name!r}: {exc}", step=step.name, field="task") from exc
        return requests

    def workflow_handle(self, workflow_id: int) -> WorkflowHandle:
        return WorkflowHandle(self, workflow_id)

    def workflow_store(self) -> WorkflowStore:
        """The workflow repository of the running event loop."""
        runtime = self.runtime()
        return WorkflowStore(runtime.engine, runtime.tasks)

    # -- plumbing --------------------------------------------------------------------------------

    @property
    def database_url(self) -> str:
        """The URL in use; starts the embedded server on first use when none is configured."""
        with self._lock:
            if self._url is None:
                if self.settings.database_url is not None:
                    self._url = self.settings.database_url.get_secret_value()
                else:
                    self._url = self._start_embedded()
            return self._url

    def _start_embedded(self) -> str:
        from conveyor.db.embedded import EmbeddedPostgres, default_data_dir

        embedded_settings = self.settings.embedded
        server = EmbeddedPostgres(embedded_settings.data_dir or default_data_dir(), port=embedded_settings.port)
        url = server.start()
        self._embedded = server
        # We own this database: keep its schema current without asking.
        migrate.upgrade(url)
        log.info("using the embedded PostgreSQL at %s", url)
        return url

    def runtime(self) -> _Runtime:
        """The engine and stores for the running event loop (created on first use in that loop)."""
        loop = asyncio.get_running_loop()
        runtime = self._runtimes.get(loop)
        if runtime is None:
            engine = create_engine(self.database_url, pool_size=self.settings.worker.concurrency + 5)
            # Heartbeats, claims and acks must never queue behind tasks that enqueue: room for both.
            hot = HotPool(self.database_url, max_size=self.settings.worker.concurrency + 4)
            runtime = _Runtime(engine, hot, TaskStore(engine, hot), WorkerStore(engine))
            self._runtimes[loop] = runtime
        return runtime

    def store(self) -> TaskStore:
        return self.runtime().tasks

    def run_sync(self, coro: Coroutine[Any, Any, T]) -> T:
        return self._bridge.run(coro)

    def check_schema(self) -> None:
        """Refuse to run against a database whose schema is not the one this code expects."""
        current = migrate.current_revision(self.database_url)
        head = migrate.head_revision()
        if current != head:
            raise DatabaseError(
                f"the database schema is at {current or 'nothing'}, this Conveyor needs {head}: "
                "run `conveyor db upgrade`"
            )

    async def aclose(self) -> None:
        """Dispose of the engine of the running loop."""
        loop = asyncio.get_running_loop()
        runtime = self._runtimes.pop(loop, None)
        if runtime is not None:
            await runtime.hot.close()
            await runtime.engine.dispose()

    def close(self) -> None:
        """Release connections and the sync bridge; stop the embedded server if this app started it."""
        bridge_loop = self._bridge._loop
        if bridge_loop is not None and bridge_loop in self._runtimes:
            self._bridge.run(self.aclose())
        self._bridge.stop()
        if self._embedded is not None and self._embedded.owns_server:
            self._embedded.stop()
            self._embedded = None


_DEFAULT_OPTIONS = TaskOptions()
_NO_OPTIONS = EnqueueOptions()


def _signature_from_mapping(item: Mapping[str, Any]) -> Signature:
    data = dict(item)
    try:
        name = data.pop("name")
    except KeyError:
        raise TypeError("each item needs a 'name'") from None
    args = data.pop("args", ())
    kwargs = data.pop("kwargs", None) or {}
    return Signature(name, args, kwargs, make_options(**data) if data else _NO_OPTIONS)


def load_app(reference: str) -> App:
    """Import ``package.module:attribute`` and return the App it names."""
    module_name, _, attribute = reference.partition(":")
    if not module_name or not attribute:
        raise ConfigError(f"app reference {reference!r} must look like 'package.module:app'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(f"cannot import {module_name!r} for app {reference!r}: {exc}") from exc
    app = getattr(module, attribute, None)
    if not isinstance(app, App):
        raise ConfigError(f"{reference!r} is not a conveyor.App (found {type(app).__name__})")
    return app


def dumps_result(value: Any, limit_bytes: int) -> str:
    return encode(value, what="result", limit_bytes=limit_bytes)
