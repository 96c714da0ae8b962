"""``conveyor schedules ...`` as users run it: real processes against a real database."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from tests.acceptance.workers import query, wait_until
from tests.conftest import PYTHON, subprocess_env


def conveyor(database_url: str, cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [PYTHON, "-m", "conveyor", *args],
        env=subprocess_env(database_url),
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
    )


def one_line_error(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 2, result
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("conveyor: error: "), result.stderr
    return lines[0]


def test_schedules__add_list_pause_resume_trigger(database_url: str, tmp_path: Path) -> None:
    added = conveyor(
        database_url,
        tmp_path,
        *("schedules", "add", "--name", "nightly", "--task", "add", "--cron", "0 30 2 * * *"),
        *("--timezone", "Europe/Berlin", "--args", "[1, 2]", "--misfire", "skip", "--json"),
    )
    assert added.returncode == 0, added.stderr
    schedule = json.loads(added.stdout)
    assert schedule["name"] == "nightly" and schedule["cron"] == "0 30 2 * * *" and schedule["source"] == "api"
    assert schedule["args"] == [1, 2] and schedule["misfire"] == "skip" and schedule["enabled"]

    paused = conveyor(database_url, tmp_path, "schedules", "pause", "nightly")
    assert paused.returncode == 0 and "paused" in paused.stdout
    listed = conveyor(database_url, tmp_path, "schedules", "list", "--json")
    assert [(s["name"], s["enabled"], s["disabled_reason"]) for s in json.loads(listed.stdout)] == [
        ("nightly", False, "paused")
    ]
    resumed = conveyor(database_url, tmp_path, "schedules", "resume", str(schedule["id"]))
    assert resumed.returncode == 0 and "resumed" in resumed.stdout

    triggered = conveyor(database_url, tmp_path, "schedules", "trigger", "nightly")
    assert triggered.returncode == 0, triggered.stderr
    task_id = int(triggered.stdout.strip())
    assert query(database_url, "SELECT name, args FROM conveyor_tasks WHERE id = %s", task_id) == [("add", [1, 2])]
    assert query(database_url, "SELECT kind, task_id FROM conveyor_schedule_runs") == [("manual", task_id)]


def test_schedules__bad_input_is_one_line_and_exit_2(database_url: str, tmp_path: Path) -> None:
    bad_cron = conveyor(
        database_url, tmp_path, "schedules", "add", "--name", "x", "--task", "add", "--cron", "61 * * * *"
    )
    assert "invalid cron" in one_line_error(bad_cron)
    missing = conveyor(database_url, tmp_path, "schedules", "trigger", "nope")
    assert "schedule 'nope' does not exist" in one_line_error(missing)
    assert query(database_url, "SELECT count(*) FROM conveyor_schedules") == [(0,)]


def test_schedules_status__no_leader_then_a_live_leader_then_its_lease_lapsed_after_sigkill(
    database_url: str, tmp_path: Path
) -> None:
    never = conveyor(database_url, tmp_path, "schedules", "status", "--json")
    assert never.returncode == 1, never.stderr
    report = json.loads(never.stdout)
    assert (report["status"], report["leader"], report["processes"]) == ("no-leader", None, [])
    assert report["problems"] == ["no scheduler has ever held the leader lease"]

    # A lease long enough that a loaded test machine never lets it lapse while the scheduler lives.
    fast = {"CONVEYOR_SCHEDULER__LEADER_LEASE_S": "3", "CONVEYOR_SCHEDULER__TICK_INTERVAL_S": "0.2"}
    scheduler = subprocess.Popen(
        [PYTHON, "-m", "conveyor", "scheduler"],
        env=subprocess_env(database_url, **fast),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_until(
            lambda: query(database_url, "SELECT count(*) FROM conveyor_scheduler_processes WHERE is_leader") == [(1,)],
            timeout_s=60,
            what="the scheduler to lead and report itself",
        )
        live = conveyor(database_url, tmp_path, "schedules", "status", "--json")
        assert live.returncode == 0, (live.stdout, live.stderr)
        report = json.loads(live.stdout)
        assert report["status"] == "ok" and report["problems"] == []
        assert report["leader"]["holder"].split(":")[-2] == str(scheduler.pid) and not report["leader"]["expired"]
        [process] = report["processes"]
        assert (process["pid"], process["leading"], process["stale"]) == (scheduler.pid, True, False)
        assert process["id"] == report["leader"]["holder"]

        table = conveyor(database_url, tmp_path, "schedules", "status")
        assert table.returncode == 0, table.stderr
        assert table.stdout.startswith("status: ok   leader: " + process["id"]), table.stdout
        assert str(scheduler.pid) in table.stdout and "leader" in table.stdout
    finally:
        scheduler.kill()
        scheduler.wait(30)

    # Killed, it neither released its lease nor withdrew its row: the lease lapses within 3 s, and the
    # row turns stale after two leases.
    wait_until(
        lambda: query(database_url, "SELECT count(*) FROM conveyor_leases WHERE expires_at > now()") == [(0,)],
        timeout_s=30,
        what="the dead leader's lease to lapse",
    )
    wait_until(
        lambda: (
            query(
                database_url,
                "SELECT count(*) FROM conveyor_scheduler_processes "
                "WHERE clock_timestamp() - last_seen_at > make_interval(secs => stale_after_s + 0.5)",
            )
            == [(1,)]
        ),
        timeout_s=30,
        what="the dead scheduler's row to turn stale",
    )
    lapsed = conveyor(database_url, tmp_path, "schedules", "status")
    assert lapsed.returncode == 1, lapsed.stderr
    assert lapsed.stdout.startswith("status: no-leader"), lapsed.stdout
    assert "lease expired at" in lapsed.stdout and "problem: the leader lease expired" in lapsed.stdout
    assert "stale (" in lapsed.stdout and f"scheduler {process['id']} has not reported" in lapsed.stdout
