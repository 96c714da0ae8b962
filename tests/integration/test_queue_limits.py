"""Queue limits against a real PostgreSQL: the limited claim holds its bounds under concurrent
claimers, its plan stays on the indexes, and the worker routes and paces its claims by them.

Overlaps and rates are computed from what the database recorded (``started_at``, ``finished_at``),
never from timing the test itself."""

from __future__ import annotations

import asyncio
import json
import random
import uuid
from collections.abc import AsyncIterator, Iterable, Sequence
from contextlib import asynccontextmanager
from datetime import datetime
from typing import Any

import psycopg
import pytest

from conveyor.app import App
from conveyor.core.queue_limits import LimitedClaim
from conveyor.core.records import Outcome
from conveyor.core.states import TaskState
from conveyor.db import limit_sql
from conveyor.db.queue_store import QueueStore
from conveyor.db.task_store import TaskStore
from conveyor.errors import DatabaseError
from conveyor.worker.worker import Worker
from tests.integration.test_worker import running, wait_for

LIMITED = "limited"


async def set_limits(app: App, queue: str, **limits: Any) -> None:
    await QueueStore(app.runtime().engine).set_limits(queue, **limits)


def intervals(database_url: str, queue: str) -> list[tuple[datetime, datetime]]:
    with psycopg.connect(database_url, autocommit=True) as conn:
        rows = conn.execute(
            "SELECT started_at, finished_at FROM conveyor_tasks WHERE queue = %s AND state = 'succeeded'", (queue,)
        ).fetchall()
    return [(r[0], r[1]) for r in rows]


def starts(database_url: str, queue: str) -> list[float]:
    with psycopg.connect(database_url, autocommit=True) as conn:
        rows = conn.execute(
            "SELECT EXTRACT(EPOCH FROM started_at)::float8 FROM conveyor_tasks WHERE queue = %s ORDER BY started_at",
            (queue,),
        ).fetchall()
    return [float(r[0]) for r in rows]


def max_overlap(spans: Iterable[tuple[datetime, datetime]]) -> int:
    """Most tasks running at one instant. At equal times a finish counts before a start: the finish
    was committed before the claim that reused its slot."""
    events = sorted([(start, 1) for start, _ in spans] + [(finish, -1) for _, finish in spans])
    running = peak = 0
    for _, step in events:
        running += step
        peak = max(peak, running)
    return peak


def most_starts_allowed(times: Sequence[float], burst: float, rate_per_s: float) -> float:
    """The largest (starts in a window) - (burst + rate x window length) over every window that
    begins and ends at a start: at most 0 when the token bucket held."""
    worst = -burst
    for i, first in enumerate(times):
        for j in range(i, len(times)):
            worst = max(worst, (j - i + 1) - (burst + rate_per_s * (times[j] - first)))
    return worst


@asynccontextmanager
async def finishing(store: TaskStore) -> AsyncIterator[list[asyncio.Task[None]]]:
    pending: list[asyncio.Task[None]] = []
    try:
        yield pending
    finally:
        await asyncio.gather(*pending)


async def finish_later(store: TaskStore, claim: LimitedClaim, hold_s: float) -> None:
    await asyncio.sleep(hold_s)
    await store.finish([Outcome(t.id, t.lease_token, TaskState.SUCCEEDED, "null") for t in claim.tasks])


async def enqueue_limited(app: App, count: int) -> None:
    await app.enqueue_many_async([{"name": "limited_noop", "queue": LIMITED} for _ in range(count)])


@pytest.fixture
async def lapp(aapp: App) -> App:
    @aapp.task(name="limited_noop", queue=LIMITED)
    def limited_noop() -> None:
        return None

    return aapp


async def test_claim_limited__concurrent_claimers_never_run_more_than_the_concurrency_limit(
    lapp: App, database_url: str
) -> None:
    await set_limits(lapp, LIMITED, concurrency_limit=3)
    await enqueue_limited(lapp, 120)
    store = lapp.store()

    async def claimer(pending: list[asyncio.Task[None]]) -> None:
        worker_id = str(uuid.uuid4())
        while True:
            claim = await store.claim_limited(worker_id, [LIMITED], 5, 30.0)
            if claim.tasks:
                pending.append(asyncio.create_task(finish_later(store, claim, random.uniform(0, 0.01))))
            elif not claim.gates[0].waiting:
                return
            await asyncio.sleep(random.uniform(0, 0.003))

    async with finishing(store) as pending:
        await asyncio.gather(*(claimer(pending) for _ in range(8)))

    spans = intervals(database_url, LIMITED)
    assert len(spans) == 120
    assert max_overlap(spans) == 3


async def test_claim_limited__concurrent_claimers_start_tasks_within_the_token_bucket(
    lapp: App, database_url: str
) -> None:
    rate = 40.0
    await set_limits(lapp, LIMITED, rate_limit_per_s=rate)
    await enqueue_limited(lapp, 100)
    store = lapp.store()

    async def claimer(pending: list[asyncio.Task[None]]) -> None:
        worker_id = str(uuid.uuid4())
        while True:
            claim = await store.claim_limited(worker_id, [LIMITED], 10, 30.0)
            pending.append(asyncio.create_task(finish_later(store, claim, 0)))
            gate = claim.gates[0]
            if not gate.waiting:
                return
            await asyncio.sleep(gate.next_token_in_s or 0)

    async with finishing(store) as pending:
        await asyncio.gather(*(claimer(pending) for _ in range(6)))

    times = starts(database_url, LIMITED)
    assert len(times) == 100
    burst = max(1.0, rate)
    assert most_starts_allowed(times, burst, rate) <= 1e-6
    # Not far below the bound either: after the first burst, about `rate` starts per second.
    assert (len(times) - burst) / (times[-1] - times[0]) >= rate / 2


async def test_claim_limited__claimers_of_several_limited_queues_in_any_order_do_not_deadlock(
    lapp: App, database_url: str
) -> None:
    await set_limits(lapp, LIMITED, concurrency_limit=2)
    await set_limits(lapp, "Also-limited", concurrency_limit=2)  # sorts before LIMITED by code point only
    await lapp.enqueue_many_async(
        [{"name": "limited_noop", "queue": queue} for queue in (LIMITED, "Also-limited") for _ in range(40)]
    )
    store = lapp.store()

    async def claimer(queues: list[str], pending: list[asyncio.Task[None]]) -> None:
        worker_id = str(uuid.uuid4())
        while True:
            claim = await store.claim_limited(worker_id, queues, 4, 30.0)
            if claim.tasks:
                pending.append(asyncio.create_task(finish_later(store, claim, 0.002)))
            elif not any(g.waiting for g in claim.gates):
                return
            await asyncio.sleep(0.001)

    orders = [[LIMITED, "Also-limited"], ["Also-limited", LIMITED]] * 3
    async with finishing(store) as pending:
        await asyncio.wait_for(asyncio.gather(*(claimer(order, pending) for order in orders)), 60)

    with psycopg.connect(database_url, autocommit=True) as conn:
        left = conn.execute("SELECT count(*) FROM conveyor_tasks WHERE state <> 'succeeded'").fetchone()
    assert left == (0,)


async def test_claim_limited__reports_why_it_stopped(lapp: App) -> None:
    await set_limits(lapp, LIMITED, concurrency_limit=2, rate_limit_per_s=0.5)
    await enqueue_limited(lapp, 3)
    store = lapp.store()

    first = await store.claim_limited(str(uuid.uuid4()), [LIMITED, "default"], 10, 30.0)

    assert len(first.tasks) == 1  # the bucket holds max(1, 0.5) = 1 token
    (gate,) = first.gates  # "default" has no row: it is not limited, and not reported
    assert (gate.queue, gate.waiting, gate.at_concurrency_limit) == (LIMITED, True, False)
    assert gate.next_token_in_s is not None and 1.9 < gate.next_token_in_s <= 2.0
    assert (gate.limits.concurrency_limit, gate.limits.rate_limit_per_s) == (2, 0.5)

    await set_limits(lapp, LIMITED, rate_limit_per_s=None)
    second = await store.claim_limited(str(uuid.uuid4()), [LIMITED], 10, 30.0)

    assert len(second.tasks) == 1  # one running already, of two
    assert second.gates[0].at_concurrency_limit and second.gates[0].waiting
    assert second.gates[0].next_token_in_s is None


async def test_claim_limited__a_paused_queue_is_not_claimed(lapp: App) -> None:
    await set_limits(lapp, LIMITED, concurrency_limit=5)
    await QueueStore(lapp.runtime().engine).set_paused(LIMITED, True)
    await enqueue_limited(lapp, 2)

    claim = await lapp.store().claim_limited(str(uuid.uuid4()), [LIMITED], 10, 30.0)

    assert claim.tasks == []
    assert claim.gates[0].paused


async def test_claim_limited__reads_only_running_and_claimable_rows_whatever_the_plan(
    lapp: App, database_url: str
) -> None:
    # The planner may pick any suitable index (PostgreSQL versions differ: the running count has been
    # answered from ix_conveyor_tasks_state_queue here and from the partial ix_conveyor_tasks_lease in
    # CI), so the test bounds what the executed claim reads, not which index it names. The queue's
    # own 50,000 finished tasks are what a plan that walks the queue rather than its running or
    # claimable rows would read.
    await set_limits(lapp, LIMITED, concurrency_limit=5, rate_limit_per_s=100)
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO conveyor_tasks (name, queue, state, finished_at) "
            "SELECT 't', CASE WHEN i %% 2 = 0 THEN %s ELSE 'q' || (i %% 20) END, 'succeeded', now() "
            "FROM generate_series(1, 100000) i",
            (LIMITED,),
        )
        conn.execute(
            "INSERT INTO conveyor_tasks (name, queue, state) SELECT 't', %s, 'queued' FROM generate_series(1, 2000)",
            (LIMITED,),
        )
        conn.execute(
            "INSERT INTO conveyor_tasks (name, queue, state, lease_token, lease_expires_at, started_at) "
            "SELECT 't', %s, 'running', gen_random_uuid(), now() + interval '1 hour', now() "
            "FROM generate_series(1, 2)",
            (LIMITED,),
        )
        conn.execute("VACUUM ANALYZE conveyor_tasks")
    params = {"queues": [LIMITED], "limit": 10, "lease_s": 30.0, "worker_id": str(uuid.uuid4())}
    with psycopg.connect(database_url) as conn:
        conn.execute(limit_sql.LOCK_QUEUES, params)
        row = conn.execute("EXPLAIN (ANALYZE, FORMAT JSON) " + limit_sql.CLAIM_LIMITED, params).fetchone()
        conn.rollback()
    assert row is not None
    plan = row[0] if isinstance(row[0], list) else json.loads(row[0])
    scans = list(_scans(plan[0]["Plan"]))
    on_tasks = [s for s in scans if s.get("Relation Name") == "conveyor_tasks" or "Index Name" in s]
    assert on_tasks, scans
    assert all(s["Node Type"] != "Seq Scan" for s in on_tasks), on_tasks
    # 2 running rows counted, at most 10 claimable rows walked (plus the one that says more are
    # waiting): a handful per scan, never the queue's history.
    read = {s.get("Index Name", s["Node Type"]): _rows_read(s) for s in on_tasks}
    assert max(read.values()) <= 20, read


def _rows_read(scan: dict[str, Any]) -> int:
    """Rows a scan produced or threw away, over all its loops."""
    per_loop = scan.get("Actual Rows", 0) + scan.get("Rows Removed by Filter", 0)
    per_loop += scan.get("Rows Removed by Index Recheck", 0)
    return int(per_loop * scan.get("Actual Loops", 1))


def _scans(node: dict[str, Any]) -> Iterable[dict[str, Any]]:
    if "Scan" in node["Node Type"]:
        yield node
    for child in node.get("Plans", []):
        yield from _scans(child)


# -- the worker ------------------------------------------------------------------------------------


async def test_worker__queues_without_limits_never_take_the_limited_claim(
    lapp: App, monkeypatch: pytest.MonkeyPatch
) -> None:
    limited_calls: list[Sequence[str]] = []
    original = TaskStore.claim_limited

    async def spy(self: TaskStore, worker_id: str, queues: Sequence[str], limit: int, lease_s: float) -> LimitedClaim:
        limited_calls.append(queues)
        return await original(self, worker_id, queues, limit, lease_s)

    monkeypatch.setattr(TaskStore, "claim_limited", spy)
    await set_limits(lapp, LIMITED, concurrency_limit=1)  # a limit elsewhere changes nothing here
    handles = await lapp.enqueue_many_async([{"name": "limited_noop", "queue": "default"} for _ in range(50)])

    await Worker(lapp, queues=["default"], burst=True).run()

    assert {await h.status_async() for h in handles} == {"succeeded"}
    assert limited_calls == []


async def test_worker__limited_and_unlimited_queues_side_by_side(lapp: App, database_url: str) -> None:
    release = asyncio.Event()

    @lapp.task(name="held", queue=LIMITED)
    async def held() -> None:
        await release.wait()

    await set_limits(lapp, LIMITED, concurrency_limit=1)
    held_handles = await lapp.enqueue_many_async([{"name": "held"} for _ in range(4)])
    free_handles = await lapp.enqueue_many_async([{"name": "limited_noop", "queue": "default"} for _ in range(30)])
    worker = Worker(lapp, queues=[LIMITED, "default"], concurrency=10)
    async with running(worker):
        for handle in free_handles:
            await handle.result_async(timeout=20)
        assert sorted([await h.status_async() for h in held_handles]) == ["queued", "queued", "queued", "running"]
        release.set()
        for handle in held_handles:
            await handle.result_async(timeout=20)
    assert max_overlap(intervals(database_url, LIMITED)) == 1


async def test_worker__a_limit_set_while_it_runs_applies_within_the_refresh(lapp: App, database_url: str) -> None:
    release = asyncio.Event()

    @lapp.task(name="held", queue=LIMITED)
    async def held() -> None:
        await release.wait()

    worker = Worker(lapp, queues=[LIMITED], concurrency=10)
    async with running(worker):
        await wait_for(lambda: worker.gates.loaded)
        assert worker.gates.limited == {}
        await set_limits(lapp, LIMITED, concurrency_limit=2)
        await wait_for(lambda: LIMITED in worker.gates.limited, timeout_s=3)
        handles = await lapp.enqueue_many_async([{"name": "held"} for _ in range(5)])
        await wait_for(lambda: len(worker.executions) == 2)
        await asyncio.sleep(lapp.settings.worker.poll_interval_s * 3)  # give it every chance to overrun
        assert len(worker.executions) == 2
        release.set()
        for handle in handles:
            await handle.result_async(timeout=20)
        await set_limits(lapp, LIMITED, concurrency_limit=None)
        await wait_for(lambda: worker.gates.limited == {}, timeout_s=3)
    assert max_overlap(intervals(database_url, LIMITED)) == 2


async def test_worker__a_paused_limited_queue_is_not_claimed(lapp: App) -> None:
    queues = QueueStore(lapp.runtime().engine)
    await set_limits(lapp, LIMITED, rate_limit_per_s=100)
    await queues.set_paused(LIMITED, True)
    handle = await lapp.enqueue_async("limited_noop")
    worker = Worker(lapp, queues=[LIMITED])
    async with running(worker):
        await asyncio.sleep(lapp.settings.worker.poll_interval_s * 3)
        assert await handle.status_async() == "queued"
        assert not worker.gates.holding_back
        await queues.set_paused(LIMITED, False)
        await handle.result_async(timeout=10)


async def test_worker__burst_waits_for_tokens_instead_of_taking_the_queue_for_drained(
    lapp: App, database_url: str
) -> None:
    rate = 10.0
    await set_limits(lapp, LIMITED, rate_limit_per_s=rate)
    await enqueue_limited(lapp, 25)

    await Worker(lapp, queues=[LIMITED], concurrency=5, burst=True).run()

    times = starts(database_url, LIMITED)
    assert len(times) == 25
    assert most_starts_allowed(times, max(1.0, rate), rate) <= 1e-6


async def test_worker__limited_tasks_it_claimed_run_even_if_the_plain_claim_then_fails(
    lapp: App, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def unreachable(self: TaskStore, *args: object) -> list[object]:
        raise DatabaseError("database unreachable: the plain claim's connection broke")

    monkeypatch.setattr(TaskStore, "claim", unreachable)
    await set_limits(lapp, LIMITED, concurrency_limit=5)
    handle = await lapp.enqueue_async("limited_noop")

    async with running(Worker(lapp, queues=[LIMITED, "default"])):
        assert await handle.result_async(timeout=10) is None
    assert [e.kind for e in await handle.events_async()] == ["enqueued", "claimed", "succeeded"]
