"""The ``conveyor`` command as users run it: real ``python -m conveyor`` processes, a real database, real
signals. Waits poll for the state they expect (generously); nothing sleeps blindly."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import psutil
import psycopg
import pytest
from sqlalchemy.engine import make_url

from conveyor.app import App
from conveyor.db import migrate
from tests.conftest import PYTHON, subprocess_env

T = TypeVar("T")
APP = "sample_app:app"
WAIT_S = 60.0


# -- helpers -------------------------------------------------------------------------------------


def conveyor(*args: str, env: dict[str, str], cwd: Path, timeout: float = WAIT_S) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [PYTHON, "-m", "conveyor", *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout
    )


def ok(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 0, f"exit {result.returncode}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    return result.stdout


def assert_one_line_error(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 2, f"exit {result.returncode}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("conveyor: error: "), result.stderr
    assert "Traceback" not in result.stderr
    return lines[0]


def wait_for(what: str, probe: Callable[[], T | None], timeout_s: float = WAIT_S) -> T:
    deadline = time.monotonic() + timeout_s
    while True:
        value = probe()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(0.05)


def rows(database_url: str, sql: str, *params: Any) -> list[tuple[Any, ...]]:
    with psycopg.connect(database_url, autocommit=True) as conn:
        return conn.execute(sql, params).fetchall()


def running_workers(database_url: str) -> list[tuple[str, int]]:
    return [
        (name, pid)
        for name, pid in rows(database_url, "SELECT name, pid FROM conveyor_workers WHERE state = 'running'")
    ]


def two_running(database_url: str) -> list[tuple[str, int]] | None:
    workers = running_workers(database_url)
    return workers if len(workers) == 2 else None


@contextmanager
def background(*args: str, env: dict[str, str], cwd: Path) -> Iterator[subprocess.Popen[bytes]]:
    """A long-running ``conveyor`` process; its output goes to files (a full pipe would block it)."""
    out_path, err_path = cwd / "stdout.log", cwd / "stderr.log"
    with out_path.open("wb") as out, err_path.open("wb") as err:
        process = subprocess.Popen([PYTHON, "-m", "conveyor", *args], env=env, cwd=cwd, stdout=out, stderr=err)
        try:
            yield process
        finally:
            _kill_tree(process)
            if process.returncode not in (0, None):
                print(f"stdout:\n{out_path.read_text()}\nstderr:\n{err_path.read_text()}")


def _kill_tree(process: subprocess.Popen[bytes]) -> None:
    try:
        children = psutil.Process(process.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        children = []
    if process.poll() is None:
        process.kill()
    process.wait(timeout=WAIT_S)
    for child in children:
        try:
            child.kill()
        except psutil.NoSuchProcess:
            continue
    psutil.wait_procs(children, timeout=WAIT_S)


def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


@pytest.fixture
def env(database_url: str) -> dict[str, str]:
    # sample_app has a process-executor task, so each worker starts a pool: keep it to one process.
    return subprocess_env(database_url, CONVEYOR_WORKER__PROCESS_POOL_SIZE="1")


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    """Commands run from a directory that has nothing to do with the project."""
    return tmp_path


def enqueue_add(env: dict[str, str], cwd: Path, a: int, b: int) -> int:
    return int(ok(conveyor("enqueue", "add", "--args", json.dumps([a, b]), env=env, cwd=cwd)).strip())


def show(task_id: int, env: dict[str, str], cwd: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(ok(conveyor("tasks", "show", str(task_id), "--json", env=env, cwd=cwd)))
    return data


# -- db ------------------------------------------------------------------------------------------


def test_db_current__behind_until_upgraded(empty_database_url: str, workdir: Path) -> None:
    url = make_url(empty_database_url)
    if url.password is None and not os.environ.get("TEST_DATABASE_URL"):
        # The private test server trusts local connections, so a password is accepted and ignored: enough
        # to check that it is never printed.
        url = url.set(password="not-a-real-secret")
    password = url.password
    env = subprocess_env(url.render_as_string(hide_password=False))
    head = migrate.head_revision()

    behind = conveyor("db", "current", env=env, cwd=workdir)
    assert behind.returncode == 1, behind.stderr
    assert "behind" in behind.stdout and head in behind.stdout

    upgraded = ok(conveyor("db", "upgrade", env=env, cwd=workdir))
    assert f"empty -> {head}" in upgraded

    current = ok(conveyor("db", "current", env=env, cwd=workdir))
    assert f"{head} (head)" in current
    again = ok(conveyor("db", "upgrade", env=env, cwd=workdir))
    assert "already at" in again
    for output in (behind.stdout, behind.stderr, upgraded, current, again):
        assert password is None or str(password) not in output
    assert password is None or "***" in current


# -- enqueue, worker, tasks ------------------------------------------------------------------------


def test_enqueue_then_burst_worker__task_succeeds_with_history(env: dict[str, str], workdir: Path) -> None:
    task_id = enqueue_add(env, workdir, 2, 3)

    ok(conveyor("worker", "--app", APP, "--burst", env=env, cwd=workdir))

    record = show(task_id, env, workdir)
    assert record["state"] == "succeeded"
    assert record["result"] == 5
    assert [e["kind"] for e in record["events"]] == ["enqueued", "claimed", "succeeded"]
    assert record["created_at"].startswith("20")  # ISO 8601


def test_enqueue__idempotency_key_returns_the_existing_task(env: dict[str, str], workdir: Path) -> None:
    args = ("enqueue", "add", "--args", "[1, 1]", "--idempotency-key", "order-42", "--queue", "emails", "--json")
    first = json.loads(ok(conveyor(*args, env=env, cwd=workdir)))
    second = ok(conveyor(*args[:-1], env=env, cwd=workdir))

    assert first["created"] is True
    assert second.strip() == f"{first['id']} (existing)"
    assert show(first["id"], env, workdir)["queue"] == "emails"


def test_worker__json_logs_are_one_object_per_line(env: dict[str, str], workdir: Path, producer: App) -> None:
    producer.enqueue("add", [1, 2])

    result = conveyor("worker", "--app", APP, "--burst", "--log-format", "json", env=env, cwd=workdir)

    ok(result)
    records = [json.loads(line) for line in result.stderr.splitlines()]
    assert records, "the worker logged nothing"
    assert all({"timestamp", "level", "logger", "event"} <= record.keys() for record in records)
    assert any(r["logger"] == "conveyor.worker" and "drained" in r["event"] for r in records)


def test_settings__file_then_environment_then_flags(env: dict[str, str], workdir: Path, producer: App) -> None:
    config = workdir / "settings.toml"
    config.write_text('log_format = "json"\n[worker]\nqueues = ["from-file"]\nconcurrency = 3\n')
    task_id = producer.enqueue("add", [4, 4], queue="from-flag").id
    env = {**env, "CONVEYOR_WORKER__QUEUES": "from-env"}

    result = conveyor(
        "worker", "--app", APP, "--burst", "--config", str(config), "--queues", "from-flag", env=env, cwd=workdir
    )

    ok(result)
    assert show(task_id, env, workdir)["state"] == "succeeded"  # the flag beat the environment and the file
    started = [json.loads(line) for line in result.stderr.splitlines() if "started on queues" in line]
    assert "['from-flag'], concurrency 3" in started[0]["event"]  # the file's log_format and concurrency held


def test_tasks_list__filters_by_state(env: dict[str, str], workdir: Path, producer: App) -> None:
    ids = [producer.enqueue("add", [i, i]).id for i in range(3)]
    assert "cancelled" in ok(conveyor("tasks", "cancel", str(ids[0]), env=env, cwd=workdir))

    def listed(*args: str) -> list[int]:
        output = ok(conveyor("tasks", "list", "--json", *args, env=env, cwd=workdir))
        return [task["id"] for task in json.loads(output)]

    assert listed("--state", "cancelled") == [ids[0]]
    assert listed("--state", "queued") == [ids[2], ids[1]]
    assert listed("--state", "queued", "--state", "cancelled") == ids[::-1]
    assert listed("--state", "succeeded") == []
    assert listed("--queue", "default", "--limit", "1") == [ids[2]]
    assert listed("--name", "add", "--limit", "2") == [ids[2], ids[1]]
    table = ok(conveyor("tasks", "list", env=env, cwd=workdir))
    assert "cancelled" in table and "queued" in table

    assert "queued again" in ok(conveyor("tasks", "retry", str(ids[0]), env=env, cwd=workdir))
    assert listed("--state", "cancelled") == []


def test_tasks_cancel__of_a_succeeded_task_is_refused_and_changes_nothing(
    env: dict[str, str], workdir: Path, producer: App
) -> None:
    task_id = producer.enqueue("add", [2, 2]).id
    ok(conveyor("worker", "--app", APP, "--burst", env=env, cwd=workdir))

    line = assert_one_line_error(conveyor("tasks", "cancel", str(task_id), env=env, cwd=workdir))

    assert f"cannot cancel task {task_id}: it is succeeded" in line
    assert show(task_id, env, workdir)["state"] == "succeeded"


@pytest.mark.parametrize(
    ("args", "extra_env", "expected"),
    [
        pytest.param(("enqueue", "add", "--args", "[2, 3"), {}, "--args is not valid JSON", id="bad-json"),
        pytest.param(("enqueue", "add", "--args", '{"a": 2}'), {}, "--args must be a JSON array", id="args-object"),
        pytest.param(("enqueue", "add", "--kwargs", "[1]"), {}, "--kwargs must be a JSON object", id="kwargs-array"),
        pytest.param(("worker", "--app", APP, "--bogus"), {}, "No such option: --bogus", id="unknown-option"),
        pytest.param(("tasks", "show"), {}, "Missing argument", id="missing-argument"),
        pytest.param(("worker", "--concurrency", "many"), {}, "Invalid value for '--concurrency'", id="bad-int"),
        pytest.param(
            ("worker", "--app", APP, "--burst"),
            {"CONVEYOR_WORKER__CONCURENCY": "5"},
            "worker.concurency: unknown key; did you mean 'worker.concurrency'?",
            id="unknown-config-key",
        ),
        pytest.param(("worker",), {}, "no app to run", id="no-app"),
        pytest.param(("worker", "--app", "no_such_module:app"), {}, "cannot import 'no_such_module'", id="bad-app"),
        pytest.param(("tasks", "show", "999999"), {}, "task 999999 does not exist", id="task-not-found"),
        pytest.param(("tasks", "retry", "999999"), {}, "task 999999 does not exist", id="retry-not-found"),
        pytest.param(
            ("enqueue", "nope", "--app", APP), {}, "no task named 'nope' is registered", id="strict-unknown-name"
        ),
        pytest.param(("enqueue", "add", "--priority", "100000"), {}, "priority must be", id="bad-priority"),
        pytest.param(("enqueue", "bad name!"), {}, "task name 'bad name!'", id="bad-task-name"),
    ],
)
def test_bad_input__one_line_on_stderr_and_exit_2(
    args: tuple[str, ...], extra_env: dict[str, str], expected: str, env: dict[str, str], workdir: Path
) -> None:
    line = assert_one_line_error(conveyor(*args, env={**env, **extra_env}, cwd=workdir))
    assert expected in line


def test_bad_input__database_password_is_never_printed(database_url: str, workdir: Path) -> None:
    # Port 1 refuses connections: the error must name the problem without echoing the URL's password.
    url = make_url(database_url).set(password="hunter2-secret", port=1, host="127.0.0.1")
    env = subprocess_env(url.render_as_string(hide_password=False))

    line = assert_one_line_error(conveyor("tasks", "show", "1", env=env, cwd=workdir))

    assert "hunter2" not in line


# -- supervisor ------------------------------------------------------------------------------------


@pytest.mark.slow
def test_processes__two_children_stop_cleanly_on_sigterm(database_url: str, env: dict[str, str], workdir: Path) -> None:
    args = ("worker", "--app", APP, "--processes", "2", "--name", "pool")
    with background(*args, env=env, cwd=workdir) as supervisor:
        workers = wait_for("2 running workers", lambda: two_running(database_url))
        names, pids = zip(*sorted(workers), strict=True)
        assert names == ("pool-1", "pool-2")
        assert len(set(pids)) == 2
        assert {c.pid for c in psutil.Process(supervisor.pid).children()} == set(pids)

        supervisor.send_signal(signal.SIGTERM)

        assert supervisor.wait(timeout=WAIT_S) == 0
        assert all(gone(pid) for pid in pids)
        assert running_workers(database_url) == []


@pytest.mark.slow
def test_processes__a_killed_child_is_restarted(database_url: str, env: dict[str, str], workdir: Path) -> None:
    with background("worker", "--app", APP, "--processes", "2", env=env, cwd=workdir) as supervisor:
        first = wait_for("2 running workers", lambda: two_running(database_url))
        victim = first[0][1]

        os.kill(victim, signal.SIGKILL)

        # The killed worker's row stays "running" (it never deregistered) until its lease is rescued, so
        # look for a third row: the replacement registering itself.
        def replacement() -> int | None:
            new = [pid for _, pid in running_workers(database_url) if pid not in {p for _, p in first}]
            return new[0] if new and len(rows(database_url, "SELECT pid FROM conveyor_workers")) == 3 else None

        restarted = wait_for("a third worker row", replacement)
        live = {c.pid for c in psutil.Process(supervisor.pid).children()}
        assert live == {first[1][1], restarted}

        supervisor.send_signal(signal.SIGTERM)
        assert supervisor.wait(timeout=WAIT_S) == 0


@pytest.mark.slow
def test_processes__children_do_not_outlive_a_sigkilled_supervisor(
    database_url: str, env: dict[str, str], workdir: Path
) -> None:
    with background("worker", "--app", APP, "--processes", "2", env=env, cwd=workdir) as supervisor:
        workers = wait_for("2 running workers", lambda: two_running(database_url))

        supervisor.kill()
        supervisor.wait(timeout=WAIT_S)

        # PR_SET_PDEATHSIG delivers SIGTERM: each child shuts down gracefully and deregisters.
        wait_for("the children to exit", lambda: all(gone(pid) for _, pid in workers))
        wait_for("the workers to deregister", lambda: running_workers(database_url) == [] or None)


@pytest.mark.slow
def test_processes__burst_children_finish_and_the_supervisor_exits(
    database_url: str, env: dict[str, str], workdir: Path, producer: App
) -> None:
    ids = [producer.enqueue("add", [i, 1]).id for i in range(4)]

    ok(conveyor("worker", "--app", APP, "--processes", "2", "--burst", env=env, cwd=workdir))

    states = rows(database_url, "SELECT state FROM conveyor_tasks WHERE id = ANY(%s)", ids)
    assert [s for (s,) in states] == ["succeeded"] * 4


def succeeded(record: dict[str, Any]) -> dict[str, Any] | None:
    return record if record["state"] == "succeeded" else None


# -- up --------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_up__runs_a_worker_on_the_configured_database(env: dict[str, str], workdir: Path) -> None:
    with background("up", "--app", APP, env=env, cwd=workdir) as process:
        wait_for("'worker started'", lambda: "worker started" in (workdir / "stdout.log").read_text())
        task_id = enqueue_add(env, workdir, 20, 22)
        record = wait_for("the task to succeed", lambda: succeeded(show(task_id, env, workdir)))
        assert record["result"] == 42

        process.send_signal(signal.SIGTERM)

        assert process.wait(timeout=WAIT_S) == 0
    assert "database: postgresql" in (workdir / "stdout.log").read_text()
