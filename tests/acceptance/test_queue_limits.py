"""Queue limits across real worker processes: what the database recorded must obey the limit, with
every worker claiming on its own."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

from conveyor.app import App
from conveyor.db.queue_store import QueueStore
from tests.acceptance.workers import WorkerProcess, query, wait_until
from tests.conftest import PYTHON, subprocess_env
from tests.integration.test_queue_limits import intervals, max_overlap, most_starts_allowed, starts

QUEUE = "capped"
# sample_app has a process-executor task, so each worker starts a pool: keep it to one process.
ENV = {"CONVEYOR_WORKER__PROCESS_POOL_SIZE": "1"}


def set_limits(app: App, **limits: Any) -> None:
    async def apply() -> None:
        await QueueStore(app.runtime().engine).set_limits(QUEUE, **limits)

    app.run_sync(apply())


def succeeded(database_url: str) -> int:
    rows = query(database_url, "SELECT count(*) FROM conveyor_tasks WHERE queue = %s AND state = 'succeeded'", QUEUE)
    return int(rows[0][0])  # type: ignore[call-overload]


def test_concurrency_limit__two_workers_never_run_more_than_it_together(
    database_url: str, producer: App, tmp_path: Path
) -> None:
    set_limits(producer, concurrency_limit=3)
    producer.enqueue_many([{"name": "sleep", "args": [0.25], "queue": QUEUE} for _ in range(24)])
    args = ("--queues", QUEUE, "--concurrency", "10", "--burst")
    workers = [WorkerProcess(database_url, tmp_path, *args, env=ENV) for _ in range(2)]
    try:
        codes = [w.wait(timeout_s=120) for w in workers]
    finally:
        for w in workers:
            w.stop()
    assert codes == [0, 0], [w.output()[-2000:] for w in workers]
    spans = intervals(database_url, QUEUE)
    assert len(spans) == 24
    # Never more, and the limit was used in full. (Which worker ran what is not promised: the one that
    # frees a slot usually takes it again first. Many claimers racing for slots is the integration
    # test's job, test_claim_limited__concurrent_claimers_never_run_more_than_the_concurrency_limit.)
    assert max_overlap(spans) == 3


def test_rate_limit__two_workers_start_tasks_within_the_bucket_and_full_speed_once_removed(
    database_url: str, producer: App, tmp_path: Path
) -> None:
    rate = 20.0
    burst = max(1.0, rate)
    set_limits(producer, rate_limit_per_s=rate)
    args = ("--queues", QUEUE, "--concurrency", "10")
    workers = [WorkerProcess(database_url, tmp_path, *args, env=ENV) for _ in range(2)]
    try:
        producer.enqueue_many([{"name": "noop", "queue": QUEUE} for _ in range(60)])
        wait_until(lambda: succeeded(database_url) == 60, timeout_s=60, what="the rate-limited tasks")
        limited = starts(database_url, QUEUE)
        workers_used = query(database_url, "SELECT count(DISTINCT worker_id) FROM conveyor_tasks")[0][0]

        set_limits(producer, rate_limit_per_s=None)
        producer.enqueue_many([{"name": "noop", "queue": QUEUE} for _ in range(300)])
        wait_until(lambda: succeeded(database_url) == 360, timeout_s=60, what="the unlimited tasks")
        unlimited = [t for t in starts(database_url, QUEUE) if t > limited[-1]]
    finally:
        for w in workers:
            w.stop()
    assert workers_used == 2
    assert most_starts_allowed(limited, burst, rate) <= 1e-6
    # ...and not far below it: after the first burst, about `rate` starts per second.
    assert (len(limited) - burst) / (limited[-1] - limited[0]) >= rate / 2
    # Without the limit the same workers go faster than the bucket would ever have let them.
    assert len(unlimited) == 300
    assert most_starts_allowed(unlimited, burst, rate) > 0


def test_cli_queues_limits__sets_shows_and_removes(database_url: str, tmp_path: Path) -> None:
    env = subprocess_env(database_url)

    def conveyor(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [PYTHON, "-m", "conveyor", "queues", "limits", *args],
            env=env,
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=60,
        )

    set_both = conveyor(QUEUE, "--concurrency", "3", "--rate", "2.5")
    assert (set_both.returncode, set_both.stdout) == (0, f"queue {QUEUE}: concurrency 3, rate 2.5/s\n")
    rate_only = conveyor(QUEUE, "--rate", "none")  # the concurrency limit stays
    assert rate_only.stdout == f"queue {QUEUE}: concurrency 3, rate unlimited\n"
    assert conveyor(QUEUE).stdout == f"queue {QUEUE}: concurrency 3, rate unlimited\n"
    assert query(database_url, "SELECT concurrency_limit, rate_limit_per_s FROM conveyor_queues") == [(3, None)]

    for args, expected in [
        ((QUEUE, "--concurrency", "-1"), "--concurrency must be a whole number"),
        ((QUEUE, "--concurrency", "lots"), "--concurrency must be a whole number"),
        ((QUEUE, "--rate", "0"), "--rate must be tasks per second"),
        ((QUEUE, "--rate", "nan"), "--rate must be tasks per second"),
        (("bad name!", "--rate", "1"), "queue name 'bad name!'"),
    ]:
        result = conveyor(*args)
        assert result.returncode == 2, result
        lines = result.stderr.splitlines()
        assert len(lines) == 1 and lines[0].startswith("conveyor: error: ") and expected in lines[0], result.stderr
    assert query(database_url, "SELECT concurrency_limit, rate_limit_per_s FROM conveyor_queues") == [(3, None)]
