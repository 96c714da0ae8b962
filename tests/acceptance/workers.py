"""Helpers to run real `conveyor worker` processes from tests."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import psycopg

from tests.conftest import PYTHON, subprocess_env


class WorkerProcess:
    def __init__(self, database_url: str, log_dir: Path, *args: str, env: dict[str, str] | None = None) -> None:
        self.log_path = log_dir / f"worker-{time.monotonic_ns()}.log"
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in wait()/stop()
        self.proc = subprocess.Popen(
            [PYTHON, "-m", "conveyor", "worker", "--app", "sample_app:app", *args],
            env=subprocess_env(database_url, **(env or {})),
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait(self, timeout_s: float = 60) -> int:
        try:
            return self.proc.wait(timeout_s)
        finally:
            self._log.close()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.wait()


def query(database_url: str, sql: str, *params: object) -> list[tuple[object, ...]]:
    with psycopg.connect(database_url, autocommit=True) as conn:
        return conn.execute(sql, params).fetchall()  # type: ignore[arg-type]


def executions(database_url: str, task_id: int) -> list[tuple[object, ...]]:
    exists = query(database_url, "SELECT to_regclass('test_executions') IS NOT NULL")[0][0]
    if not exists:
        return []
    return query(
        database_url, "SELECT attempt, pid, label FROM test_executions WHERE task_id = %s ORDER BY at", task_id
    )


def wait_until(predicate: Callable[[], object], timeout_s: float = 30, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)
