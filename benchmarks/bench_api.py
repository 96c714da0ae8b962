"""API list and statistics latency at scale: prints p50/p95 per request kind, asserts nothing.

    .venv/bin/python benchmarks/bench_api.py [--database-url URL] [--tasks 1000000] [--repeat 15]

Seeds ``--tasks`` tasks with one server-side ``INSERT ... SELECT generate_series`` per 100,000 rows (the
fast bulk path: no row crosses the network), shaped like a busy system's table: most tasks finished,
a tail waiting, some dead, ten queues of skewed sizes, forty task names, a week of creation times. Then
it serves the API with uvicorn on a free local port and times real HTTP requests: lists (filters,
sorts, deep cursor pages) and queue statistics. Without --database-url it starts a private PostgreSQL
from the embedded binaries, and deletes it afterwards.
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import sys
import tempfile
import threading
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import psycopg
import uvicorn

from conveyor.api.app import create_app
from conveyor.api.auth import new_key
from conveyor.app import App
from conveyor.config import load_settings
from conveyor.db import migrate
from conveyor.db.api_key_store import ApiKeyStore

BATCH = 100_000

# One batch of tasks %(first)s..%(last)s of %(total)s. Position decides state: the newest 5% are still
# waiting (4% queued, 1% scheduled), a few hundred run, the rest finished (88% succeeded, 8% dead,
# 4% cancelled). Creation times spread evenly over the last week.
SEED = """
INSERT INTO conveyor_tasks (name, queue, state, priority, args, kwargs, attempt, max_attempts, lease_token,
                            lease_expires_at, worker_id, last_error, result, run_at, created_at, started_at,
                            finished_at)
SELECT 'task_' || (floor(power(r1, 1.5) * 40))::int,
       'q' || (floor(power(r2, 2) * 10))::int,
       state,
       (floor(r3 * 5))::int - 2,
       jsonb_build_array(i, 'payload'),
       '{}'::jsonb,
       CASE WHEN state IN ('queued', 'scheduled') THEN 0 ELSE 1 + (r3 * 2)::int END,
       3,
       CASE WHEN state = 'running' THEN gen_random_uuid() END,
       CASE WHEN state = 'running' THEN now() + interval '1 hour' END,
       CASE WHEN state NOT IN ('queued', 'scheduled') THEN '00000000-0000-4000-8000-00000000000' || (i %% 8) END::uuid,
       CASE WHEN state = 'dead' THEN jsonb_build_object('type', 'ValueError', 'message', 'bad input',
                                                        'traceback', repeat('frame\n', 80)) END,
       CASE WHEN state = 'succeeded' THEN to_jsonb(i) END,
       CASE WHEN state = 'scheduled' THEN now() + (r3 * interval '1 day') ELSE created END,
       created,
       CASE WHEN state NOT IN ('queued', 'scheduled') THEN created + interval '1 second' END,
       CASE WHEN state IN ('succeeded', 'dead', 'cancelled') THEN created + interval '2 seconds' END
FROM (
    SELECT i, random() AS r1, random() AS r2, random() AS r3,
           now() - (%(total)s - i) * (interval '7 days' / %(total)s) AS created,
           CASE WHEN i > %(total)s * 0.96 THEN 'queued'
                WHEN i > %(total)s * 0.95 THEN 'scheduled'
                WHEN i > %(total)s * 0.9497 THEN 'running'
                WHEN i %% 25 = 0 THEN 'cancelled'
                WHEN i %% 12 = 0 THEN 'dead'
                ELSE 'succeeded' END AS state
    FROM generate_series(%(first)s::bigint, %(last)s::bigint) AS i
) seed
"""


def seed(url: str, total: int) -> float:
    started = time.perf_counter()
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("TRUNCATE conveyor_tasks, conveyor_task_events, conveyor_workers, conveyor_queues CASCADE")
        for first in range(1, total + 1, BATCH):
            last = min(total, first + BATCH - 1)
            conn.execute(SEED, {"first": first, "last": last, "total": total})  # type: ignore[arg-type]
            print(f"\r  seeded {last:,} tasks", end="", flush=True)
        # What autovacuum would have done by the time anyone looks: statistics and the visibility map
        # (index-only scans depend on it).
        conn.execute("VACUUM (ANALYZE) conveyor_tasks")
    print()
    return time.perf_counter() - started


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Server:
    """The API under uvicorn in a thread (its own event loop, as in production)."""

    def __init__(self, app: App, port: int) -> None:
        self.app = app
        config = uvicorn.Config(create_app(app), host="127.0.0.1", port=port, log_level="warning", lifespan="off")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        async def serve() -> None:
            try:
                await self.server.serve()
            finally:
                await self.app.aclose()

        asyncio.run(serve())

    def __enter__(self) -> Server:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline:
                raise RuntimeError("the API server did not start")
            time.sleep(0.05)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def timed(client: httpx.Client, path: str, params: dict[str, object] | None = None) -> tuple[float, dict[str, object]]:
    started = time.perf_counter()
    response = client.get(path, params=params)  # type: ignore[arg-type]
    elapsed = time.perf_counter() - started
    if response.status_code != 200:
        raise RuntimeError(f"GET {path} {params}: {response.status_code} {response.text[:300]}")
    body = response.json() if response.headers["content-type"].startswith("application/json") else {}
    return elapsed * 1000, body


def follow_pages(client: httpx.Client, params: dict[str, object], pages: int) -> Callable[[], list[float]]:
    def run() -> list[float]:
        times: list[float] = []
        cursor = None
        for _ in range(pages):
            ms, body = timed(client, "/api/v1/tasks", {**params, **({"cursor": cursor} if cursor else {})})
            times.append(ms)
            cursor = body.get("next_cursor")
            if not cursor:
                break
        return times

    return run


def main() -> None:
    run_benchmark(__doc__, "conveyor-bench-api-", measure)


def run_benchmark(
    description: str | None,
    tmp_prefix: str,
    measure: Callable[[httpx.Client, int], None],
    prepare: Callable[[App], Awaitable[None]] | None = None,
) -> None:
    """The command line shared with bench_search.py: parse the arguments, get a database (started from
    the embedded binaries without --database-url), seed it unless --no-seed, ``prepare`` it, make a
    read-only key, serve the API on a free port and ``measure`` through a client that presents the key."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--database-url")
    parser.add_argument("--tasks", type=int, default=1_000_000)
    parser.add_argument("--repeat", type=int, default=15, help="requests per kind")
    parser.add_argument("--no-seed", action="store_true", help="reuse the tasks already in the database")
    args = parser.parse_args()

    server = None
    url = args.database_url
    if url is None:
        from conveyor.db.embedded import EmbeddedPostgres

        tmp = Path(tempfile.mkdtemp(prefix=tmp_prefix))
        tmp.chmod(0o755)
        server = EmbeddedPostgres(tmp / "data", ephemeral=True)
        url = server.start()
    migrate.upgrade(url)
    try:
        if not args.no_seed:
            print(f"seeding {args.tasks:,} tasks ...")
            print(f"  took {seed(url, args.tasks):.1f} s")
        app = App(settings=load_settings(None, environ={}, overrides={"database_url": url}))
        key = new_key()

        async def set_up() -> None:
            if prepare is not None:
                await prepare(app)
            await ApiKeyStore(app.runtime().engine).create(
                name="bench", prefix=key.prefix, key_hash=key.key_hash, scopes=["tasks:read"]
            )
            await app.aclose()

        asyncio.run(set_up())
        with (
            Server(app, free_port()) as running,
            httpx.Client(
                base_url=f"http://127.0.0.1:{running.server.config.port}",
                headers={"Authorization": f"Bearer {key.key}"},
                timeout=60,
            ) as client,
        ):
            measure(client, args.repeat)
        app.close()
    finally:
        if server is not None:
            server.stop()


def measure(client: httpx.Client, repeat: int) -> None:
    now = datetime.now(UTC)
    window = {
        "created_after": (now - timedelta(days=3)).isoformat(),
        "created_before": (now - timedelta(days=2)).isoformat(),
    }
    lists: dict[str, dict[str, object]] = {
        "newest first": {},
        "oldest first": {"sort": "id"},
        "state=queued": {"state": "queued"},
        "state=scheduled": {"state": "scheduled"},
        "state=running": {"state": "running"},
        "state=dead": {"state": "dead"},
        "state=succeeded": {"state": "succeeded"},
        "state=blocked (none)": {"state": "blocked"},
        "queue=q9 (smallest)": {"queue": "q9"},
        "queue=q0 (largest)": {"queue": "q0"},
        "queue=nobody (no match)": {"queue": "nobody"},
        "name=task_39 (rarest)": {"name": "task_39"},
        "state=dead&queue=q9": {"state": "dead", "queue": "q9"},
        "state=succeeded&name=task_39": {"state": "succeeded", "name": "task_39"},
        "3 states, 2 queues": {"state": ["dead", "cancelled", "queued"], "queue": ["q1", "q8"]},
        "one day, created range": window,
        "sort=-finished_at": {"sort": "-finished_at"},
        "state=dead sort=-finished_at": {"state": "dead", "sort": "-finished_at"},
        "queue=q9 sort=-finished_at": {"queue": "q9", "sort": "-finished_at"},
        "state=queued sort=run_at": {"state": "queued", "sort": "run_at"},
        "state=scheduled sort=-run_at": {"state": "scheduled", "sort": "-run_at"},
        "waiting in q9 sort=run_at": {"state": ["scheduled", "queued"], "queue": "q9", "sort": "run_at"},
        "limit=200": {"limit": 200},
    }
    deep: dict[str, dict[str, object]] = {
        "20 pages newest first": {"limit": 100},
        "20 pages state=dead": {"state": "dead", "limit": 100},
        "20 pages sort=-finished_at": {"sort": "-finished_at", "limit": 100},
        "20 pages queued sort=run_at": {"state": "queued", "sort": "run_at", "limit": 100},
    }
    stats = {
        "GET /queues": ("/api/v1/queues", None),
        "GET /queues/q0": ("/api/v1/queues/q0", None),
        "GET /metrics": ("/metrics", None),
    }
    for path, params in (("/api/v1/tasks", {}), ("/api/v1/queues", None)):  # warm the pool and caches
        timed(client, path, params)

    print(f"\n{'list':<40} {'p50 ms':>8} {'p95 ms':>8} {'max ms':>8}")
    all_lists: list[float] = []
    for label, params in lists.items():
        times = [timed(client, "/api/v1/tasks", params)[0] for _ in range(repeat)]
        all_lists.extend(times)
        print(f"{label:<40} {percentile(times, 0.5):>8.1f} {percentile(times, 0.95):>8.1f} {max(times):>8.1f}")
    for label, params in deep.items():
        times = [t for _ in range(max(1, repeat // 5)) for t in follow_pages(client, params, 20)()]
        all_lists.extend(times)
        print(f"{label:<40} {percentile(times, 0.5):>8.1f} {percentile(times, 0.95):>8.1f} {max(times):>8.1f}")
    print(
        f"{'ALL LISTS (' + str(len(all_lists)) + ' requests)':<40} "
        f"{percentile(all_lists, 0.5):>8.1f} {percentile(all_lists, 0.95):>8.1f} {max(all_lists):>8.1f}"
    )

    print(f"\n{'statistics':<40} {'p50 ms':>8} {'p95 ms':>8} {'max ms':>8}")
    all_stats: list[float] = []
    for label, (path, params) in stats.items():
        times = [timed(client, path, params)[0] for _ in range(repeat)]
        all_stats.extend(times)
        print(f"{label:<40} {percentile(times, 0.5):>8.1f} {percentile(times, 0.95):>8.1f} {max(times):>8.1f}")
    print(
        f"{'ALL STATISTICS':<40} {percentile(all_stats, 0.5):>8.1f} {percentile(all_stats, 0.95):>8.1f} "
        f"{max(all_stats):>8.1f}"
    )


if __name__ == "__main__":
    sys.exit(main())
