"""A workflow survives a real worker process being SIGKILLed in the middle of it: every step still
runs, none runs more often than its attempts allow, none is left blocked, and the fan-in sees every
result in order."""

from __future__ import annotations

import signal
import subprocess
import time
from collections import defaultdict
from pathlib import Path

from conveyor import Signature, chain, group
from conveyor.app import App
from tests.acceptance.workers import query, wait_until
from tests.conftest import PYTHON, subprocess_env

WIDTH = 6


class WfWorker:
    """``conveyor worker --app wf_app:app`` in a subprocess, its output in a file."""

    def __init__(self, database_url: str, log_dir: Path, *args: str) -> None:
        self.log_path = log_dir / f"wf-worker-{time.monotonic_ns()}.log"
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [PYTHON, "-m", "conveyor", "worker", "--app", "wf_app:app", *args],
            env=subprocess_env(database_url),
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()


def executions(database_url: str) -> dict[int, list[tuple[int, int]]]:
    """task id -> [(attempt, pid)] in execution order."""
    exists = query(database_url, "SELECT to_regclass('test_executions') IS NOT NULL")[0][0]
    found: dict[int, list[tuple[int, int]]] = defaultdict(list)
    if exists:
        for task_id, attempt, pid in query(
            database_url, "SELECT task_id, attempt, pid FROM test_executions ORDER BY at"
        ):
            found[int(task_id)].append((int(attempt), int(pid)))  # type: ignore[call-overload]
    return found


def test_sigkill_mid_workflow__another_worker_finishes_it_without_stalling_or_duplicating(
    database_url: str, producer: App, tmp_path: Path
) -> None:
    release = tmp_path / "release"
    handle = chain(
        Signature("wf.seed", (7,)),
        group(Signature("wf.hold", (f"h{i}", str(release))) for i in range(WIDTH)),
        Signature("wf.gather"),
    ).enqueue(producer)
    steps = {s.name: s.task_id for s in handle.steps()}
    holds = [steps[f"1.{i}:wf.hold"] for i in range(WIDTH)]

    first = WfWorker(database_url, tmp_path, "--concurrency", "3")
    second: WfWorker | None = None
    try:
        # The seed ran and released the group; three holds are now running on the first worker, held.
        wait_until(
            lambda: sum(1 for t in holds if executions(database_url).get(t)) == 3,
            timeout_s=60,
            what="three steps of the group to be running",
        )
        first.proc.send_signal(signal.SIGKILL)
        assert first.proc.wait(20) == -signal.SIGKILL
        running_on_first = [t for t in holds if executions(database_url).get(t)]
        release.touch()
        second = WfWorker(database_url, tmp_path, "--concurrency", "4")
        assert handle.result(timeout=60) == [f"h{i}:7" for i in range(WIDTH)]
    finally:
        first.stop()
        if second is not None:
            second.stop()

    runs = executions(database_url)
    # Nothing is lost and nothing is left waiting.
    graph = handle.graph()
    assert graph.workflow.state == "succeeded" and graph.workflow.steps_remaining == 0
    assert {s.state for s in graph.steps} == {"succeeded"}
    # The seed finished (and was acknowledged) before the kill: it never ran again.
    assert runs[steps["0:wf.seed"]] == [(1, first.proc.pid)]
    # The three steps killed mid-run ran again once on the second worker: attempt 1 then attempt 2.
    assert second is not None
    for task_id in running_on_first:
        assert runs[task_id] == [(1, first.proc.pid), (2, second.proc.pid)]
    # The other three ran once, on the second worker; so did the fan-in, once all six were done.
    for task_id in set(holds) - set(running_on_first):
        assert runs[task_id] == [(1, second.proc.pid)]
    assert runs[steps["2:wf.gather"]] == [(1, second.proc.pid)]
    # Every step ran exactly as many times as it was claimed, never beyond its attempts.
    for step in graph.steps:
        assert len(runs[step.task_id]) == step.attempt <= step.max_attempts
    released = query(
        database_url,
        "SELECT count(*) FROM conveyor_task_events WHERE task_id = %s AND detail->>'released' = 'true'",
        steps["2:wf.gather"],
    )
    assert released == [(1,)]  # the fan-in was released exactly once
