"""Real ``conveyor scheduler`` processes, two at a time, with the leader killed or frozen by real signals.

The app (``tests/apps/sched_app.py``) fires a task every second with ``misfire="all"``. Whatever happens
to the leader, every fire time in the observed window must have exactly one task: none doubled (the
fence and the constraints) and none lost (the standby takes over and catches up).
"""

from __future__ import annotations

import itertools
import signal
import subprocess
import time
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from conveyor.core.schedule import run_key
from tests.acceptance.workers import query, wait_until
from tests.conftest import PYTHON, subprocess_env

LEASE_S = 2.0
TICK_S = 0.2
FAST = {"CONVEYOR_SCHEDULER__LEADER_LEASE_S": str(LEASE_S), "CONVEYOR_SCHEDULER__TICK_INTERVAL_S": str(TICK_S)}
# A takeover takes a lease and a poll; the margin is for a loaded test machine, not for the scheduler.
TAKEOVER_WAIT_S = 5 * LEASE_S


class SchedulerProcess:
    def __init__(self, database_url: str, log_dir: Path, *args: str) -> None:
        self.log_path = log_dir / f"scheduler-{time.monotonic_ns()}.log"
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in wait()
        self.proc = subprocess.Popen(
            [PYTHON, "-m", "conveyor", "scheduler", *args],
            env=subprocess_env(database_url, **FAST),
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait(self, timeout_s: float = 30) -> int:
        try:
            return self.proc.wait(timeout_s)
        finally:
            self._log.close()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)
            self.proc.kill()
        self.wait()
        # Shown by pytest only when the test fails: what each scheduler saw.
        print(f"--- {self.log_path.name} (pid {self.pid}, exit {self.proc.returncode})\n{self.output()[-4000:]}")


def leader(database_url: str) -> tuple[int, int] | None:
    """The pid (holders are ``host:pid:id``) and fencing token of the live lease's holder."""
    rows = query(database_url, "SELECT holder, fencing_token FROM conveyor_leases WHERE expires_at > now()")
    return (int(str(rows[0][0]).split(":")[-2]), int(str(rows[0][1]))) if rows else None


def standing_by(process: SchedulerProcess) -> None:
    """Wait until ``process`` is up and polling the lease as a standby (an interpreter start is slow)."""
    wait_until(lambda: "standing by" in process.output(), timeout_s=60, what="the standby to start")


def leader_is(database_url: str, process: SchedulerProcess) -> bool:
    found = leader(database_url)
    return found is not None and found[0] == process.pid


def split(
    database_url: str, first: SchedulerProcess, second: SchedulerProcess
) -> tuple[SchedulerProcess, SchedulerProcess, int]:
    """(the leader, the standby, the leader's fencing token), whichever process leads now."""
    found = leader(database_url)
    assert found is not None and second.proc.poll() is None and first.proc.poll() is None
    pid, token = found
    return (first, second, token) if pid == first.pid else (second, first, token)


def runs(database_url: str, schedule: str = "every-second") -> list[tuple[Any, ...]]:
    """(fire_at, task_id, enqueued_at, fencing_token) of a schedule's runs, by fire time."""
    return query(
        database_url,
        "SELECT r.fire_at, r.task_id, r.enqueued_at, r.fencing_token FROM conveyor_schedule_runs r "
        "JOIN conveyor_schedules s ON s.id = r.schedule_id WHERE s.name = %s ORDER BY r.fire_at",
        schedule,
    )


def assert_every_fire_time_has_exactly_one_task(database_url: str) -> list[tuple[Any, ...]]:
    rows = runs(database_url)
    fire_times = [r[0] for r in rows]
    first = fire_times[0]
    # A run per second of the window, none missing, none twice.
    assert fire_times == [first + timedelta(seconds=k) for k in range(len(fire_times))], _gaps(fire_times)
    schedule_id = query(database_url, "SELECT id FROM conveyor_schedules WHERE name = 'every-second'")[0][0]
    tasks = query(database_url, "SELECT id, idempotency_key FROM conveyor_tasks WHERE name = 'tick' ORDER BY id")
    assert len(tasks) == len(rows)
    by_key = {key: task_id for task_id, key in tasks}
    for fire_at, task_id, _, _ in rows:
        assert by_key[run_key(int(str(schedule_id)), fire_at)] == task_id
    return rows


def _gaps(fire_times: list[datetime]) -> list[tuple[str, str]]:
    return [(a.isoformat(), b.isoformat()) for a, b in itertools.pairwise(fire_times) if b - a != timedelta(seconds=1)]


@pytest.mark.slow
def test_two_schedulers__leader_sigkilled_halfway__every_fire_time_exactly_one_task(
    database_url: str, tmp_path: Path
) -> None:
    first = SchedulerProcess(database_url, tmp_path, "--app", "sched_app:app")
    second: SchedulerProcess | None = None
    try:
        wait_until(lambda: leader(database_url), what="a scheduler to lead")
        second = SchedulerProcess(database_url, tmp_path, "--app", "sched_app:app")
        standing_by(second)
        wait_until(lambda: runs(database_url), what="the first run")
        started = time.monotonic()
        time.sleep(15)  # the scenario itself: 30 s of a 1-second schedule, the leader killed halfway
        victim, standby, victim_token = split(database_url, first, second)
        victim.proc.send_signal(signal.SIGKILL)
        assert victim.wait() == -signal.SIGKILL
        killed_at = query(database_url, "SELECT now()")[0][0]
        wait_until(lambda: leader_is(database_url, standby), timeout_s=TAKEOVER_WAIT_S, what="the takeover")
        time.sleep(max(0.0, 30 - (time.monotonic() - started)))
        standby.proc.send_signal(signal.SIGTERM)
        assert standby.wait() == 0, standby.output()[-3000:]
    finally:
        first.stop()
        if second is not None:
            second.stop()
    rows = assert_every_fire_time_has_exactly_one_task(database_url)
    assert rows[-1][0] - rows[0][0] >= timedelta(seconds=29)
    # The killed term enqueued until it died, the standby's from the takeover on: a handover, no overlap.
    tokens = [r[3] for r in rows]
    assert tokens == sorted(tokens) and tokens[-1] > victim_token
    assert all(r[2] < killed_at for r in rows if r[3] <= victim_token)
    # The gap the failover left was bounded by the lease, and the standby filled it in (misfire="all").
    lateness = max((r[2] - r[0]).total_seconds() for r in rows)
    assert lateness <= LEASE_S + 3.0, lateness
    assert "fired for" in standby.output()
    # The killed one left its row behind, stale by now (GET /api/v1/scheduler says so); the one stopped
    # with SIGTERM deleted its own.
    left = query(
        database_url,
        "SELECT pid, now() - last_seen_at > make_interval(secs => stale_after_s) FROM conveyor_scheduler_processes",
    )
    assert left == [(victim.pid, True)]


@pytest.mark.slow
def test_leader_sigstopped_past_its_lease__steps_down_on_waking_and_no_fire_time_doubles(
    database_url: str, tmp_path: Path
) -> None:
    first = SchedulerProcess(database_url, tmp_path, "--app", "sched_app:app")
    second: SchedulerProcess | None = None
    try:
        wait_until(lambda: leader(database_url), what="a scheduler to lead")
        second = SchedulerProcess(database_url, tmp_path, "--app", "sched_app:app")
        standing_by(second)
        wait_until(lambda: len(runs(database_url)) >= 3, what="a few runs")
        frozen, standby, frozen_token = split(database_url, first, second)
        frozen.proc.send_signal(signal.SIGSTOP)
        wait_until(lambda: leader_is(database_url, standby), timeout_s=TAKEOVER_WAIT_S, what="the takeover")
        time.sleep(1.0)  # frozen well past its lease, with the standby enqueueing meanwhile
        frozen.proc.send_signal(signal.SIGCONT)
        wait_until(lambda: "stepping down" in frozen.output(), timeout_s=10, what="the old leader to step down")
        time.sleep(3 * TICK_S + 2)  # both alive again: the woken one must stay a standby
        assert leader_is(database_url, standby)
        for process in (frozen, standby):
            process.proc.send_signal(signal.SIGTERM)
        assert frozen.wait() == 0, frozen.output()[-3000:]
        assert standby.wait() == 0, standby.output()[-3000:]
    finally:
        first.stop()
        if second is not None:
            second.stop()
    rows = assert_every_fire_time_has_exactly_one_task(database_url)
    tokens = [r[3] for r in rows]
    assert tokens == sorted(tokens) and tokens[-1] > frozen_token
    taken_over_at = query(database_url, "SELECT acquired_at FROM conveyor_leases")[0][0]
    # Fenced: nothing of the frozen term was written after the standby's began, however it woke up.
    assert all(r[2] < taken_over_at for r in rows if r[3] == frozen_token)


@pytest.mark.slow
def test_misfire_policies__after_sixty_seconds_without_a_scheduler(database_url: str, tmp_path: Path) -> None:
    env = subprocess_env(database_url, **FAST)
    for policy in ("skip", "once", "all"):
        added = subprocess.run(
            [
                PYTHON,
                "-m",
                "conveyor",
                "schedules",
                "add",
                "--name",
                f"m-{policy}",
                "--task",
                "tick",
                "--interval",
                "1",
                "--misfire",
                policy,
            ],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert added.returncode == 0, added.stderr
    # Time travel: each was last dealt with 60 s ago, as if no scheduler had run since.
    backdated = query(
        database_url,
        "UPDATE conveyor_schedules SET next_fire_at = date_trunc('second', now()) - interval '60 seconds' "
        "RETURNING next_fire_at",
    )
    cursor = backdated[0][0]
    assert isinstance(cursor, datetime)
    process = SchedulerProcess(database_url, tmp_path)  # no --app: fires by task name
    try:
        wait_until(
            lambda: all(runs(database_url, f"m-{p}") for p in ("skip", "once", "all")),
            timeout_s=60,
            what="the catch-up tick",
        )
        process.proc.send_signal(signal.SIGTERM)
        assert process.wait() == 0, process.output()[-3000:]
    finally:
        process.stop()
    caught_up = {}
    for policy in ("skip", "once", "all"):
        rows = runs(database_url, f"m-{policy}")
        now = rows[0][2]  # the catch-up transaction's now(): the clock it decided on
        caught_up[policy] = [r[0] for r in rows if r[2] == now]
        assert caught_up[policy][-1] == now.replace(microsecond=0)  # the current tick itself always runs
    assert len(caught_up["skip"]) == 1  # none of the 60 missed
    assert len(caught_up["once"]) == 1  # one catch-up run for all of them
    all_times = caught_up["all"]
    # Every second from the cursor to the current tick: the 60 missed, the seconds the process took to
    # start, and the current one.
    assert all_times == [cursor + timedelta(seconds=k) for k in range(len(all_times))]
    assert all_times[-1] - all_times[0] >= timedelta(seconds=60)
