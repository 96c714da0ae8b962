"""Reference run of PgQueuer for bench_core.py: the same four figures, measured the same way.

PgQueuer is not a dependency of Conveyor and this script does not import conveyor: run it from a
virtualenv of its own, against a database of its own (created if missing; the default is below):

    python3 -m venv /tmp/pgq-venv
    /tmp/pgq-venv/bin/pip install 'pgqueuer[asyncpg]==1.6.0' 'psycopg[binary]'
    /tmp/pgq-venv/bin/python benchmarks/reference_pgqueuer.py [--database-url URL] [--tasks 50000] [--repeat 3]

benchmarks/compare.py runs this and bench_core.py one after the other and prints the ratios.

What is measured, as bench_core measures Conveyor (N = --tasks no-op jobs, median of --repeat runs):

- bulk enqueue: one ``Queries.enqueue`` call with lists of N entrypoints, payloads and priorities (a
  single ``INSERT ... SELECT FROM UNNEST`` statement, one transaction), on the wall clock around the
  call, as bench_core times ``app.enqueue_many``. The connection is opened before the clock starts.
- drain, 1 and 2 processes: that many consumer processes (this script with --consume), each running
  ``pgqueuer.run(factory, mode=drain, ...)`` under uvloop, which is what the ``pgq run`` CLI does
  (the CLI itself cannot be used here: pgqueuer 1.6.0's ``pgq run`` fails at start with typer 0.29,
  in ``setup_fancy_logger``). The factory yields a ``QueueManager`` on one connection (asyncpg,
  PgQueuer's preferred driver; --driver psycopg for the driver Conveyor uses) with one async no-op
  entrypoint (PgQueuer entrypoints must be async; bench_core's ``noop`` is a plain function, which
  Conveyor runs on a thread). Settings: --max-concurrent-tasks 50 (bench_core's workers run with
  concurrency 50) and --batch-size 25, the largest batch PgQueuer allows under that cap (it requires
  the cap to be at least twice the batch size). PgQueuer's default batch size, 10, drained about half
  as fast in small runs on this machine; pass --batch-size 10 to see it.
- enqueue->start latency: one consumer started and given 3 s to listen, then single
  ``Queries.enqueue`` calls paced at 200 jobs/s for --latency-seconds, then 1 s to finish.

Timings come from the database clock, as bench_core's do. PgQueuer deletes a job from its queue
table when it finishes, but ``pgqueuer_log`` keeps one row per transition, stamped ``now()`` by the
transaction that wrote it: 'queued' (the enqueue), 'picked' (the dequeue that claimed it) and
'successful' (the batched completion write, flushed every batch-size jobs or 0.1 s; Conveyor's
acknowledgements are batched too). These stand for Conveyor's created_at, started_at and finished_at:
drain rate = successful jobs / (last 'successful' - first 'picked'), so consumer start-up is not
counted; latency = first 'picked' - 'queued' per job. Between runs the queue, log and statistics
tables are truncated and the queue table vacuumed, as bench_core resets Conveyor's tables. The schema
is PgQueuer's own install (what ``pgq install`` runs), with its default durability: all tables logged.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import logging
import statistics
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Literal

import pgqueuer
import psycopg
import uvloop
from pgqueuer import AsyncpgDriver, Job, PsycopgDriver, Queries, QueueManager
from pgqueuer.ports.driver import Driver
from pgqueuer.types import QueueExecutionMode
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo

DEFAULT_URL = "postgresql://postgres@127.0.0.1:5432/pgq_perf"
ENTRYPOINT = "noop"
DriverName = Literal["asyncpg", "psycopg"]


@asynccontextmanager
async def open_driver(url: str, driver: DriverName) -> AsyncIterator[Driver]:
    """One connection wrapped in PgQueuer's driver for it; closed on exit."""
    if driver == "asyncpg":
        import asyncpg

        connection = await asyncpg.connect(dsn=url)
        try:
            yield AsyncpgDriver(connection)
        finally:
            await connection.close()
    else:
        async with await psycopg.AsyncConnection.connect(url, autocommit=True) as aconn:
            yield PsycopgDriver(aconn)


@asynccontextmanager
async def create_queue_manager(url: str, driver: DriverName) -> AsyncIterator[QueueManager]:
    """The consumer's factory: a QueueManager with one async no-op entrypoint."""
    async with open_driver(url, driver) as db:
        qm = QueueManager(Queries(db))

        @qm.entrypoint(ENTRYPOINT)
        async def noop(job: Job) -> None:
            return None

        yield qm


def consume(args: argparse.Namespace) -> None:
    """One consumer process, run as ``pgq run --mode M --batch-size B --max-concurrent-tasks C`` runs it.

    SIGTERM shuts it down gracefully: jobs in flight finish and their log rows are written."""
    logging.basicConfig(level=logging.WARNING)
    uvloop.run(
        pgqueuer.run(
            functools.partial(create_queue_manager, args.database_url, args.driver),
            batch_size=args.batch_size,
            max_concurrent_tasks=args.max_concurrent_tasks,
            mode=QueueExecutionMode(args.consume),
        )
    )


def ensure_database(url: str) -> None:
    """Create the database named in ``url`` if it does not exist (connecting to ``postgres`` for that)."""
    name = conninfo_to_dict(url).get("dbname")
    if not name:
        raise SystemExit(f"--database-url must name a database: {url}")
    with psycopg.connect(make_conninfo(url, dbname="postgres"), autocommit=True) as conn:
        if conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone() is None:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(str(name))))


async def install_schema(url: str, driver: DriverName) -> None:
    """PgQueuer's own install (what ``pgq install`` runs), unless its schema is already there."""
    async with open_driver(url, driver) as db:
        queries = Queries(db)
        if not await queries.schema_is_installed():
            await queries.install()


def reset(url: str) -> None:
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("TRUNCATE pgqueuer, pgqueuer_log, pgqueuer_statistics")
        conn.execute("VACUUM ANALYZE pgqueuer")


async def bulk_enqueue(url: str, driver: DriverName, n: int) -> float:
    async with open_driver(url, driver) as db:
        queries = Queries(db)
        started = time.perf_counter()
        await queries.enqueue([ENTRYPOINT] * n, [str(i).encode() for i in range(n)], [0] * n)
        return n / (time.perf_counter() - started)


def spawn_consumers(args: argparse.Namespace, n: int, mode: QueueExecutionMode) -> list[subprocess.Popen[bytes]]:
    command = [
        sys.executable,
        __file__,
        "--consume",
        mode.value,
        "--database-url",
        args.database_url,
        "--driver",
        args.driver,
        "--batch-size",
        str(args.batch_size),
        "--max-concurrent-tasks",
        str(args.max_concurrent_tasks),
    ]
    return [subprocess.Popen(command) for _ in range(n)]


def succeeded_rate(url: str, expected: int) -> float:
    """Jobs per second between the first pick and the last success, on the database clock."""
    with psycopg.connect(url) as conn:
        count, span = conn.execute(
            "SELECT count(*) FILTER (WHERE status = 'successful'), "
            "EXTRACT(EPOCH FROM max(created) FILTER (WHERE status = 'successful') "
            "- min(created) FILTER (WHERE status = 'picked')) FROM pgqueuer_log"
        ).fetchone()  # type: ignore[misc]
    if count != expected:
        raise SystemExit(f"{count} of {expected} jobs logged as successful")
    return float(count) / float(span)


def drain_rate(args: argparse.Namespace, processes: int) -> float:
    for p in spawn_consumers(args, processes, QueueExecutionMode.drain):
        if p.wait() != 0:
            raise SystemExit(f"consumer exited with {p.returncode}")
    return succeeded_rate(args.database_url, args.tasks)


async def paced_enqueue(url: str, driver: DriverName, rate: int, seconds: float) -> None:
    async with open_driver(url, driver) as db:
        queries = Queries(db)
        interval = 1 / rate
        next_at = time.perf_counter()
        for i in range(int(rate * seconds)):
            await queries.enqueue(ENTRYPOINT, str(i).encode())
            next_at += interval
            pause = next_at - time.perf_counter()
            if pause > 0:
                await asyncio.sleep(pause)


def steady_latency(args: argparse.Namespace, rate: int, seconds: float) -> tuple[float, float, float]:
    url = args.database_url
    (consumer,) = spawn_consumers(args, 1, QueueExecutionMode.continuous)
    try:
        time.sleep(3)  # let it start and listen
        asyncio.run(paced_enqueue(url, args.driver, rate, seconds))
        time.sleep(1)
    finally:
        consumer.terminate()
        consumer.wait()
    with psycopg.connect(url) as conn:
        rows = conn.execute(
            "SELECT EXTRACT(EPOCH FROM min(p.created) - min(q.created)) * 1000 "
            "FROM pgqueuer_log q JOIN pgqueuer_log p ON p.job_id = q.job_id AND p.status = 'picked' "
            "WHERE q.status = 'queued' GROUP BY q.job_id ORDER BY 1"
        ).fetchall()
    values = [float(r[0]) for r in rows]
    q = statistics.quantiles(values, n=100)
    return q[49], q[94], q[98]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--database-url", default=DEFAULT_URL)
    parser.add_argument("--tasks", type=int, default=50_000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--latency-seconds", type=float, default=10.0)
    parser.add_argument("--driver", choices=["asyncpg", "psycopg"], default="asyncpg")
    parser.add_argument("--batch-size", type=int, default=25, help="jobs a consumer dequeues at once")
    parser.add_argument("--max-concurrent-tasks", type=int, default=50, help="jobs in flight per consumer")
    parser.add_argument("--consume", choices=[m.value for m in QueueExecutionMode], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.consume:
        consume(args)
        return

    url = args.database_url
    ensure_database(url)
    asyncio.run(install_schema(url, args.driver))
    print(
        f"PgQueuer {pgqueuer.__version__} reference: driver {args.driver}, batch size {args.batch_size}, "
        f"max {args.max_concurrent_tasks} concurrent tasks per process"
    )
    print(f"{args.tasks} no-op tasks, median of {args.repeat} runs, 2-core machine")
    enq, d1, d2 = [], [], []
    for _ in range(args.repeat):
        reset(url)
        enq.append(asyncio.run(bulk_enqueue(url, args.driver, args.tasks)))
        d1.append(drain_rate(args, 1))
        reset(url)
        asyncio.run(bulk_enqueue(url, args.driver, args.tasks))
        d2.append(drain_rate(args, 2))
    print(f"bulk enqueue:           {statistics.median(enq):>10,.0f} tasks/s  (runs: {[round(x) for x in enq]})")
    print(f"drain, 1 process:       {statistics.median(d1):>10,.0f} tasks/s  (runs: {[round(x) for x in d1]})")
    print(f"drain, 2 processes:     {statistics.median(d2):>10,.0f} tasks/s  (runs: {[round(x) for x in d2]})")

    runs = []
    for _ in range(args.repeat):
        reset(url)
        runs.append(steady_latency(args, 200, args.latency_seconds))
    p50, p95, p99 = (statistics.median(r[i] for r in runs) for i in range(3))
    print(f"enqueue->start latency at 200 tasks/s: p50 {p50:.2f} ms, p95 {p95:.2f} ms, p99 {p99:.2f} ms")
    print(f"  (p99 of each run: {[round(r[2], 2) for r in runs]})")


if __name__ == "__main__":
    main()
