"""``/api/v1/analytics``: counts (rolled-up minutes plus live ones, the same either way), percentiles,
top errors, per-name numbers, and bounded windows (too large is a 422 naming the parameter)."""

from __future__ import annotations

from typing import Any

import httpx
import psycopg
import pytest

from conveyor.app import App
from conveyor.db.analytics_store import AnalyticsStore
from tests.api.conftest import assert_problem
from tests.api.seeding import error, execute, insert, task

BASE = "/api/v1/analytics"


def ago(seconds: float) -> str:
    return f"now() - make_interval(secs => {seconds})"


def finished(age_s: float, state: str = "succeeded", run_s: float = 1.0, **values: Any) -> dict[str, Any]:
    """A task that finished ``age_s`` seconds ago after running ``run_s`` seconds."""
    return task(
        state=state,
        created_at=ago(age_s + run_s + 5),
        run_at=ago(age_s + run_s + 5),
        started_at=ago(age_s + run_s),
        finished_at=ago(age_s),
        **values,
    )


async def roll_up_everything(app: App) -> None:
    store = AnalyticsStore(app.runtime().engine)
    for _ in range(50):
        report = await store.roll_up(budget_s=5.0, chunk_s=86_400)
        if report.rows == 0 and report.rolled_from is not None:
            return


def totals(buckets: list[dict[str, Any]]) -> dict[str, int]:
    keys = ("enqueued", "succeeded", "dead", "cancelled", "finished")
    return {k: sum(b["counts"][k] for b in buckets) for k in keys}


@pytest.fixture
def history(database_url: str) -> None:
    rows = [finished(60 * m + 30) for m in range(1, 31)]  # one success a minute for half an hour
    rows += [finished(90, state="dead", queue="reports", name="build", last_error=error())]
    rows += [finished(20, state="cancelled", name="build")]  # not yet a settled minute
    rows += [finished(2 * 3600)]  # outside a one-hour window
    rows += [task(state="queued", created_at=ago(30), started_at=None, finished_at=None)]
    insert(database_url, rows)


async def test_throughput__the_same_from_live_rows_and_from_the_rollup(
    reader: httpx.AsyncClient, conveyor_app: App, database_url: str, history: None
) -> None:
    params = {"window_s": 3600, "bucket_s": 600}
    execute(database_url, "DELETE FROM conveyor_task_stats_progress")
    live = (await reader.get(f"{BASE}/throughput", params=params)).json()
    await roll_up_everything(conveyor_app)
    [(rolled_minutes,)] = execute(
        database_url, "SELECT count(*) FROM conveyor_task_stats WHERE queue = '' AND name = ''"
    )
    assert rolled_minutes >= 30
    rolled = (await reader.get(f"{BASE}/throughput", params=params)).json()
    assert len(rolled["buckets"]) in (6, 7)
    assert rolled["bucket_s"] == 600
    for before, after in zip(live["buckets"], rolled["buckets"], strict=True):
        assert before["start"] == after["start"]
        assert before["counts"] == after["counts"]
    # 30 successes, 1 dead, 1 cancelled finished in the window; the 2-hour-old one is out.
    assert totals(rolled["buckets"]) == {"enqueued": 33, "succeeded": 30, "dead": 1, "cancelled": 1, "finished": 32}


async def test_throughput__filters_and_sub_minute_buckets(
    reader: httpx.AsyncClient, conveyor_app: App, history: None
) -> None:
    await roll_up_everything(conveyor_app)
    by_queue = (await reader.get(f"{BASE}/throughput", params={"queue": "reports", "window_s": 3600})).json()
    assert totals(by_queue["buckets"])["dead"] == 1
    assert len(by_queue["buckets"]) in (60, 61)
    by_name = (await reader.get(f"{BASE}/throughput", params={"name": "build", "window_s": 3600})).json()
    assert totals(by_name["buckets"]) == {"enqueued": 2, "succeeded": 0, "dead": 1, "cancelled": 1, "finished": 2}
    both = {"queue": "reports", "name": "build", "window_s": 3600, "bucket_s": 3600}
    assert totals((await reader.get(f"{BASE}/throughput", params=both)).json()["buckets"])["dead"] == 1
    fine = (await reader.get(f"{BASE}/throughput", params={"window_s": 600, "bucket_s": 10})).json()
    assert len(fine["buckets"]) in (60, 61)
    # The first bucket starts less than 10 s before now - 600 s: the successes 90, 150, ... 570 s ago.
    assert totals(fine["buckets"])["succeeded"] == 9
    empty = (await reader.get(f"{BASE}/throughput", params={"queue": "nobody", "window_s": 600})).json()
    assert totals(empty["buckets"])["finished"] == 0


async def test_overview__window_totals_backlog_and_workers(reader: httpx.AsyncClient, history: None) -> None:
    body = (await reader.get(f"{BASE}/overview", params={"window_s": 3600})).json()
    assert body["counts"]["succeeded"] == 30
    assert body["counts"]["dead"] == 1
    assert body["counts"]["avg_run_s"] == pytest.approx(1.0, abs=0.01)
    assert body["counts"]["avg_wait_s"] == pytest.approx(5.0, abs=0.01)
    assert body["success_rate"] == pytest.approx(30 / 31, abs=1e-4)
    assert body["now"] == {"scheduled": 0, "queued": 1, "running": 0, "blocked": 0, "dead": 1}
    assert body["oldest_waiting_age_s"] is not None
    assert body["live_workers"] == 0
    assert body["throughput_per_s"] > 0
    only_reports = (await reader.get(f"{BASE}/overview", params={"queue": "reports"})).json()
    assert only_reports["counts"]["finished"] == 1
    assert only_reports["now"]["queued"] == 0


async def test_latency__percentiles_of_wait_and_run_time(reader: httpx.AsyncClient, database_url: str) -> None:
    rows = []
    for i in range(1, 101):
        # Ran i seconds, waited 2*i seconds after becoming due.
        rows.append(
            task(
                run_at=ago(300 + 3 * i),
                created_at=ago(400 + 3 * i),
                started_at=ago(300 + i),
                finished_at=ago(300),
            )
        )
    rows.append(task(state="cancelled", started_at=None))  # never ran: no run time
    insert(database_url, rows)
    body = (await reader.get(f"{BASE}/latency", params={"window_s": 3600})).json()
    assert body["sample_size"] == 100
    assert body["sampled"] is False
    assert body["run_s"]["p50"] == pytest.approx(50.5, abs=0.01)
    assert body["run_s"]["p95"] == pytest.approx(95.05, abs=0.01)
    assert body["run_s"]["max"] == pytest.approx(100, abs=0.01)
    assert body["wait_s"]["p50"] == pytest.approx(101, abs=0.02)
    assert body["wait_s"]["avg"] == pytest.approx(101, abs=0.02)
    none = (await reader.get(f"{BASE}/latency", params={"window_s": 60})).json()
    assert none["sample_size"] == 0 and none["run_s"]["p50"] is None


async def test_failures__most_frequent_errors_first(reader: httpx.AsyncClient, database_url: str) -> None:
    rows = [finished(100 + i, state="dead", last_error=error("ValueError", "bad input")) for i in range(5)]
    rows += [finished(200 + i, state="dead", queue="other", last_error=error("KeyError", "'id'")) for i in range(2)]
    rows += [finished(3 * 86_400, state="dead", last_error=error("OldError", "long ago"))]
    rows += [finished(50, state="succeeded", last_error=error("ValueError", "bad input"))]  # recovered: not dead
    insert(database_url, rows)
    body = (await reader.get(f"{BASE}/failures", params={"window_s": 86_400})).json()
    assert body["dead"] == 7
    assert [(g["error_type"], g["message"], g["count"]) for g in body["items"]] == [
        ("ValueError", "bad input", 5),
        ("KeyError", "'id'", 2),
    ]
    assert body["items"][1]["queues"] == ["other"]
    assert body["items"][0]["example_task_id"] > 0
    limited = (await reader.get(f"{BASE}/failures", params={"window_s": 86_400, "limit": 1})).json()
    assert len(limited["items"]) == 1


async def test_tasks__per_name_numbers(reader: httpx.AsyncClient, history: None, database_url: str) -> None:
    insert(database_url, [task(state="running", name="build", started_at=ago(5), finished_at=None)])
    body = (await reader.get(f"{BASE}/tasks", params={"window_s": 3600})).json()
    by_name = {item["name"]: item for item in body["items"]}
    assert by_name["add"]["counts"]["succeeded"] == 30
    assert by_name["add"]["now"]["queued"] == 1
    assert by_name["add"]["run_p50_s"] == pytest.approx(1.0, abs=0.01)
    assert by_name["build"]["counts"]["dead"] == 1
    assert by_name["build"]["now"]["running"] == 1
    assert body["items"][0]["name"] == "add"  # the busiest first


@pytest.mark.parametrize(
    ("path", "params", "field"),
    [
        ("throughput", {"window_s": 604_801}, "query.window_s"),
        ("throughput", {"window_s": 0}, "query.window_s"),
        ("throughput", {"window_s": "a week"}, "query.window_s"),
        ("throughput", {"bucket_s": 0}, "query.bucket_s"),
        ("throughput", {"window_s": 600, "bucket_s": 601}, "query.bucket_s"),
        ("throughput", {"window_s": 604_800, "bucket_s": 60}, "query.bucket_s"),  # 10,080 buckets
        ("throughput", {"window_s": 7200, "bucket_s": 30}, "query.window_s"),  # sub-minute buckets: 1 h at most
        ("throughput", {"queue": "no such queue!"}, "query.queue"),
        ("overview", {"window_s": 30}, "query.window_s"),
        ("overview", {"window_s": 10**12}, "query.window_s"),
        ("latency", {"window_s": 604_801}, "query.window_s"),
        ("latency", {"state": "running"}, "query.state.0"),
        ("failures", {"limit": 101}, "query.limit"),
        ("tasks", {"window_s": 59}, "query.window_s"),
    ],
)
async def test_bounds__422_naming_the_parameter(
    reader: httpx.AsyncClient, path: str, params: dict[str, Any], field: str
) -> None:
    assert_problem(await reader.get(f"{BASE}/{path}", params=params), 422, field)


async def test_rollup__never_passes_an_open_transaction(conveyor_app: App, database_url: str) -> None:
    store = AnalyticsStore(conveyor_app.runtime().engine)
    execute(database_url, "DELETE FROM conveyor_task_stats_progress")
    execute(
        database_url,
        "INSERT INTO conveyor_task_stats_progress VALUES (1, date_trunc('minute', now() - interval '30 minutes'), "
        "date_trunc('minute', now() - interval '30 minutes'))",
    )
    with psycopg.connect(database_url) as holder:
        holder.execute("SELECT 1")  # a transaction opened now: its inserts would have created_at = now
        holder.execute("SET LOCAL application_name = 'test-open-transaction'")
        [(xact_start,)] = holder.execute("SELECT date_trunc('minute', now())").fetchall()
        await store.roll_up(budget_s=2.0)
        [(rolled_until,)] = execute(database_url, "SELECT rolled_until FROM conveyor_task_stats_progress")
        assert rolled_until <= xact_start
        holder.rollback()
    await store.roll_up(budget_s=2.0)
    [(moved,)] = execute(
        database_url,
        "SELECT rolled_until >= date_trunc('minute', now() - interval '1 minute') FROM conveyor_task_stats_progress",
    )
    assert moved
