"""The recovery engine: one pass puts right what crashed processes left behind.

A pass, in order:

1. **rescue** tasks whose lease expired (``TaskStore.rescue``: requeued, or dead after too many lost
   workers, or cancelled if that was asked), judged on the database clock only;
2. **promote** scheduled tasks whose run time has come to queued (``TaskStore.promote_due``);
3. **mark stopped** the workers whose last heartbeat is older than ``silent_factor`` times the lease
   timeout and that never said they stopped, so the registry tells the truth (their tasks were
   already rescued by step 1, through their leases; a worker that was merely slow marks itself
   running again with its next heartbeat).

Every worker runs steps 1 and 2 on its own schedule; a pass here is the same work on demand (the API's
``POST /resilience/recovery/run``) plus step 3. Each step is safe to run concurrently with workers doing
the same. A step that fails is reported and the pass goes on with the next one.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol

from conveyor.core.records import RescueReport
from conveyor.db.admin_store import SilentWorker
from conveyor.errors import DatabaseError

__all__ = ["RecoveryEngine", "RecoveryReport"]

#: Ids listed per kind in a report (the counts are always complete).
REPORT_IDS = 100


class _Tasks(Protocol):
    async def rescue(self, max_worker_losses: int, batch: int = 500) -> RescueReport: ...

    async def promote_due(self, batch: int = 1000) -> int: ...


class _Workers(Protocol):
    async def mark_silent_workers_stopped(self, silent_s: float) -> list[SilentWorker]: ...


@dataclass(frozen=True)
class RecoveryReport:
    started_at: datetime  # wall clock, for people
    duration_s: float
    requeued: int
    dead: int
    cancelled: int
    promoted: int
    workers_stopped: int
    requeued_ids: list[int] = field(default_factory=list)  # at most REPORT_IDS of each
    dead_ids: list[int] = field(default_factory=list)
    cancelled_ids: list[int] = field(default_factory=list)
    stopped_workers: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)  # "step: error" for each step that failed

    @property
    def ok(self) -> bool:
        return not self.errors


class RecoveryEngine:
    """Runs recovery passes and remembers the last report (one engine per process)."""

    def __init__(self, *, max_worker_losses: int, lease_timeout_s: float, silent_factor: float = 3.0) -> None:
        if silent_factor < 1:
            raise ValueError("silent_factor must be at least 1 (a worker is silent after its lease timeout)")
        self.max_worker_losses = max_worker_losses
        self.lease_timeout_s = lease_timeout_s
        self.silent_factor = silent_factor
        self.last_report: RecoveryReport | None = None

    @property
    def silent_after_s(self) -> float:
        return self.lease_timeout_s * self.silent_factor

    async def run_once(self, tasks: _Tasks, workers: _Workers) -> RecoveryReport:
        started_at = datetime.now(UTC)
        started = time.monotonic()
        errors: list[str] = []

        async def step(name: str, action: Callable[[], Awaitable[Any]], empty: Any) -> Any:
            try:
                return await action()
            except DatabaseError as exc:
                errors.append(f"{name}: {exc}")
                return empty

        rescued: RescueReport = await step("rescue", lambda: tasks.rescue(self.max_worker_losses), RescueReport())
        promoted: int = await step("promote", tasks.promote_due, 0)
        stopped: list[SilentWorker] = await step(
            "workers", lambda: workers.mark_silent_workers_stopped(self.silent_after_s), []
        )
        report = RecoveryReport(
            started_at=started_at,
            duration_s=time.monotonic() - started,
            requeued=len(rescued.requeued),
            dead=len(rescued.dead),
            cancelled=len(rescued.cancelled),
            promoted=promoted,
            workers_stopped=len(stopped),
            requeued_ids=sorted(rescued.requeued)[:REPORT_IDS],
            dead_ids=sorted(rescued.dead)[:REPORT_IDS],
            cancelled_ids=sorted(rescued.cancelled)[:REPORT_IDS],
            stopped_workers=sorted(w.id for w in stopped)[:REPORT_IDS],
            errors=errors,
        )
        self.last_report = report
        return report
