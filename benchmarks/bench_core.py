"""Core throughput and latency on this machine: prints figures and ratios, asserts nothing.

    .venv/bin/python benchmarks/bench_core.py [--database-url URL] [--tasks 50000] [--repeat 3] [--big 1000000]
                                              [--task noop|anoop]

``noop`` is a plain function (run on the worker's thread pool), ``anoop`` an ``async def`` (run on its
event loop): PgQueuer's entrypoints are async, so compare.py measures both with ``anoop``.

Without --database-url it starts a private PostgreSQL from the embedded binaries (fsync on, as a
user's would be). Each figure (latency too) is the median of --repeat runs; timings come from the database clock
(created_at, started_at, finished_at), so worker start-up time is not counted as drain time.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from urllib.parse import urlsplit

import psycopg

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from bench_app import app  # noqa: E402
from compare import ensure_database  # noqa: E402

from conveyor.config import load_settings  # noqa: E402
from conveyor.db import migrate  # noqa: E402


def reset(url: str) -> None:
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("TRUNCATE conveyor_tasks, conveyor_task_events, conveyor_workers CASCADE")
        conn.execute("VACUUM ANALYZE conveyor_tasks")


TASK = "noop"  # which no-op the figures are for (--task)


def bulk_enqueue(n: int) -> float:
    items = [{"name": TASK, "args": [i]} for i in range(n)]
    started = time.perf_counter()
    app.enqueue_many(items)
    return n / (time.perf_counter() - started)


def spawn_workers(url: str, processes: int, *, burst: bool, concurrency: int = 50) -> list[subprocess.Popen[bytes]]:
    env = {**os.environ, "CONVEYOR_DATABASE_URL": url, "PYTHONPATH": str(HERE)}
    command = [
        sys.executable,
        "-m",
        "conveyor",
        "worker",
        "--app",
        "bench_app:app",
        "--concurrency",
        str(concurrency),
        "--log-level",
        "warning",
        *(["--burst"] if burst else []),
    ]
    return [subprocess.Popen(command, env=env) for _ in range(processes)]


def succeeded_rate(url: str) -> float:
    """Tasks per second between the first start and the last finish, on the database clock."""
    with psycopg.connect(url) as conn:
        count, span = conn.execute(
            "SELECT count(*), EXTRACT(EPOCH FROM max(finished_at) - min(started_at)) FROM conveyor_tasks "
            "WHERE state = 'succeeded'"
        ).fetchone()  # type: ignore[misc]
    return float(count) / float(span)


def drain_rate(url: str, processes: int) -> float:
    for p in spawn_workers(url, processes, burst=True):
        if p.wait() != 0:
            raise SystemExit(f"worker exited with {p.returncode}")
    return succeeded_rate(url)


def timed_drain(url: str, processes: int, seconds: float) -> float:
    """Run workers for ``seconds`` on a large backlog (no --burst: it would drain everything)."""
    procs = spawn_workers(url, processes, burst=False)
    time.sleep(seconds)
    for p in procs:
        p.terminate()
    for p in procs:
        p.wait()
    return succeeded_rate(url)


def steady_latency(url: str, rate: int, seconds: float) -> tuple[float, float, float]:
    env = {**os.environ, "CONVEYOR_DATABASE_URL": url, "PYTHONPATH": str(HERE)}
    worker = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "conveyor",
            "worker",
            "--app",
            "bench_app:app",
            "--concurrency",
            "50",
            "--log-level",
            "warning",
        ],
        env=env,
    )
    try:
        time.sleep(3)  # let it start and listen
        noop = app.registry.get(TASK)
        interval = 1 / rate
        next_at = time.perf_counter()
        for i in range(int(rate * seconds)):
            app.enqueue(noop.name, [i])
            next_at += interval
            pause = next_at - time.perf_counter()
            if pause > 0:
                time.sleep(pause)
        time.sleep(1)
    finally:
        worker.terminate()
        worker.wait()
    with psycopg.connect(url) as conn:
        rows = conn.execute(
            "SELECT EXTRACT(EPOCH FROM started_at - created_at) * 1000 FROM conveyor_tasks "
            "WHERE started_at IS NOT NULL ORDER BY 1"
        ).fetchall()
    values = [float(r[0]) for r in rows]
    q = statistics.quantiles(values, n=100)
    return q[49], q[94], q[98]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--database-url")
    parser.add_argument("--tasks", type=int, default=50_000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--big", type=int, default=1_000_000, help="queued tasks for the flat-cost run (0: skip)")
    parser.add_argument("--latency-seconds", type=float, default=10.0)
    parser.add_argument("--task", choices=["noop", "anoop"], default="noop", help="sync or async no-op")
    args = parser.parse_args()
    global TASK
    TASK = args.task

    server = None
    url = args.database_url
    if url is None:
        from conveyor.db.embedded import EmbeddedPostgres

        tmp = Path(tempfile.mkdtemp(prefix="conveyor-bench-"))
        tmp.chmod(0o755)
        server = EmbeddedPostgres(tmp / "data", ephemeral=True)
        url = server.start()
    else:
        parts = urlsplit(url)
        if not parts.path.strip("/"):
            raise SystemExit(f"--database-url must name a database: {url}")
        ensure_database(parts._replace(path="/postgres").geturl(), parts.path.strip("/"))  # created if missing
    migrate.upgrade(url)
    app.configure(load_settings(None, overrides={"database_url": url}))
    try:
        print(f"{args.tasks} no-op tasks ({TASK}), median of {args.repeat} runs, 2-core machine")
        enq, d1, d2 = [], [], []
        for _ in range(args.repeat):
            reset(url)
            enq.append(bulk_enqueue(args.tasks))
            d1.append(drain_rate(url, 1))
            reset(url)
            bulk_enqueue(args.tasks)
            d2.append(drain_rate(url, 2))
        print(f"bulk enqueue:           {statistics.median(enq):>10,.0f} tasks/s  (runs: {[round(x) for x in enq]})")
        print(f"drain, 1 process:       {statistics.median(d1):>10,.0f} tasks/s  (runs: {[round(x) for x in d1]})")
        print(f"drain, 2 processes:     {statistics.median(d2):>10,.0f} tasks/s  (runs: {[round(x) for x in d2]})")

        runs = []
        for _ in range(args.repeat):
            reset(url)
            runs.append(steady_latency(url, 200, args.latency_seconds))
        p50, p95, p99 = (statistics.median(r[i] for r in runs) for i in range(3))
        print(f"enqueue->start latency at 200 tasks/s: p50 {p50:.2f} ms, p95 {p95:.2f} ms, p99 {p99:.2f} ms")
        print(f"  (p99 of each run: {[round(r[2], 2) for r in runs]})")

        if args.big:
            reset(url)
            bulk_enqueue(args.big)
            with psycopg.connect(url, autocommit=True) as conn:
                conn.execute("VACUUM ANALYZE conveyor_tasks")
            loaded = timed_drain(url, 2, seconds=15)
            reset(url)
            bulk_enqueue(args.tasks)
            base = timed_drain(url, 2, seconds=5)
            print(
                f"drain, 2 processes, {args.big:,} tasks queued: {loaded:,.0f} tasks/s vs {base:,.0f} tasks/s "
                f"with {args.tasks:,} queued (ratio {loaded / base:.2f}; flat cost per task = ratio near 1)"
            )
    finally:
        app.close()
        if server is not None:
            server.stop()


if __name__ == "__main__":
    main()
