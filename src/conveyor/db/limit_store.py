"""Running the limited-queue claim (:mod:`conveyor.db.limit_sql`) on the worker's hot pool."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from psycopg.rows import dict_row

from conveyor.core.queue_limits import LimitedClaim, QueueGate, QueueLimits
from conveyor.core.records import ClaimedTask
from conveyor.db import limit_sql
from conveyor.db.errors import translate_errors
from conveyor.db.executors import Row
from conveyor.db.hot_pool import HotPool


async def claim_limited(
    hot: HotPool, worker_id: str, queues: Sequence[str], limit: int, lease_s: float
) -> LimitedClaim:
    """Claim up to ``limit`` tasks from ``queues`` (all with limits), within their limits."""
    params = {"queues": list(queues), "limit": limit, "lease_s": lease_s, "worker_id": worker_id}
    # Pipelined: BEGIN, the lock, the claim and COMMIT go out together and cost one round trip plus
    # the wait for the lock. The claim still runs only once the lock is granted, on its own snapshot:
    # the server executes a connection's statements one after the other.
    with translate_errors():
        async with hot.connection() as conn, conn.pipeline(), conn.cursor(row_factory=dict_row) as cursor:
            async with conn.transaction():
                await conn.execute(limit_sql.LOCK_QUEUES, params)
                await cursor.execute(limit_sql.CLAIM_LIMITED, params)
            rows = await cursor.fetchall()
    return LimitedClaim(tasks=[claimed_task(r) for r in rows if r["id"] is not None], gates=_gates(rows))


async def queue_limits(hot: HotPool, queues: Sequence[str]) -> dict[str, QueueLimits]:
    """The limits of those of ``queues`` that have any."""
    rows = await hot.fetch(limit_sql.QUEUE_LIMITS, {"queues": list(queues)})
    return {r["name"]: QueueLimits(r["concurrency_limit"], r["rate_limit_per_s"]) for r in rows}


def _gates(rows: list[Row]) -> list[QueueGate]:
    seen: dict[str, QueueGate] = {}
    for r in rows:
        if r["gate"] not in seen:
            seen[r["gate"]] = QueueGate(
                queue=r["gate"],
                limits=QueueLimits(r["concurrency_limit"], r["rate_limit_per_s"]),
                paused=r["paused"],
                at_concurrency_limit=r["at_concurrency_limit"],
                next_token_in_s=None if r["next_token_in_s"] is None else float(r["next_token_in_s"]),
                waiting=r["waiting"],
            )
    return list(seen.values())


def claimed_task(r: dict[str, Any]) -> ClaimedTask:
    """A row of a claim statement (plain or limited: they return the same columns)."""
    return ClaimedTask(
        id=int(r["id"]),
        name=r["name"],
        queue=r["queue"],
        priority=r["priority"],
        args=r["args"],
        kwargs=r["kwargs"],
        metadata=r["metadata"],
        attempt=r["attempt"],
        max_attempts=r["max_attempts"],
        lease_token=r["lease_token"],
        timeout_s=r["timeout_s"],
        worker_losses=r["worker_losses"],
    )
