"""Workflows against a real PostgreSQL with in-process workers: results flow along edges, failures and
cancellations reach exactly whom they should, retries and restarts leave the graph consistent."""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import psycopg
import pytest

import conveyor
from conveyor import chain, chord, group
from conveyor.app import App
from conveyor.core.records import Outcome
from conveyor.core.retry import RetryPolicy
from conveyor.core.states import TaskState
from conveyor.core.workflow_records import WorkflowState
from conveyor.db import task_sql
from conveyor.db.errors import translate_errors
from conveyor.db.executors import execute_async
from conveyor.errors import DatabaseError, ResultTimeout
from conveyor.handles import Task
from conveyor.worker.worker import Worker
from conveyor.workflows import (
    InvalidWorkflow,
    WorkflowCancelled,
    WorkflowError,
    WorkflowFailed,
    WorkflowHandle,
    WorkflowStateError,
)

NO_WAIT = RetryPolicy(base_s=0, jitter=0)


@dataclass
class Tasks:
    add: Task[..., Any]
    mul: Task[..., Any]
    total: Task[..., Any]
    echo: Task[..., Any]
    collect: Task[..., Any]
    fail: Task[..., Any]
    hold: Task[..., Any]
    runs: dict[str, int] = field(default_factory=dict)
    released: asyncio.Event = field(default_factory=asyncio.Event)


def register(app: App) -> Tasks:
    runs: dict[str, int] = {}
    released = asyncio.Event()

    def ran(label: str) -> None:
        runs[label] = runs.get(label, 0) + 1

    @app.task(name="add")
    def add(a: int, b: int) -> int:
        return a + b

    @app.task(name="mul")
    def mul(a: int, b: int) -> int:
        return a * b

    @app.task(name="total")
    def total(values: list[int], extra: int = 0) -> int:
        return sum(values) + extra

    @app.task(name="echo")
    async def echo(*args: Any) -> Any:
        ran(str(args[-1]) if args else "echo")
        return list(args) if len(args) != 1 else args[0]

    @app.task(name="collect")
    async def collect(*args: Any) -> Any:
        ran("collect")
        return list(args)

    @app.task(name="fail", max_attempts=1)
    async def fail(*args: Any) -> None:
        ran("fail")
        raise RuntimeError("boom")

    @app.task(name="hold", max_attempts=1)
    async def hold(*args: Any) -> str:
        """Runs until the test sets ``released`` (or its cancellation is requested)."""
        ran("hold")
        while not released.is_set():
            if conveyor.current_task().cancel_requested:
                raise RuntimeError("stopped on request")
            await asyncio.sleep(0.01)
        return "held"

    return Tasks(add, mul, total, echo, collect, fail, hold, runs, released)


@asynccontextmanager
async def running(worker: Worker) -> AsyncIterator[Worker]:
    task = asyncio.create_task(worker.run())
    try:
        yield worker
    finally:
        worker.request_stop()
        await asyncio.wait_for(task, 20)


async def drain(app: App, *handles: WorkflowHandle, timeout_s: float = 60, workers: int = 1, **options: Any) -> None:
    """Run workers until every workflow given has finished (not burst workers: "the queues are empty"
    is briefly true between a step's end and the write of its outcome, which releases the next one)."""

    async def finished() -> bool:
        return all([(await h.get_async()).state != WorkflowState.RUNNING for h in handles])

    async with AsyncExitStack() as stack:
        for _ in range(workers):
            await stack.enter_async_context(running(Worker(app, **options)))
        await wait_until(finished, timeout_s)


async def states(handle: WorkflowHandle) -> dict[str, TaskState]:
    return {s.name: s.state for s in await handle.steps_async()}


async def reasons(app: App, handle: WorkflowHandle) -> dict[str, str]:
    """Step name -> reason of its 'cancelled' event, for the steps that have one."""
    found = {}
    for step in await handle.steps_async():
        for event in await app.store().events(step.task_id):
            if event.kind in ("cancelled", "cancel_requested") and event.detail and "reason" in event.detail:
                found[step.name] = event.detail["reason"]
    return found


async def wait_until(predicate: Any, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not await predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.02)


# -- results flow along the edges ---------------------------------------------------------------------


async def test_chain__passes_each_result_to_the_next(aapp: App) -> None:
    t = register(aapp)
    handle = await chain(t.add.s(1, 2), t.add.s(10), t.mul.s(3)).enqueue_async(aapp)
    await drain(aapp, handle)
    assert await handle.result_async(timeout=5) == 39  # ((1 + 2) + 10) * 3
    record = await handle.get_async()
    assert record.state == WorkflowState.SUCCEEDED and record.steps_remaining == 0 and record.finished_at
    assert [s.name for s in await handle.steps_async()] == ["0:add", "1:add", "2:mul"]


async def test_submit__steps_waiting_on_others_are_blocked_before_any_worker_can_see_them(aapp: App) -> None:
    t = register(aapp)
    handle = await chain(t.add.s(1, 2), t.add.s(10), t.mul.s(3)).enqueue_async(aapp)
    assert await states(handle) == {"0:add": "queued", "1:add": "blocked", "2:mul": "blocked"}
    graph = await handle.graph_async()
    assert [(e.parent, e.child, e.position, e.needs_result) for e in graph.edges] == [
        ("0:add", "1:add", 0, True),
        ("1:add", "2:mul", 0, True),
    ]
    assert [s.deps_pending for s in graph.steps] == [0, 1, 1]


async def test_group__collects_results_in_the_order_given(aapp: App) -> None:
    @aapp.task(name="slow_echo")
    async def slow_echo(value: int, delay_s: float) -> int:
        await asyncio.sleep(delay_s)
        return value

    # The first member finishes last: the order is the group's, not the finishing order.
    handle = await group(slow_echo.s(i, 0.05 * (5 - i)) for i in range(5)).enqueue_async(aapp)
    await drain(aapp, handle, concurrency=5)
    assert await handle.result_async(timeout=5) == [0, 1, 2, 3, 4]


async def test_chord__callback_gets_the_list_of_results(aapp: App) -> None:
    t = register(aapp)
    handle = await chord(group(t.add.s(i, i) for i in range(5)), t.total.s(100)).enqueue_async(aapp)
    await drain(aapp, handle)
    assert await handle.result_async(timeout=5) == 120  # 0+2+4+6+8 + 100 (own args follow the inputs)


async def test_chain_with_a_group__group_members_each_get_the_value_then_the_next_gets_the_list(
    aapp: App,
) -> None:
    t = register(aapp)
    handle = await chain(t.add.s(1, 1), group(t.mul.s(2), t.mul.s(3)), t.total.s()).enqueue_async(aapp)
    await drain(aapp, handle)
    assert await handle.result_async(timeout=5) == 10  # 2 -> [4, 6] -> 10


async def test_chain_ending_with_a_group__result_is_the_list(aapp: App) -> None:
    t = register(aapp)
    handle = await chain(t.add.s(1, 1), group(t.mul.s(2), t.mul.s(3))).enqueue_async(aapp)
    await drain(aapp, handle)
    assert await handle.result_async(timeout=5) == [4, 6]


async def test_dag__diamond_joins_both_branches_in_depends_on_order(aapp: App) -> None:
    t = register(aapp)
    wf = aapp.workflow("diamond")
    wf.add(t.add.s(1, 2), name="a")
    wf.add(t.mul.s(10), name="b", depends_on=["a"])
    wf.add(t.add.s(5), name="c", depends_on=["a"])
    wf.add(t.collect.s("own"), name="d", depends_on=["c", "b"])
    handle = await wf.enqueue_async()
    await drain(aapp, handle)
    assert await handle.result_async(timeout=5) == {"a": 3, "b": 30, "c": 8, "d": [[8, 30], "own"]}
    assert t.runs == {"collect": 1}


async def test_dag__pass_results_false_waits_but_receives_nothing(aapp: App) -> None:
    t = register(aapp)
    wf = aapp.workflow("ordering")
    wf.add(t.add.s(1, 2), name="first")
    wf.add(t.collect.s("mine"), name="then", depends_on=["first"], pass_results=False)
    handle = await wf.enqueue_async()
    await drain(aapp, handle)
    assert (await handle.result_async(timeout=5))["then"] == ["mine"]


async def test_fan_out_fan_in__1000_steps__callback_sees_every_result_in_order(aapp: App) -> None:
    t = register(aapp)
    width = 1000
    started = time.monotonic()
    handle = await chain(t.add.s(0, 1), group(t.add.s(i) for i in range(width)), t.collect.s()).enqueue_async(aapp)
    submitted = time.monotonic()
    # Two workers: their FINISH batches decrement the fan-in's counter concurrently (row locks serialise them).
    await drain(aapp, handle, workers=2, concurrency=25)
    result = await handle.result_async(timeout=5)
    finished = time.monotonic()
    assert result == [[1 + i for i in range(width)]]
    record = await handle.get_async()
    assert record.state == WorkflowState.SUCCEEDED and record.steps_total == width + 2
    assert t.runs == {"collect": 1}
    print(f"\n1,000-wide fan-out/fan-in: submit {submitted - started:.2f} s, run {finished - submitted:.2f} s")


# -- failures -------------------------------------------------------------------------------------------


def _failure_graph(app: App, t: Tasks, on_failure: str) -> Any:
    """
    ok ──> boom ──> needs ──> needs2
             │         └──(no result)──> after_needs
             └──(no result)──> ignores ──> ignores2
    solo ──> solo2             (unrelated to boom)
    """
    wf = app.workflow(f"failure-{on_failure}", on_failure=on_failure)  # type: ignore[arg-type]
    wf.add(t.add.s(1, 1), name="ok")
    wf.add(t.fail.s(), name="boom", depends_on=["ok"])
    wf.add(t.echo.s("needs"), name="needs", depends_on=["boom"])
    wf.add(t.echo.s("needs2"), name="needs2", depends_on=["needs"])
    wf.add(t.echo.s("after_needs"), name="after_needs", depends_on=["needs"], pass_results=False)
    wf.add(t.echo.s("ignores"), name="ignores", depends_on=["boom"], pass_results=False)
    wf.add(t.echo.s("ignores2"), name="ignores2", depends_on=["ignores"])
    wf.add(t.hold.s(), name="solo")
    wf.add(t.echo.s("solo2"), name="solo2", depends_on=["solo"])
    return wf


async def test_stop__cancels_exactly_the_dependents_of_the_failed_step(aapp: App) -> None:
    t = register(aapp)
    t.released.set()  # solo finishes at once: the unrelated branch is not stopped
    handle = await _failure_graph(aapp, t, "stop").enqueue_async()
    async with running(Worker(aapp, concurrency=4)):
        with pytest.raises(WorkflowFailed) as failed:
            await handle.result_async(timeout=15)
    assert await states(handle) == {
        "ok": "succeeded",
        "boom": "dead",
        "needs": "cancelled",
        "needs2": "cancelled",
        "after_needs": "cancelled",
        "ignores": "cancelled",
        "ignores2": "cancelled",
        "solo": "succeeded",  # unrelated to boom: runs
        "solo2": "succeeded",
    }
    boom = (await handle.step_async("boom")).id
    # Exactly the dependents of boom are cancelled *because of it* (transitively) ...
    why = await reasons(aapp, handle)
    assert {name: reason for name, reason in why.items() if "dependency" in reason} == {
        "needs": f"workflow: dependency {boom} dead",
        "ignores": f"workflow: dependency {boom} dead",
        "needs2": f"workflow: dependency {(await handle.step_async('needs')).id} cancelled",
        "after_needs": f"workflow: dependency {(await handle.step_async('needs')).id} cancelled",
        "ignores2": f"workflow: dependency {(await handle.step_async('ignores')).id} cancelled",
    }
    # ... and nothing else: under stop even the steps that would not need boom's result are cancelled,
    # but a branch that does not depend on boom at all is left alone.
    assert set(why) == {"needs", "ignores", "needs2", "after_needs", "ignores2"}
    assert t.runs["fail"] == 1 and t.runs["hold"] == 1
    assert set(failed.value.errors) == {"boom", *[n for n in why]}
    assert failed.value.errors["boom"]["message"] == "boom"  # type: ignore[index]
    record = await handle.get_async()
    assert record.state == WorkflowState.FAILED and record.stop_reason == f"step {boom} dead"


async def test_continue__cancels_only_dependents_that_need_the_failed_result(aapp: App) -> None:
    t = register(aapp)
    t.released.set()  # solo finishes at once
    handle = await _failure_graph(aapp, t, "continue").enqueue_async()
    await drain(aapp, handle)
    with pytest.raises(WorkflowFailed):
        await handle.result_async(timeout=5)
    assert await states(handle) == {
        "ok": "succeeded",
        "boom": "dead",
        "needs": "cancelled",  # needs boom's result
        "needs2": "cancelled",  # needs needs' result
        "after_needs": "succeeded",  # waits for needs without its result: runs
        "ignores": "succeeded",  # waits for boom without its result: runs
        "ignores2": "succeeded",
        "solo": "succeeded",  # unrelated: runs
        "solo2": "succeeded",
    }
    assert set(await reasons(aapp, handle)) == {"needs", "needs2"}
    assert (await handle.get_async()).stop_reason is None


async def test_retries_of_a_step_happen_before_its_dependents_are_judged(aapp: App) -> None:
    t = register(aapp)
    attempts: list[int] = []

    @aapp.task(name="flaky", max_attempts=3, retry=NO_WAIT)
    def flaky() -> str:
        attempts.append(conveyor.current_task().attempt)
        if len(attempts) == 1:
            raise ConnectionError("first attempt fails")
        return "ok"

    handle = await chain(flaky.s(), t.echo.s("after")).enqueue_async(aapp)
    await drain(aapp, handle)
    assert await handle.result_async(timeout=5) == ["ok", "after"]
    assert attempts == [1, 2]
    after = await handle.step_async("1:echo")
    assert [e.detail for e in await after.events_async() if e.kind == "updated"] == [
        {"released": True, "after": (await handle.step_async("0:flaky")).id}
    ]
    assert t.runs == {"after": 1}


async def test_failed_step_result__failure_raises_with_the_error_of_the_step(aapp: App) -> None:
    t = register(aapp)
    handle = await chain(t.fail.s(), t.echo.s()).enqueue_async(aapp)
    await drain(aapp, handle)
    with pytest.raises(WorkflowFailed, match=re.escape("step '0:fail' builtins.RuntimeError: boom")) as failed:
        await handle.result_async(timeout=5)
    assert failed.value.errors["1:echo"] is None  # cancelled before it ran


# -- cancel and retry --------------------------------------------------------------------------------


async def test_cancel__cancels_waiting_steps_and_stops_running_ones(aapp: App) -> None:
    t = register(aapp)
    handle = await chain(t.hold.s(), t.echo.s("next"), t.echo.s("last")).enqueue_async(aapp)
    async with running(Worker(aapp)):
        await wait_until(lambda: _state_is(handle, "0:hold", TaskState.RUNNING))
        record = await handle.cancel_async()
        assert record.cancel_requested and record.state == WorkflowState.RUNNING  # hold still stopping
        assert (await states(handle))["1:echo"] == TaskState.CANCELLED
        with pytest.raises(WorkflowCancelled):
            await handle.result_async(timeout=10)
    assert await states(handle) == {"0:hold": "cancelled", "1:echo": "cancelled", "2:echo": "cancelled"}
    assert t.runs == {"hold": 1}
    with pytest.raises(WorkflowStateError, match=r"cannot cancel workflow \d+: it is cancelled"):
        await handle.cancel_async()


async def _state_is(handle: WorkflowHandle, step: str, state: TaskState) -> bool:
    return (await states(handle))[step] == state


async def test_cancel__of_a_finished_workflow_is_refused(aapp: App) -> None:
    t = register(aapp)
    handle = await chain(t.add.s(1, 1)).enqueue_async(aapp)
    await drain(aapp, handle)
    with pytest.raises(WorkflowStateError, match="it is succeeded"):
        await handle.cancel_async()
    assert (await handle.get_async()).state == WorkflowState.SUCCEEDED


async def test_cancelling_one_waiting_step_with_the_task_api__counts_as_its_failure(aapp: App) -> None:
    t = register(aapp)
    wf = aapp.workflow("one-cancelled", on_failure="continue")
    wf.add(t.hold.s(), name="root")
    wf.add(t.echo.s("x"), name="victim", depends_on=["root"])
    wf.add(t.echo.s("y"), name="needs_victim", depends_on=["victim"])
    wf.add(t.echo.s("z"), name="waits_for_victim", depends_on=["root", "victim"], pass_results=False)
    handle = await wf.enqueue_async()
    await (await handle.step_async("victim")).cancel_async()  # blocked: cancelled at once
    assert await states(handle) == {
        "root": "queued",
        "victim": "cancelled",
        "needs_victim": "cancelled",
        "waits_for_victim": "blocked",  # under continue it still runs, once root is done
    }
    t.released.set()
    await drain(aapp, handle)
    assert await states(handle) == {
        "root": "succeeded",
        "victim": "cancelled",
        "needs_victim": "cancelled",
        "waits_for_victim": "succeeded",
    }
    assert (await handle.get_async()).state == WorkflowState.FAILED


async def test_retry__reruns_only_the_failed_step_and_its_dependents(aapp: App) -> None:
    t = register(aapp)
    broken = {"yes": True}

    @aapp.task(name="fragile", max_attempts=1)
    def fragile(value: int) -> int:
        t.runs["fragile"] = t.runs.get("fragile", 0) + 1
        if broken["yes"]:
            raise RuntimeError("not yet")
        return value * 100

    wf = aapp.workflow("retry-me", on_failure="continue")
    wf.add(t.add.s(1, 2), name="root")
    wf.add(fragile.s(), name="fragile", depends_on=["root"])
    wf.add(t.echo.s("after"), name="after", depends_on=["fragile"])
    wf.add(t.echo.s("side"), name="side", depends_on=["root"])
    handle = await wf.enqueue_async()
    await drain(aapp, handle)
    with pytest.raises(WorkflowFailed):
        await handle.result_async(timeout=5)
    assert t.runs == {"fragile": 1, "side": 1}

    broken["yes"] = False
    record = await handle.retry_async()
    assert record.state == WorkflowState.RUNNING and record.steps_remaining == 2
    assert await states(handle) == {"root": "succeeded", "fragile": "queued", "after": "blocked", "side": "succeeded"}
    await drain(aapp, handle)
    assert await handle.result_async(timeout=5) == {
        "root": 3,
        "fragile": 300,
        "after": [300, "after"],
        "side": [3, "side"],
    }
    assert t.runs == {"fragile": 2, "side": 1, "after": 1}
    with pytest.raises(WorkflowStateError, match=r"cannot retry workflow \d+: it is succeeded"):
        await handle.retry_async()


async def test_retry__after_stop_reruns_everything_that_did_not_succeed(aapp: App) -> None:
    t = register(aapp)
    t.released.set()
    broken = {"yes": True}

    @aapp.task(name="fragile", max_attempts=1)
    def fragile() -> int:
        if broken["yes"]:
            raise RuntimeError("not yet")
        return 7

    wf = aapp.workflow("stopped")
    wf.add(t.add.s(1, 2), name="root")
    wf.add(fragile.s(), name="fragile", depends_on=["root"], pass_results=False)
    wf.add(t.echo.s("x"), name="after", depends_on=["fragile"])
    wf.add(t.hold.s(), name="unrelated", depends_on=["fragile"], pass_results=False)
    handle = await wf.enqueue_async()
    await drain(aapp, handle)
    with pytest.raises(WorkflowFailed):
        await handle.result_async(timeout=5)
    broken["yes"] = False
    await handle.retry_async()
    await drain(aapp, handle)
    assert await handle.result_async(timeout=5) == {"root": 3, "fragile": 7, "after": [7, "x"], "unrelated": "held"}
    assert (await handle.get_async()).stop_reason is None


async def test_retry__of_a_running_workflow_is_refused(aapp: App) -> None:
    t = register(aapp)
    handle = await chain(t.add.s(1, 1), t.add.s(1)).enqueue_async(aapp)
    with pytest.raises(WorkflowStateError, match="it is running"):
        await handle.retry_async()


async def test_task_retry_of_one_step__reopens_the_workflow_and_releases_its_dependents_again(aapp: App) -> None:
    t = register(aapp)
    broken = {"yes": True}

    @aapp.task(name="fragile", max_attempts=1)
    def fragile() -> int:
        if broken["yes"]:
            raise RuntimeError("not yet")
        return 5

    wf = aapp.workflow("one-step", on_failure="continue")
    wf.add(fragile.s(), name="fragile")
    wf.add(t.echo.s("loose"), name="loose", depends_on=["fragile"], pass_results=False)
    handle = await wf.enqueue_async()
    await drain(aapp, handle)
    assert await states(handle) == {"fragile": "dead", "loose": "succeeded"}
    assert (await handle.get_async()).state == WorkflowState.FAILED

    broken["yes"] = False
    await (await handle.step_async("fragile")).retry_async()  # the task API, not the workflow's
    assert (await handle.get_async()).state == WorkflowState.RUNNING
    await drain(aapp, handle)
    assert await handle.result_async(timeout=5) == {"fragile": 5, "loose": "loose"}
    graph = await handle.graph_async()
    assert graph.workflow.steps_remaining == 0 and [s.deps_pending for s in graph.steps] == [0, 0]


# -- robustness ----------------------------------------------------------------------------------------


async def test_submit__is_all_or_nothing(aapp: App) -> None:
    t = register(aapp)
    with pytest.raises(InvalidWorkflow, match="step '1:nope'") as bad:
        await chain(t.add.s(1, 1), conveyor.Signature("nope")).enqueue_async(aapp)
    assert bad.value.step == "1:nope" and bad.value.field == "task"
    async with aapp.store().engine.connect() as conn:
        counts = await execute_async(
            conn,
            "SELECT (SELECT count(*) FROM conveyor_tasks) AS t, (SELECT count(*) FROM conveyor_workflows) AS w",
            {},
        )
    assert counts == [{"t": 0, "w": 0}]


async def test_canvas_of_task_signatures__finds_its_app_by_itself(aapp: App) -> None:
    t = register(aapp)
    handle = await chain(t.add.s(1, 1), group(t.mul.s(2), t.add.s(1).set(priority=3)), t.total.s()).enqueue_async()
    await drain(aapp, handle)
    assert await handle.result_async(timeout=5) == 7  # (1 + 1) * 2 + (1 + 1) + 1


async def test_canvas_without_an_app__says_how_to_give_it_one(aapp: App) -> None:
    t = register(aapp)
    by_name = conveyor.Signature("add", (1, 1))
    with pytest.raises(WorkflowError, match="built by name, so pass it"):
        await chain(by_name).enqueue_async()
    handle = await chain(by_name, app=aapp).enqueue_async()
    await drain(aapp, handle)
    assert await handle.result_async(timeout=5) == 2

    other = App(settings=aapp.settings)

    @other.task(name="add")
    def stranger(a: int, b: int) -> int:
        return a + b

    with pytest.raises(WorkflowError, match="2 different apps: pass the one"):
        await chain(group(by_name, stranger.s(1, 2)), t.total.s().set(priority=1)).enqueue_async()
    with pytest.raises(WorkflowError, match="2 different apps: pass the one"):
        await chord([stranger.s(1, 2)], t.total.s()).enqueue_async()
    other.close()


async def test_result__times_out_while_running(aapp: App) -> None:
    t = register(aapp)
    handle = await chain(t.add.s(1, 1)).enqueue_async(aapp)
    with pytest.raises(ResultTimeout, match="1 of 1 steps unfinished"):
        await handle.result_async(timeout=0.05)


def test_sync_facade(app: App) -> None:
    t = register(app)
    handle = chain(t.add.s(2, 3), t.mul.s(2)).enqueue(app)
    app.run_sync(drain(app, handle))
    assert handle.result(timeout=5) == 10
    assert handle.status() == WorkflowState.SUCCEEDED
    assert [s.state for s in handle.steps()] == ["succeeded", "succeeded"]


async def test_rescued_step__runs_again_before_dependents_are_judged_and_a_lost_last_attempt_fails_them(
    aapp: App,
) -> None:
    t = register(aapp)
    handle = await chain(t.add.s(1, 1), t.echo.s("next")).enqueue_async(aapp)
    first = (await handle.step_async("0:add")).id
    store = aapp.store()

    async def claim_and_lose_the_worker(max_losses: int) -> None:
        [claimed] = await store.claim("00000000-0000-0000-0000-000000000001", ["default"], 1, 30)
        assert claimed.id == first
        # The worker dies; its lease runs out (back-dated) and the rescuer takes the task back.
        async with store.engine.begin() as conn:
            await conn.exec_driver_sql(
                "UPDATE conveyor_tasks SET lease_expires_at = now() - interval '1 second' WHERE id = %(id)s",
                {"id": first},
            )
        await store.rescue(max_worker_losses=max_losses)

    await claim_and_lose_the_worker(max_losses=5)
    # Queued again: a retry, so the dependent is not judged yet.
    assert await states(handle) == {"0:add": "queued", "1:echo": "blocked"}
    await claim_and_lose_the_worker(max_losses=2)
    # Its second loss makes it dead: now the dependent is cancelled, in the rescuer's transaction.
    assert await states(handle) == {"0:add": "dead", "1:echo": "cancelled"}
    assert (await handle.get_async()).state == WorkflowState.FAILED


async def test_deadlock_between_two_finish_batches__is_a_database_error_and_the_retry_succeeds(
    aapp: App, database_url: str
) -> None:
    """Two FINISH batches each finishing a step of two workflows, in opposite orders: the row locks
    they take on the two workflow rows can deadlock. PostgreSQL breaks it; the loser's error must be a
    DatabaseError (what the worker's ack buffer retries), and the retried batch must advance both."""
    t = register(aapp)
    one = await chain(group(t.add.s(1, 1), t.add.s(2, 2)), t.collect.s()).enqueue_async(aapp)
    two = await chain(group(t.add.s(3, 3), t.add.s(4, 4)), t.collect.s()).enqueue_async(aapp)
    store = aapp.store()
    claimed = {c.id: c for c in await store.claim("00000000-0000-0000-0000-000000000002", ["default"], 4, 30)}
    a1, a2 = (await one.step_async("0.0:add")).id, (await one.step_async("0.1:add")).id
    b1, b2 = (await two.step_async("0.0:add")).id, (await two.step_async("0.1:add")).id

    def outcome(task_id: int) -> dict[str, Any]:
        return {
            "ids": [task_id],
            "tokens": [claimed[task_id].lease_token],
            "states": ["succeeded"],
            "results": ["1"],
            "errors": [None],
            "delays": [None],
        }

    async with (
        await psycopg.AsyncConnection.connect(database_url) as x,
        await psycopg.AsyncConnection.connect(database_url) as y,
    ):
        await x.execute("SET deadlock_timeout = '100ms'")
        await y.execute("SET deadlock_timeout = '100ms'")
        await execute_async(x, task_sql.FINISH, outcome(a1))  # x holds workflow one
        await execute_async(y, task_sql.FINISH, outcome(b1))  # y holds workflow two
        results = await asyncio.gather(
            execute_async(x, task_sql.FINISH, outcome(b2)),  # x waits for two
            execute_async(y, task_sql.FINISH, outcome(a2)),  # y waits for one: deadlock
            return_exceptions=True,
        )
        errors = [r for r in results if isinstance(r, BaseException)]
        assert len(errors) == 1 and isinstance(errors[0], DatabaseError)
        assert "DeadlockDetected" in str(errors[0])
        loser, winner = (x, y) if isinstance(results[0], BaseException) else (y, x)
        await loser.rollback()
        await winner.commit()
    # What the ack buffer does next: write the whole batch again, on a fresh statement.
    accepted = await store.finish(
        [Outcome(i, claimed[i].lease_token, TaskState.SUCCEEDED, result_json="1") for i in (a1, a2, b1, b2)]
    )
    assert accepted  # the loser's two outcomes (the winner's are already recorded)
    expected = {"0.0:add": "succeeded", "0.1:add": "succeeded", "1:collect": "queued"}
    assert await states(one) == await states(two) == expected


def test_deadlock_detected__is_translated_to_the_error_the_ack_buffer_retries() -> None:
    with pytest.raises(DatabaseError, match="DeadlockDetected"), translate_errors():
        raise psycopg.errors.DeadlockDetected("deadlock detected")
