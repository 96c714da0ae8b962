"""The process executor's pool, with real child processes: results, errors, kills, crashes and shutdown."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import psutil
import pytest

from conveyor.worker.process_child import EXIT_PARENT_GONE
from conveyor.worker.process_pool import ProcessPool, ProcessPoolError

HERE = Path(__file__).resolve().parent
APP = "process_pool_tasks:app"
ENV = {"PYTHONPATH": str(HERE)}  # the children import the tasks module by name
CHILD_MODULE = "conveyor.worker.process_child"


def make_context(**overrides: Any) -> dict[str, Any]:
    context: dict[str, Any] = {
        "id": 41,
        "name": "tests.any",
        "queue": "default",
        "attempt": 1,
        "max_attempts": 3,
        "worker_id": "worker-1",
    }
    context.update(overrides)
    return context


def pool_children() -> list[psutil.Process]:
    """This test process's live pool children (zombies excluded: they are dead, just not reaped)."""
    found = []
    for proc in psutil.Process().children():
        try:
            if CHILD_MODULE in proc.cmdline() and proc.status() != psutil.STATUS_ZOMBIE:
                found.append(proc)
        except psutil.NoSuchProcess:
            continue
    return found


def is_gone(proc: psutil.Process) -> bool:
    try:
        return not proc.is_running() or proc.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


async def wait_until(predicate: Callable[[], bool], what: str, within_s: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + within_s
    while not predicate():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"not within {within_s} s: {what}")
        await asyncio.sleep(0.05)


@pytest.fixture
async def pool() -> AsyncIterator[ProcessPool]:
    pool = ProcessPool(APP, 2, env=ENV)
    await pool.start()
    try:
        yield pool
    finally:
        await pool.close()


@pytest.fixture
async def single() -> AsyncIterator[ProcessPool]:
    pool = ProcessPool(APP, 1, env=ENV)
    await pool.start()
    try:
        yield pool
    finally:
        await pool.close()


async def test_run__returns_what_sync_and_async_tasks_return(pool: ProcessPool) -> None:
    added = await pool.run("tests.add", [2, 3], {}, context=make_context(), timeout_s=10)
    assert added.ok and added.result == 5 and added.error is None
    assert not added.timed_out and not added.killed

    first = await pool.run("tests.async_double", [21], {}, context=make_context(id=7), timeout_s=10)
    assert first.ok and first.result["value"] == 42 and first.result["task_id"] == 7


async def test_run__async_tasks_share_one_event_loop_per_child(single: ProcessPool) -> None:
    first = await single.run("tests.async_double", [1], {}, context=make_context(), timeout_s=10)
    second = await single.run("tests.async_double", [2], {}, context=make_context(), timeout_s=10)
    assert first.result["loop_id"] == second.result["loop_id"]


async def test_run__current_task_is_the_given_context(pool: ProcessPool) -> None:
    outcome = await pool.run("tests.current_attempt", [], {}, context=make_context(attempt=3), timeout_s=10)
    assert outcome.ok and outcome.result == 3


async def test_run__exception_becomes_an_error_dict(pool: ProcessPool) -> None:
    outcome = await pool.run("tests.raise_value_error", ["boom"], {}, context=make_context(), timeout_s=10)
    assert not outcome.ok and not outcome.killed and not outcome.timed_out
    error = outcome.error
    assert error is not None
    assert error["type"] == "builtins.ValueError"
    assert error["types"] == ["builtins.ValueError", "builtins.Exception", "builtins.BaseException"]
    assert error["message"] == "boom"
    assert "raise ValueError(message)" in error["traceback"]
    assert error["traceback"].endswith("ValueError: boom\n")
    assert error["retry_delay"] is None
    assert error["retry_requested"] is False
    assert error["non_retryable"] is False


async def test_run__retry_carries_its_delay(pool: ProcessPool) -> None:
    outcome = await pool.run("tests.raise_retry", [], {}, context=make_context(), timeout_s=10)
    error = outcome.error
    assert error is not None
    assert error["type"] == "conveyor.errors.Retry"
    assert "conveyor.errors.TaskOutcome" in error["types"]
    assert error["retry_delay"] == 5.0
    assert error["retry_requested"] is True
    assert error["non_retryable"] is False


async def test_run__non_retryable_is_flagged(pool: ProcessPool) -> None:
    outcome = await pool.run("tests.raise_non_retryable", [], {}, context=make_context(), timeout_s=10)
    error = outcome.error
    assert error is not None
    assert error["type"] == "conveyor.errors.NonRetryable"
    assert error["message"] == "this input can never work"
    assert error["non_retryable"] is True
    assert error["retry_requested"] is False
    assert error["retry_delay"] is None


async def test_run__non_json_result_is_a_payload_error_and_the_child_lives_on(single: ProcessPool) -> None:
    [child] = pool_children()
    outcome = await single.run("tests.return_non_json", [], {}, context=make_context(), timeout_s=10)
    assert not outcome.ok and not outcome.killed
    assert outcome.error is not None
    assert outcome.error["type"] == "conveyor.errors.PayloadError"
    assert "JSON-serialisable" in outcome.error["message"]

    after = await single.run("tests.add", [1, 1], {}, context=make_context(), timeout_s=10)
    assert after.result == 2
    assert [p.pid for p in pool_children()] == [child.pid]


async def test_run__unknown_task_name_is_an_error(pool: ProcessPool) -> None:
    outcome = await pool.run("tests.nope", [], {}, context=make_context(), timeout_s=10)
    assert outcome.error is not None and outcome.error["type"] == "conveyor.errors.UnknownTask"


async def test_run__non_json_arguments_are_refused_before_any_child_is_used(pool: ProcessPool) -> None:
    from conveyor.errors import PayloadError

    with pytest.raises(PayloadError, match="JSON-serialisable"):
        await pool.run("tests.add", [object(), 1], {}, context=make_context(), timeout_s=10)


async def test_run__noisy_stdout_does_not_disturb_the_protocol(pool: ProcessPool) -> None:
    outcome = await pool.run("tests.print_a_lot", [20_000], {}, context=make_context(), timeout_s=60)
    assert outcome.ok and outcome.result == "done"


async def test_run__long_traceback_keeps_its_end_within_the_limit() -> None:
    limit = 2048
    pool = ProcessPool(APP, 1, env=ENV, traceback_limit_bytes=limit)
    try:
        outcome = await pool.run("tests.long_traceback", [60], {}, context=make_context(), timeout_s=10)
    finally:
        await pool.close()
    assert outcome.error is not None
    traceback = outcome.error["traceback"]
    assert len(traceback.encode()) <= limit
    assert traceback.startswith("[traceback truncated")
    assert traceback.endswith("ValueError: level 59\n")
    assert "level 0\n" not in traceback
    assert outcome.error["message"] == "level 59"


async def test_run__timeout_kills_the_child_and_the_pool_replaces_it(single: ProcessPool) -> None:
    [child] = pool_children()
    outcome = await single.run("tests.sleep_forever", [], {}, context=make_context(), timeout_s=0.5)

    assert not outcome.ok and outcome.timed_out and outcome.killed
    assert outcome.error is not None
    assert outcome.error["type"] == "builtins.TimeoutError"
    assert "exceeded its timeout of 0.5 s" in outcome.error["message"]
    await wait_until(lambda: is_gone(child), "the timed-out child exits")

    after = await single.run("tests.add", [2, 2], {}, context=make_context(), timeout_s=10)
    assert after.result == 4
    assert single.size == 1
    assert [p.pid for p in pool_children()] != [child.pid]
    assert len(pool_children()) == 1


async def test_run__cancelling_kills_the_child(single: ProcessPool, tmp_path: Path) -> None:
    pid_file = tmp_path / "pid"
    run = asyncio.create_task(
        single.run("tests.sleep_forever", [str(pid_file)], {}, context=make_context(), timeout_s=None)
    )
    await wait_until(pid_file.exists, "the task starts")
    child = psutil.Process(int(pid_file.read_text()))

    run.cancel()
    with pytest.raises(asyncio.CancelledError):
        await run
    await wait_until(lambda: is_gone(child), "the cancelled run's child exits")

    after = await single.run("tests.add", [3, 4], {}, context=make_context(), timeout_s=10)
    assert after.result == 7


async def test_run__child_that_exits_is_reported_and_replaced(pool: ProcessPool) -> None:
    outcome = await pool.run("tests.exit_hard", [], {}, context=make_context(), timeout_s=10)

    assert not outcome.ok and outcome.killed and not outcome.timed_out
    assert outcome.error is not None
    assert outcome.error["type"] == "conveyor.worker.process_pool.ChildDied"
    assert "exited with code 3" in outcome.error["message"]

    results = await asyncio.gather(
        *(pool.run("tests.add", [i, i], {}, context=make_context(), timeout_s=10) for i in range(4))
    )
    assert [r.result for r in results] == [0, 2, 4, 6]
    await wait_until(lambda: len(pool_children()) == 2, "the pool is back to two children")


async def test_run__two_runs_overlap_on_a_pool_of_two(pool: ProcessPool, tmp_path: Path) -> None:
    # Each task waits for the other's file: both succeed only if they run at the same time.
    first, second = await asyncio.gather(
        pool.run("tests.rendezvous", [str(tmp_path), "a", "b", 30.0], {}, context=make_context(), timeout_s=60),
        pool.run("tests.rendezvous", [str(tmp_path), "b", "a", 30.0], {}, context=make_context(), timeout_s=60),
    )
    assert first.result is True and second.result is True


@pytest.mark.parametrize(
    ("app_ref", "expected"),
    [
        ("no_such_module_for_conveyor_tests:app", "No module named 'no_such_module_for_conveyor_tests'"),
        ("process_pool_tasks:missing", "has no attribute 'missing'"),
        ("process_pool_tasks:add", "has no .registry"),
        ("process_pool_tasks", "must look like 'package.module:attribute'"),
    ],
)
async def test_start__bad_app_ref_fails_clearly(app_ref: str, expected: str) -> None:
    pool = ProcessPool(app_ref, 1, env=ENV)
    try:
        with pytest.raises(ProcessPoolError, match="could not load the app") as raised:
            await pool.start()
        assert expected in str(raised.value)
        assert pool_children() == []
        # A run without start() surfaces the same error rather than hanging.
        with pytest.raises(ProcessPoolError, match="could not load the app"):
            await pool.run("tests.add", [1, 2], {}, context=make_context(), timeout_s=10)
    finally:
        await pool.close()


async def test_run__slot_whose_child_cannot_restart_fails_runs_clearly_then_heals(tmp_path: Path) -> None:
    flag = tmp_path / "fail-import"
    pool = ProcessPool(APP, 1, env={**ENV, "PROCESS_POOL_TASKS_FAIL_IF_EXISTS": str(flag)})
    try:
        await pool.start()
        flag.touch()  # from now on the app cannot be imported: the replacement child will fail
        crashed = await pool.run("tests.exit_hard", [], {}, context=make_context(), timeout_s=10)
        assert crashed.killed

        with pytest.raises(ProcessPoolError, match="refuses to import"):
            await pool.run("tests.add", [1, 2], {}, context=make_context(), timeout_s=10)

        flag.unlink()
        healed = await pool.run("tests.add", [1, 2], {}, context=make_context(), timeout_s=10)
        assert healed.result == 3
    finally:
        await pool.close()


async def test_close__leaves_no_children_and_refuses_new_runs() -> None:
    pool = ProcessPool(APP, 3, env=ENV)
    await pool.start()
    children = pool_children()
    assert len(children) == 3

    await pool.close()
    await pool.close()  # idempotent

    assert all(is_gone(child) for child in children)
    assert pool_children() == []
    with pytest.raises(ProcessPoolError, match="closed"):
        await pool.run("tests.add", [1, 2], {}, context=make_context(), timeout_s=10)


async def test_close__kills_a_task_still_running_after_the_grace_period(tmp_path: Path) -> None:
    pool = ProcessPool(APP, 2, env=ENV)
    await pool.start()
    pid_file = tmp_path / "pid"
    run = asyncio.create_task(
        pool.run("tests.sleep_forever", [str(pid_file)], {}, context=make_context(), timeout_s=None)
    )
    await wait_until(pid_file.exists, "the task starts")

    await pool.close(grace_s=0.2)

    outcome = await run
    assert not outcome.ok and outcome.killed
    assert outcome.error is not None and "the pool closed" in outcome.error["message"]
    assert pool_children() == []


def test_child__exits_when_its_request_pipe_closes_even_mid_task(tmp_path: Path) -> None:
    """EOF on the request pipe is what ends an orphaned child, whatever its task is doing."""
    request_read, request_write = os.pipe()
    reply_read, reply_write = os.pipe()
    command = [
        sys.executable, "-m", CHILD_MODULE, APP,
        "--request-fd", str(request_read),
        "--reply-fd", str(reply_write),
        "--parent-pid", str(os.getpid()),
    ]  # fmt: skip
    with (
        os.fdopen(request_write, "wb", buffering=0) as requests,
        os.fdopen(reply_read, "rb") as replies,
        subprocess.Popen(command, pass_fds=(request_read, reply_write), env={**os.environ, **ENV}) as child,
    ):
        os.close(request_read)
        os.close(reply_write)
        try:
            assert json.loads(replies.readline())["ready"] is True
            pid_file = tmp_path / "pid"
            request = {
                "id": 1,
                "task": "tests.sleep_forever",
                "args": [str(pid_file)],
                "kwargs": {},
                "context": make_context(),
            }
            requests.write(json.dumps(request).encode() + b"\n")
            deadline = time.monotonic() + 10
            while not pid_file.exists():
                assert time.monotonic() < deadline, "the task did not start within 10 s"
                time.sleep(0.05)

            requests.close()
            assert child.wait(timeout=10) == EXIT_PARENT_GONE
        finally:
            if child.poll() is None:
                child.kill()


async def test_children_die_when_the_worker_is_sigkilled(tmp_path: Path) -> None:
    script = tmp_path / "worker.py"
    script.write_text(
        textwrap.dedent(
            """
            import asyncio, json, os, sys
            from pathlib import Path

            import psutil

            from conveyor.worker.process_pool import ProcessPool

            async def main(out, pid_file, pythonpath):
                pool = ProcessPool("process_pool_tasks:app", 2, env={"PYTHONPATH": pythonpath})
                await pool.start()
                context = {"id": 1, "name": "n", "queue": "q", "attempt": 1, "max_attempts": 1}
                busy = asyncio.create_task(
                    pool.run("tests.sleep_forever", [pid_file], {}, context=context, timeout_s=None)
                )
                while not Path(pid_file).exists():
                    await asyncio.sleep(0.02)
                Path(out + ".tmp").write_text(json.dumps([p.pid for p in psutil.Process().children()]))
                os.replace(out + ".tmp", out)
                await busy

            asyncio.run(main(*sys.argv[1:]))
            """
        )
    )
    out = tmp_path / "pids.json"
    worker = await asyncio.create_subprocess_exec(
        sys.executable, str(script), str(out), str(tmp_path / "busy.pid"), str(HERE), stdin=subprocess.DEVNULL
    )
    children: list[psutil.Process] = []
    try:
        await wait_until(out.exists, "the worker reports its children", within_s=60)
        children = [psutil.Process(pid) for pid in json.loads(out.read_text())]
        assert len(children) == 2

        worker.send_signal(signal.SIGKILL)
        assert await worker.wait() == -signal.SIGKILL

        await wait_until(lambda: all(is_gone(child) for child in children), "the orphaned children exit")
    finally:
        if worker.returncode is None:
            worker.kill()
            await worker.wait()
        for child in children:
            if not is_gone(child):
                child.kill()
