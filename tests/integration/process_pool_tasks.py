"""Tasks for tests/integration/test_process_pool.py, imported by the pool's children as ``process_pool_tasks:app``.

Not a test module: the children import it by name, so its directory is put on their PYTHONPATH.
"""

from __future__ import annotations

import asyncio
import os
import sys
import time
from pathlib import Path
from typing import Any

import conveyor
from conveyor.core.task import TaskDefinition, TaskOptions, TaskRegistry
from conveyor.errors import NonRetryable, Retry

# Set by a test to make later imports of this module fail, as a broken deploy would.
FAIL_IMPORT_FLAG_ENV = "PROCESS_POOL_TASKS_FAIL_IF_EXISTS"
_flag = os.environ.get(FAIL_IMPORT_FLAG_ENV)
if _flag and os.path.exists(_flag):
    raise ImportError(f"process_pool_tasks refuses to import while {_flag} exists")


def add(a: int, b: int) -> int:
    return a + b


async def async_double(x: int) -> dict[str, Any]:
    await asyncio.sleep(0)
    return {"value": x * 2, "task_id": conveyor.current_task().id, "loop_id": id(asyncio.get_running_loop())}


def sleep_forever(pid_file: str | None = None) -> None:
    if pid_file is not None:
        Path(pid_file).write_text(str(os.getpid()))
    time.sleep(1000)  # in C: only killing the process stops it


def raise_value_error(message: str) -> None:
    raise ValueError(message)


def raise_retry() -> None:
    raise Retry(delay=5)


def raise_non_retryable() -> None:
    raise NonRetryable("this input can never work")


def return_non_json() -> object:
    return object()


def exit_hard() -> None:
    os._exit(3)


def print_a_lot(lines: int) -> str:
    for i in range(lines):
        print(f'line {i} of noisy output that must not reach the protocol pipe {{"id": 1}}')
    sys.stdout.flush()
    print("and some on stderr", file=sys.stderr)
    return "done"


def current_attempt() -> int:
    return conveyor.current_task().attempt


def long_traceback(depth: int) -> None:
    """Raises an exception chained ``depth`` times: a traceback that is long and different at each level."""
    try:
        raise ValueError("level 0")
    except ValueError as first:
        error = first
    for level in range(1, depth):
        try:
            raise ValueError(f"level {level}") from error
        except ValueError as chained:
            error = chained
    raise error


def rendezvous(directory: str, me: str, other: str, wait_s: float) -> bool:
    """Announce ``me`` and wait for ``other``: True only if both ran at the same time."""
    Path(directory, me).touch()
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        if Path(directory, other).exists():
            return True
        time.sleep(0.01)
    return False


class App:
    """Just enough of an app for the child: a ``.registry``."""

    def __init__(self) -> None:
        self.registry = TaskRegistry()
        for func in (
            add,
            async_double,
            sleep_forever,
            raise_value_error,
            raise_retry,
            raise_non_retryable,
            return_non_json,
            exit_hard,
            print_a_lot,
            current_attempt,
            long_traceback,
            rendezvous,
        ):
            self.registry.add(TaskDefinition(f"tests.{func.__name__}", func, TaskOptions(executor="process")))


app = App()
