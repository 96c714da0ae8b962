"""A Conveyor app for workflow tests that run real worker processes (importable as ``wf_app:app``).

Every execution is recorded in ``test_executions`` of the test database (as in ``sample_app``), so a test
can tell from outside, across SIGKILLs, how many times each step ran and in which process.
"""

from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path
from typing import Any

import psycopg

import conveyor
from conveyor import App

app = App()

_DDL = """CREATE TABLE IF NOT EXISTS test_executions (
    task_id bigint NOT NULL, attempt int NOT NULL, pid int NOT NULL, label text,
    at timestamptz NOT NULL DEFAULT clock_timestamp())"""


def _record(label: str) -> None:
    ctx = conveyor.current_task()
    with psycopg.connect(os.environ["CONVEYOR_DATABASE_URL"], autocommit=True) as conn:
        # Two first executions may race to create it: CREATE ... IF NOT EXISTS is not atomic.
        with contextlib.suppress(psycopg.errors.UniqueViolation, psycopg.errors.DuplicateTable):
            conn.execute(_DDL)
        conn.execute(
            "INSERT INTO test_executions (task_id, attempt, pid, label) VALUES (%s, %s, %s, %s)",
            (ctx.id, ctx.attempt, os.getpid(), label),
        )


@app.task(name="wf.seed")
def seed(value: int) -> int:
    _record("seed")
    return value


@app.task(name="wf.hold", max_attempts=3)
def hold(previous: Any, label: str, release_file: str) -> str:
    """Records its execution, then waits until ``release_file`` exists (the test's signal)."""
    _record(label)
    while not Path(release_file).exists():
        time.sleep(0.02)
    return f"{label}:{previous}"


@app.task(name="wf.gather")
def gather(values: list[Any]) -> list[Any]:
    _record("gather")
    return values
