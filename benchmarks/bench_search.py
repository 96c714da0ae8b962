"""Search and analytics latency at scale: prints p50/p95 per request kind, asserts nothing.

    .venv/bin/python benchmarks/bench_search.py [--database-url URL] [--tasks 1000000] [--repeat 15] [--no-seed]

Seeds ``--tasks`` tasks exactly as ``bench_api.py`` does (most finished, a waiting tail, 8% dead with an
error, ten queues of skewed sizes, forty task names, a week of creation times), brings the statistics
rollup up to date (and prints how long that first catch-up took: it happens once per database), then
serves the API with uvicorn on a free local port and times real HTTP requests: ``POST /search`` with
indexed filters, time ranges, error text and JSON conditions, deep cursor pages, and every
``/analytics`` endpoint over windows up to the 7-day maximum. Searches that scan under the time budget
may answer a partial first page; for those it also follows the cursor to the whole answer. Without
--database-url it starts a private PostgreSQL from the embedded binaries, and deletes it afterwards.
"""

from __future__ import annotations

import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_api import percentile, run_benchmark

from conveyor.app import App
from conveyor.db.analytics_store import AnalyticsStore


def timed(client: httpx.Client, method: str, path: str, **kwargs: Any) -> tuple[float, dict[str, Any]]:
    started = time.perf_counter()
    response = client.request(method, path, **kwargs)
    elapsed_ms = (time.perf_counter() - started) * 1000
    if response.status_code != 200:
        raise RuntimeError(f"{method} {path} {kwargs}: {response.status_code} {response.text[:300]}")
    return elapsed_ms, response.json()


def report(label: str, times: list[float], note: str = "") -> None:
    print(f"{label:<46} {percentile(times, 0.5):>8.1f} {percentile(times, 0.95):>8.1f} {max(times):>8.1f}  {note}")


def follow(client: httpx.Client, body: dict[str, Any]) -> tuple[int, float, int]:
    """Follow a search's cursor until the first full page (or the last one): requests, ms, matches."""
    requests, total_ms, found, cursor = 0, 0.0, 0, None
    limit = body.get("limit", 50)
    while True:
        ms, page = timed(client, "POST", "/api/v1/search", json={**body, "count": False, "cursor": cursor})
        requests, total_ms, found = requests + 1, total_ms + ms, found + len(page["items"])
        cursor = page["next_cursor"]
        if cursor is None or found >= limit:
            return requests, total_ms, found


def searches() -> dict[str, dict[str, Any]]:
    now = datetime.now(UTC)
    day = {
        "created_after": (now - timedelta(days=3)).isoformat(),
        "created_before": (now - timedelta(days=2)).isoformat(),
    }
    return {
        "no filter (newest first)": {},
        "state=dead": {"filter": {"state": ["dead"]}},
        "state=queued sort=run_at": {"filter": {"state": ["queued"]}, "sort": "run_at"},
        "queue=q9 (smallest)": {"filter": {"queue": ["q9"]}},
        "name=task_39 (rarest)": {"filter": {"name": ["task_39"]}},
        "state=dead&queue=q9": {"filter": {"state": ["dead"], "queue": ["q9"]}},
        "worker_id (1 of 8)": {"filter": {"worker_id": ["00000000-0000-4000-8000-000000000003"]}},
        "created: one day, mid-week": {"filter": day},
        "finished: one day, mid-week": {
            "filter": {"finished_after": day["created_after"], "finished_before": day["created_before"]}
        },
        "error_type=ValueError": {"filter": {"error_type": ["ValueError"]}},
        "error text (common)": {"filter": {"error": "bad inp"}},
        "error text (no match)": {"filter": {"error": "no such text"}},
        "error text (no match) + queue=q9": {"filter": {"error": "no such text", "queue": ["q9"]}},
        "sort=-finished_at": {"sort": "-finished_at"},
        "args $[0] == 123456 (one match)": {"filter": {"args": [{"path": "$[0]", "equals": 123456}]}},
        "args contains (one match)": {"filter": {"args": [{"contains": [123456]}]}},
        "args predicate + state=dead": {
            "filter": {"state": ["dead"], "args": [{"path": "$[0] ? (@ > $n)", "vars": {"n": 990000}}]}
        },
        "args == 'payload' (all match)": {"filter": {"args": [{"path": "$[1]", "equals": "payload"}]}},
        "count=false, state=succeeded": {"filter": {"state": ["succeeded"]}, "count": False},
    }


def analytics() -> dict[str, tuple[str, dict[str, Any]]]:
    week = 7 * 86_400
    return {
        "overview 1 h": ("/api/v1/analytics/overview", {"window_s": 3600}),
        "overview 7 d": ("/api/v1/analytics/overview", {"window_s": week}),
        "throughput 7 d / 1 h": ("/api/v1/analytics/throughput", {"window_s": week, "bucket_s": 3600}),
        "throughput 7 d / 15 min, queue=q0": (
            "/api/v1/analytics/throughput",
            {"window_s": week, "bucket_s": 900, "queue": "q0"},
        ),
        "throughput 1 d / 2 min, name=task_3": (
            "/api/v1/analytics/throughput",
            {"window_s": 86_400, "bucket_s": 120, "name": "task_3"},
        ),
        "throughput 1 h / 10 s (live rows)": ("/api/v1/analytics/throughput", {"window_s": 3600, "bucket_s": 10}),
        "latency 1 h": ("/api/v1/analytics/latency", {"window_s": 3600}),
        "latency 7 d": ("/api/v1/analytics/latency", {"window_s": week}),
        "latency 7 d, queue=q9": ("/api/v1/analytics/latency", {"window_s": week, "queue": "q9"}),
        "failures 1 d": ("/api/v1/analytics/failures", {"window_s": 86_400}),
        "failures 7 d": ("/api/v1/analytics/failures", {"window_s": week}),
        "tasks (per name) 1 d": ("/api/v1/analytics/tasks", {"window_s": 86_400}),
        "tasks (per name) 7 d": ("/api/v1/analytics/tasks", {"window_s": week}),
    }


def measure(client: httpx.Client, repeat: int) -> None:
    for _ in range(2):  # warm the pool and the caches
        timed(client, "POST", "/api/v1/search", json={})
        timed(client, "GET", "/api/v1/analytics/overview")

    print(f"\n{'POST /search':<46} {'p50 ms':>8} {'p95 ms':>8} {'max ms':>8}  first page")
    everything: list[float] = []
    partial: list[str] = []
    for label, body in searches().items():
        answers = [timed(client, "POST", "/api/v1/search", json=body) for _ in range(repeat)]
        times = [ms for ms, _ in answers]
        everything.extend(times)
        _, last = answers[-1]
        counted = (
            "no count" if last["count"] is None else f"count {'=' if last['count_is_exact'] else '>='} {last['count']}"
        )
        note = f"{'complete' if last['complete'] else 'PARTIAL'}, {counted}"
        if not last["complete"]:
            partial.append(label)
        report(label, times, note)
    deep: list[float] = []
    for _ in range(max(1, repeat // 5)):
        cursor = None
        for _ in range(20):
            ms, page = timed(
                client, "POST", "/api/v1/search", json={"filter": {"state": ["dead"]}, "limit": 100, "cursor": cursor}
            )
            deep.append(ms)
            cursor = page["next_cursor"]
    everything.extend(deep)
    report("20 pages state=dead, 100 per page", deep)
    report(f"ALL SEARCHES ({len(everything)} requests)", everything)
    if partial:
        # A partial first page is the time budget at work: what does the whole answer cost a client?
        print("\nfollowing partial pages' cursors to a full first page (or the end):")
        for label in partial:
            requests, total_ms, found = follow(client, searches()[label])
            print(f"  {label:<44} {requests:>3} requests, {total_ms:>7.1f} ms in all, {found} matches")

    print(f"\n{'GET /analytics':<46} {'p50 ms':>8} {'p95 ms':>8} {'max ms':>8}")
    every: list[float] = []
    for label, (path, params) in analytics().items():
        times = [timed(client, "GET", path, params=params)[0] for _ in range(repeat)]
        every.extend(times)
        report(label, times)
    report(f"ALL ANALYTICS ({len(every)} requests)", every)


def main() -> None:
    run_benchmark(__doc__, "conveyor-bench-search-", measure, prepare=roll_up)


async def roll_up(app: App) -> None:
    """Bring the statistics rollup up to date first (analytics read it), and say how long that took."""
    store = AnalyticsStore(app.runtime().engine)
    started = time.perf_counter()
    rows = 0
    while True:
        rolled = await store.roll_up(budget_s=30.0)
        rows += rolled.rows
        if rolled.rows == 0:
            break
    print(f"statistics rollup brought up to date: {rows:,} rows in {time.perf_counter() - started:.1f} s")


if __name__ == "__main__":
    sys.exit(main())
