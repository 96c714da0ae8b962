"""The worker loop in-process against a real PostgreSQL: retries, timeouts, cancellation, wake-ups."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from datetime import datetime

import psycopg
import pytest

import conveyor
from conveyor.app import App
from conveyor.core.retry import RetryPolicy
from conveyor.core.states import TaskState
from conveyor.errors import NonRetryable, Retry, TaskCancelled, TaskFailed
from conveyor.worker.worker import Worker


@asynccontextmanager
async def running(worker: Worker) -> AsyncIterator[Worker]:
    task = asyncio.create_task(worker.run())
    try:
        yield worker
    finally:
        worker.request_stop()
        await asyncio.wait_for(task, 20)


async def wait_for(predicate: Callable[[], object], timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.01)


async def test_retry__backoff_times_within_jitter_bounds(aapp: App) -> None:
    policy = RetryPolicy(base_s=0.2, factor=2, cap_s=5, jitter=0.25)
    calls: list[float] = []

    @aapp.task(name="flaky", max_attempts=4, retry=policy)
    def flaky() -> str:
        calls.append(time.monotonic())
        if len(calls) < 4:
            raise ConnectionError("try again")
        return "ok"

    handle = await flaky.enqueue_async()
    async with running(Worker(aapp)):
        assert await handle.result_async(timeout=20) == "ok"
    events = await handle.events_async()
    failed = [e for e in events if e.kind == "failed"]
    claimed = [e for e in events if e.kind == "claimed"]
    assert len(failed) == 3 and len(claimed) == 4
    for n, (fail, next_claim) in enumerate(zip(failed, claimed[1:], strict=True), start=1):
        low, high = policy.bounds_s(n)
        planned = fail.detail["retry_in_s"]  # type: ignore[index]
        assert low <= planned <= high
        # the gap on the database clock is at least the planned delay (never early)...
        assert (next_claim.at - fail.at).total_seconds() >= planned - 0.01
        # ...and not much later than it (poll interval 0.2 s in tests, plus scheduling slack)
        assert (next_claim.at - fail.at).total_seconds() <= planned + 1.0
    record = await handle.get_async()
    assert record.attempt == 4 and record.last_error and record.last_error["type"] == "builtins.ConnectionError"


async def test_retry__exhausted_goes_dead_with_each_attempts_error(aapp: App) -> None:
    @aapp.task(name="always_fails", max_attempts=3, retry=RetryPolicy(base_s=0, jitter=0))
    def always_fails() -> None:
        raise ValueError(f"attempt {conveyor.current_task().attempt}")

    handle = await always_fails.enqueue_async()
    async with running(Worker(aapp)):
        with pytest.raises(TaskFailed, match="attempt 3"):
            await handle.result_async(timeout=10)
    errors = [e.detail["error"] for e in await handle.events_async() if e.kind == "failed"]  # type: ignore[index]
    assert [e["message"] for e in errors] == ["attempt 1", "attempt 2", "attempt 3"]
    assert all("ValueError" in e["traceback"] for e in errors)


async def test_non_retryable_and_dont_retry_on_go_dead_at_once(aapp: App) -> None:
    @aapp.task(name="refuses", max_attempts=5)
    def refuses() -> None:
        raise NonRetryable("bad input")

    @aapp.task(name="keyerror", max_attempts=5, dont_retry_on=[KeyError])
    def keyerror() -> None:
        raise KeyError("missing")

    handles = [await refuses.enqueue_async(), await keyerror.enqueue_async()]
    async with running(Worker(aapp)):
        for handle in handles:
            with pytest.raises(TaskFailed):
                await handle.result_async(timeout=10)
    assert [(await h.get_async()).attempt for h in handles] == [1, 1]


async def test_retry_exception__custom_delay(aapp: App) -> None:
    attempts: list[int] = []

    @aapp.task(name="asks_again", max_attempts=3)
    def asks_again() -> int:
        attempts.append(conveyor.current_task().attempt)
        if len(attempts) == 1:
            raise Retry(delay=0.3)
        return len(attempts)

    handle = await asks_again.enqueue_async()
    async with running(Worker(aapp)):
        assert await handle.result_async(timeout=10) == 2
    failed = [e for e in await handle.events_async() if e.kind == "failed"]
    assert failed[0].detail and failed[0].detail["retry_in_s"] == 0.3


async def test_retry_exception__a_retry_due_later_runs_when_due_without_polling(aapp: App) -> None:
    # No NOTIFY announces a retry due later: the worker learns its due time when the outcome is written.
    @aapp.task(name="asks_again_later", max_attempts=3)
    async def asks_again_later() -> int:
        if conveyor.current_task().attempt == 1:
            raise Retry(delay=0.5)
        return conveyor.current_task().attempt

    # Neither polling nor the rescuer's promotion of due tasks (which notifies) may be what starts it.
    slow = {"poll_interval_s": 60.0, "rescue_interval_s": 60.0}
    worker = Worker(aapp, settings=aapp.settings.worker.model_copy(update=slow))
    async with running(worker):
        await wait_for(lambda: getattr(worker, "listener", None) is not None)
        await asyncio.wait_for(worker.listener.connected.wait(), 10)
        # Outcomes written well after the slot frees: a loop woken at the slot would look for the
        # retry's due time before it exists, and sleep for the whole poll.
        worker.acks.linger_s = 0.3
        handle = await asks_again_later.enqueue_async()
        assert await handle.result_async(timeout=20) == 2  # far below the 60 s poll


async def test_timeout__async_task_is_cancelled_and_fails(aapp: App) -> None:
    @aapp.task(name="slow_async", timeout=0.2, max_attempts=1)
    async def slow_async() -> None:
        await asyncio.sleep(30)

    handle = await slow_async.enqueue_async()
    async with running(Worker(aapp)):
        with pytest.raises(TaskFailed, match="TimeoutError"):
            await handle.result_async(timeout=10)


async def test_timeout__thread_task_is_told_to_stop(aapp: App) -> None:
    saw_cancel = threading.Event()

    @aapp.task(name="slow_thread", timeout=0.2, max_attempts=1)
    def slow_thread() -> None:
        while not conveyor.current_task().cancel_requested:
            time.sleep(0.01)
        saw_cancel.set()

    handle = await slow_thread.enqueue_async()
    async with running(Worker(aapp)):
        with pytest.raises(TaskFailed, match=r"timeout of 0\.2 s"):
            await handle.result_async(timeout=10)
        await wait_for(saw_cancel.is_set)


async def test_cancel__running_async_task_stops_and_is_cancelled(aapp: App) -> None:
    started = asyncio.Event()

    @aapp.task(name="long_async")
    async def long_async() -> None:
        started.set()
        await asyncio.sleep(60)

    handle = await long_async.enqueue_async()
    async with running(Worker(aapp)):
        await asyncio.wait_for(started.wait(), 10)
        assert (await handle.cancel_async()).cancel_requested
        with pytest.raises(TaskCancelled):
            await handle.result_async(timeout=10)
    assert [e.kind for e in await handle.events_async()][-2:] == ["cancel_requested", "cancelled"]


async def test_cancel__running_thread_task_sees_cancel_requested(aapp: App) -> None:
    started = threading.Event()

    @aapp.task(name="long_thread")
    def long_thread() -> str:
        started.set()
        while not conveyor.current_task().cancel_requested:
            time.sleep(0.01)
        return "stopped early"

    handle = await long_thread.enqueue_async()
    async with running(Worker(aapp)):
        await asyncio.to_thread(started.wait, 10)
        await handle.cancel_async()
        with pytest.raises(TaskCancelled):
            await handle.result_async(timeout=10)


async def test_lost_lease__worker_stops_the_execution(aapp: App) -> None:
    started, stopped = asyncio.Event(), asyncio.Event()

    @aapp.task(name="hold")
    async def hold() -> None:
        started.set()
        try:
            await asyncio.sleep(60)
        finally:
            stopped.set()

    handle = await hold.enqueue_async()
    async with running(Worker(aapp)):
        await asyncio.wait_for(started.wait(), 10)
        # Someone else takes the task over (as a rescuer would after a partition).
        async with aapp.store().engine.begin() as conn:
            await conn.exec_driver_sql(
                "UPDATE conveyor_tasks SET lease_token = gen_random_uuid() WHERE id = %(id)s", {"id": handle.id}
            )
        await asyncio.wait_for(stopped.wait(), 10)
    assert (await handle.get_async()).state == TaskState.RUNNING  # the worker wrote nothing for it


async def test_wakeup__listener_reconnects_after_pg_terminate_backend(aapp: App, database_url: str) -> None:
    @aapp.task(name="ping")
    async def ping() -> str:
        return "pong"

    # A poll interval far longer than the test: only a notification can get these tasks started.
    worker = Worker(aapp, settings=aapp.settings.worker.model_copy(update={"poll_interval_s": 60.0}))
    async with running(worker):
        await wait_for(lambda: getattr(worker, "listener", None) is not None)
        await asyncio.wait_for(worker.listener.connected.wait(), 10)
        await asyncio.sleep(0.2)  # let the claimer settle into its long wait
        first = await ping.enqueue_async()
        assert await first.result_async(timeout=5) == "pong"

        old_pid = worker.listener.backend_pid
        with psycopg.connect(database_url, autocommit=True) as admin:
            assert admin.execute("SELECT pg_terminate_backend(%s)", (old_pid,)).fetchone() == (True,)
        await wait_for(lambda: worker.listener.reconnects >= 1 and worker.listener.connected.is_set())
        assert worker.listener.backend_pid != old_pid
        await asyncio.sleep(0.2)
        second = await ping.enqueue_async()
        started = time.monotonic()
        assert await second.result_async(timeout=5) == "pong"
        assert time.monotonic() - started < 30  # far below the 60 s poll: it was a wake-up


async def test_delayed_task__runs_when_due_without_polling(aapp: App) -> None:
    @aapp.task(name="stamp")
    async def stamp() -> str:
        return datetime.now().isoformat()

    worker = Worker(aapp, settings=aapp.settings.worker.model_copy(update={"poll_interval_s": 60.0}))
    async with running(worker):
        handle = await stamp.options(delay=0.5).enqueue_async()
        await handle.result_async(timeout=10)
    record = await handle.get_async()
    assert record.started_at is not None and record.started_at >= record.run_at
    assert (record.started_at - record.created_at).total_seconds() >= 0.5


async def test_unknown_task_name__fails_with_a_clear_error(database_url: str) -> None:
    from tests.conftest import make_settings

    producer = App(settings=make_settings(database_url), strict_names=False)
    consumer = App(settings=make_settings(database_url))
    try:
        handle = await producer.enqueue_async("nobody.knows", max_attempts=1)
        await Worker(consumer, burst=True).run()
        with pytest.raises(TaskFailed, match="UnknownTask"):
            await handle.result_async(timeout=5)
    finally:
        for app in (producer, consumer):
            await app.aclose()
            app.close()


async def test_result_too_large__fails_without_retry(database_url: str) -> None:
    from tests.conftest import make_settings

    app = App(settings=make_settings(database_url, payload_limit_bytes=100))
    try:

        @app.task(name="big", max_attempts=3)
        def big() -> str:
            return "x" * 1000

        handle = await big.enqueue_async()
        await Worker(app, burst=True).run()
        with pytest.raises(TaskFailed, match="PayloadError"):
            await handle.result_async(timeout=5)
        assert (await handle.get_async()).attempt == 1
    finally:
        await app.aclose()
        app.close()


async def test_pause__arriving_while_a_claim_is_under_way__nothing_enqueued_after_it_is_claimed(
    aapp: App, monkeypatch: pytest.MonkeyPatch
) -> None:
    @aapp.task(name="after_pause")
    def after_pause() -> None:
        return None

    worker = Worker(aapp)
    worker.store = aapp.runtime().tasks  # what run() does first; the claim is driven by hand below
    enqueued: list[conveyor.TaskHandle] = []
    read_limits = worker.store.queue_limits

    async def limits_then_pause(queues: list[str]) -> object:
        found = await read_limits(queues)
        # The heartbeat's answer lands while this claim reads the queue limits (its first statement);
        # an operator who sees the worker paused then enqueues.
        worker.paused = True
        enqueued.append(await after_pause.enqueue_async())
        return found

    monkeypatch.setattr(worker.store, "queue_limits", limits_then_pause)

    assert await worker._claim(10) == []
    assert await enqueued[0].status_async() == TaskState.QUEUED
