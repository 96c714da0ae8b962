"""Real worker processes, killed and stopped by real signals."""

from __future__ import annotations

import collections
import signal
import time
from pathlib import Path

from conveyor.app import App
from tests.acceptance.workers import WorkerProcess, executions, query, wait_until


def state_of(database_url: str, task_id: int) -> str:
    return str(query(database_url, "SELECT state FROM conveyor_tasks WHERE id = %s", task_id)[0][0])


def test_sigkill_mid_task__another_worker_finishes_it_and_it_ran_exactly_twice(
    database_url: str, producer: App, tmp_path: Path
) -> None:
    lease_s = 2.0
    env = {"CONVEYOR_WORKER__LEASE_TIMEOUT_S": str(lease_s)}
    release = tmp_path / "release"
    handle = producer.enqueue("record_then_block", [str(release)])
    first = WorkerProcess(database_url, tmp_path, "--concurrency", "1", env=env)
    second: WorkerProcess | None = None
    try:
        wait_until(lambda: len(executions(database_url, handle.id)) == 1, what="first execution to start")
        # Only now start the rescuer-to-be, so it cannot have claimed the task first.
        second = WorkerProcess(database_url, tmp_path, "--concurrency", "1", env=env)
        wait_until(
            lambda: query(database_url, "SELECT count(*) FROM conveyor_workers WHERE state = 'running'")[0][0] == 2,
            what="second worker to register",
        )
        release.touch()  # the next execution may finish at once; the running one can't: it gets SIGKILL first
        first.proc.send_signal(signal.SIGKILL)
        killed_at = time.monotonic()
        assert first.wait() == -signal.SIGKILL
        wait_until(lambda: state_of(database_url, handle.id) == "succeeded", timeout_s=30, what="task to finish")
        took = time.monotonic() - killed_at
    finally:
        first.stop()
        if second is not None:
            second.stop()
    assert took <= 2 * lease_s, f"took {took:.2f} s, more than 2 x lease timeout"
    runs = executions(database_url, handle.id)
    assert [r[0] for r in runs] == [1, 2]  # exactly twice: attempt 1 (killed) and attempt 2
    assert runs[0][1] == first.pid and runs[1][1] == second.pid
    kinds = [
        r[0]
        for r in query(database_url, "SELECT kind FROM conveyor_task_events WHERE task_id=%s ORDER BY id", handle.id)
    ]
    assert kinds == ["claimed", "rescued", "claimed", "succeeded"]  # (enqueue is the row itself)


def test_eight_workers_drain_ten_thousand_tasks_exactly_once(database_url: str, producer: App, tmp_path: Path) -> None:
    tally_dir = tmp_path / "tally"
    tally_dir.mkdir()
    handles = producer.enqueue_many([{"name": "tally", "args": [str(tally_dir)]} for _ in range(10_000)])
    workers = [WorkerProcess(database_url, tmp_path, "--concurrency", "8", "--burst") for _ in range(8)]
    try:
        codes = [w.wait(timeout_s=300) for w in workers]
    finally:
        for w in workers:
            w.stop()
    assert codes == [0] * 8, [w.output()[-2000:] for w in workers if w.proc.returncode]
    counts = collections.Counter(int(line) for f in tally_dir.iterdir() for line in f.read_text().split())
    assert len(counts) == 10_000
    assert set(counts.values()) == {1}
    assert set(counts) == {h.id for h in handles}
    states = dict(query(database_url, "SELECT state, count(*) FROM conveyor_tasks GROUP BY state"))
    assert states == {"succeeded": 10_000}
    per_worker = query(database_url, "SELECT count(DISTINCT worker_id) FROM conveyor_tasks WHERE state = 'succeeded'")[
        0
    ][0]
    assert per_worker >= 2  # the work really was shared


def test_sigterm__in_flight_tasks_finish_within_grace(database_url: str, producer: App, tmp_path: Path) -> None:
    handles = [producer.enqueue("sleep", [0.7]) for _ in range(3)]
    worker = WorkerProcess(database_url, tmp_path, "--concurrency", "3", "--shutdown-grace", "10")
    try:
        wait_until(lambda: all(executions(database_url, h.id) for h in handles), what="all three to start")
        worker.proc.send_signal(signal.SIGTERM)
        assert worker.wait(timeout_s=30) == 0, worker.output()[-3000:]
    finally:
        worker.stop()
    assert [state_of(database_url, h.id) for h in handles] == ["succeeded"] * 3
    released = query(database_url, "SELECT count(*) FROM conveyor_task_events WHERE kind = 'released'")[0][0]
    assert released == 0
    assert query(database_url, "SELECT state FROM conveyor_workers")[0][0] == "stopped"


def test_sigterm__unfinished_tasks_are_released_not_failed(database_url: str, producer: App, tmp_path: Path) -> None:
    cooperative = producer.enqueue("sleep", [60])
    stubborn = producer.enqueue("stubborn", [60])
    worker = WorkerProcess(database_url, tmp_path, "--concurrency", "2", "--shutdown-grace", "0.5")
    try:
        wait_until(
            lambda: executions(database_url, cooperative.id) and executions(database_url, stubborn.id),
            what="both to start",
        )
        started = time.monotonic()
        worker.proc.send_signal(signal.SIGTERM)
        assert worker.wait(timeout_s=30) == 0, worker.output()[-3000:]
        assert time.monotonic() - started < 20  # it did not wait for the 60 s tasks
    finally:
        worker.stop()
    for handle in (cooperative, stubborn):
        state, attempt = query(database_url, "SELECT state, attempt FROM conveyor_tasks WHERE id=%s", handle.id)[0]
        kinds = [
            r
            for r in query(
                database_url,
                "SELECT kind, attempt, detail FROM conveyor_task_events WHERE task_id=%s ORDER BY id",
                handle.id,
            )
        ]
        assert (state, attempt) == ("queued", 0), (kinds, worker.output()[-3000:])  # the attempt not counted
        kinds = [
            r[0]
            for r in query(
                database_url, "SELECT kind FROM conveyor_task_events WHERE task_id=%s ORDER BY id", handle.id
            )
        ]
        assert kinds == ["claimed", "released"]


def test_process_task_stuck_in_sleep__is_killed_at_its_timeout(
    database_url: str, producer: App, tmp_path: Path
) -> None:
    # The producer does not import the task code, so it states the options the definition has.
    handle = producer.enqueue("stuck_in_c", max_attempts=1)
    worker = WorkerProcess(database_url, tmp_path, "--burst")
    try:
        assert worker.wait(timeout_s=60) == 0, worker.output()[-3000:]
    finally:
        worker.stop()
    state, error = query(database_url, "SELECT state, last_error FROM conveyor_tasks WHERE id=%s", handle.id)[0]
    assert state == "dead"
    assert error["type"] == "builtins.TimeoutError" and "0.5" in error["message"]  # type: ignore[index]
    [(_, child_pid, _)] = executions(database_url, handle.id)
    assert child_pid != worker.pid  # it ran in a child process, which was killed
    import psutil

    assert not psutil.pid_exists(int(child_pid)) or psutil.Process(int(child_pid)).status() == "zombie"  # type: ignore[call-overload]


def test_poison_pill__killing_its_worker_three_times_sends_it_to_dead(
    database_url: str, producer: App, tmp_path: Path
) -> None:
    handle = producer.enqueue("kill_my_worker")
    for _ in range(6):
        if state_of(database_url, handle.id) == "dead":
            break
        worker = WorkerProcess(database_url, tmp_path, "--concurrency", "1")
        try:
            wait_until(
                lambda w=worker: w.proc.poll() is not None or state_of(database_url, handle.id) == "dead",  # type: ignore[misc]
                what="the worker to die or the task to be dead",
            )
        finally:
            worker.stop()
    state, losses, error = query(
        database_url, "SELECT state, worker_losses, last_error FROM conveyor_tasks WHERE id=%s", handle.id
    )[0]
    assert (state, losses) == ("dead", 3)
    assert "worker lost 3 times" in error["message"]  # type: ignore[index]
    assert len(executions(database_url, handle.id)) == 3


def test_restart_with_the_same_name__does_not_hide_its_own_orphan(
    database_url: str, producer: App, tmp_path: Path
) -> None:
    """procrastinate#1518: a pod restarted with the same worker id hid its stale jobs behind fresh
    heartbeats. Here leases belong to attempts, not names: the orphan is rescued all the same."""
    release = tmp_path / "release"
    handle = producer.enqueue("record_then_block", [str(release)])
    first = WorkerProcess(database_url, tmp_path, "--concurrency", "1", "--name", "pod-a")
    try:
        wait_until(lambda: len(executions(database_url, handle.id)) == 1, what="first execution to start")
        first.proc.send_signal(signal.SIGKILL)
        first.wait()
    finally:
        first.stop()
    release.touch()
    again = WorkerProcess(database_url, tmp_path, "--concurrency", "1", "--name", "pod-a")
    try:
        wait_until(lambda: state_of(database_url, handle.id) == "succeeded", what="the orphan to be finished")
    finally:
        again.stop()
    assert [r[0] for r in executions(database_url, handle.id)] == [1, 2]
    names = {r[0] for r in query(database_url, "SELECT name FROM conveyor_workers")}
    assert names == {"pod-a"}


def test_cancel_of_a_running_process_task__kills_its_child(database_url: str, producer: App, tmp_path: Path) -> None:
    import psutil

    handle = producer.enqueue("stuck_in_c", max_attempts=1, timeout=120)
    worker = WorkerProcess(database_url, tmp_path, "--concurrency", "1")
    try:
        wait_until(lambda: executions(database_url, handle.id), what="the process task to start")
        [(_, child_pid, _)] = executions(database_url, handle.id)
        assert psutil.pid_exists(int(child_pid))  # type: ignore[call-overload]
        record = producer.handle(handle.id).cancel()
        assert record.cancel_requested
        wait_until(lambda: state_of(database_url, handle.id) == "cancelled", what="the task to be cancelled")

        def child_gone() -> bool:
            try:
                return psutil.Process(int(child_pid)).status() == psutil.STATUS_ZOMBIE  # type: ignore[call-overload]
            except psutil.NoSuchProcess:
                return True

        wait_until(child_gone, what="the child process to be killed")
    finally:
        worker.stop()
