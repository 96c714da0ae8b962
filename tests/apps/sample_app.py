"""A Conveyor app for tests that run real worker processes (importable as ``sample_app:app``).

Tasks that must be counted record each execution in the table ``test_executions`` of the test
database (``CONVEYOR_DATABASE_URL``), so a test can assert "ran exactly once / exactly twice" from
outside the worker, even across SIGKILLs.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from pathlib import Path

import psycopg

import conveyor
from conveyor import App

app = App()

_DDL = """CREATE TABLE IF NOT EXISTS test_executions (
    task_id bigint NOT NULL, attempt int NOT NULL, pid int NOT NULL, label text,
    at timestamptz NOT NULL DEFAULT clock_timestamp())"""


def _record(label: str | None = None) -> None:
    ctx = conveyor.current_task()
    with psycopg.connect(os.environ["CONVEYOR_DATABASE_URL"], autocommit=True) as conn:
        # Two first executions may race to create it: CREATE ... IF NOT EXISTS is not atomic.
        with contextlib.suppress(psycopg.errors.UniqueViolation, psycopg.errors.DuplicateTable):
            conn.execute(_DDL)
        conn.execute(
            "INSERT INTO test_executions (task_id, attempt, pid, label) VALUES (%s, %s, %s, %s)",
            (ctx.id, ctx.attempt, os.getpid(), label),
        )


@app.task(name="add")
def add(a: int, b: int) -> int:
    return a + b


@app.task(name="noop")
def noop() -> None:
    return None


@app.task(name="record")
def record(label: str | None = None) -> str:
    _record(label)
    return "recorded"


@app.task(name="record_then_block", max_attempts=5)
def record_then_block(release_file: str) -> str:
    """Records its execution, then waits until ``release_file`` exists (a test's signal to finish)."""
    _record("started")
    while not Path(release_file).exists():
        time.sleep(0.02)
    return "released"


@app.task(name="sleep", max_attempts=1)
def sleep(seconds: float) -> float:
    _record("sleep")
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if conveyor.current_task().cancel_requested:
            raise RuntimeError("stopped on request")
        time.sleep(0.01)
    return seconds


@app.task(name="async_sleep", max_attempts=1)
async def async_sleep(seconds: float) -> float:
    await asyncio.sleep(seconds)
    return seconds


@app.task(name="stuck_in_c", executor="process", timeout=0.5, max_attempts=1)
def stuck_in_c() -> None:
    _record("stuck")
    time.sleep(1000)  # a C-level sleep: only killing the process stops it


@app.task(name="kill_my_worker", max_attempts=10)
def kill_my_worker() -> None:
    """A poison pill: kills the worker process that runs it."""
    _record("kill")
    os.kill(os.getpid(), 9)


@app.task(name="tally", max_attempts=3)
def tally(directory: str) -> None:
    """Appends its id to a per-process file: cheap enough for 10,000 runs, exact enough to count them."""
    ctx = conveyor.current_task()
    with open(Path(directory) / f"{os.getpid()}.txt", "a") as out:
        out.write(f"{ctx.id}\n")


@app.task(name="stubborn", max_attempts=3)
def stubborn(seconds: float) -> None:
    """Ignores cancellation (as badly written code does)."""
    _record("stubborn")
    time.sleep(seconds)
