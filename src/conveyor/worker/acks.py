"""Outcomes are written in batches: one statement acknowledges many attempts.

Writing each outcome on its own costs a round trip and a commit per task; under load the buffer fills
within a couple of milliseconds and one FINISH statement records them all. A crash before a flush
loses nothing: those leases expire and the tasks are rescued (at-least-once, as promised).
"""

from __future__ import annotations

import asyncio
import logging

from conveyor.core.records import Outcome
from conveyor.db.task_store import TaskStore
from conveyor.errors import DatabaseError

log = logging.getLogger("conveyor.worker.acks")


class AckBuffer:
    def __init__(self, store: TaskStore, *, max_batch: int = 200, linger_s: float = 0.002) -> None:
        self.store = store
        self.max_batch = max_batch
        self.linger_s = linger_s
        self._pending: list[tuple[Outcome, asyncio.Future[bool]]] = []
        self._wake = asyncio.Event()
        self.stale_rejected = 0

    def submit(self, outcome: Outcome) -> asyncio.Future[bool]:
        """Queue an outcome; the future resolves to whether the store accepted it (False: stale lease)."""
        future: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._pending.append((outcome, future))
        self._wake.set()
        return future

    async def run(self) -> None:
        while True:
            await self._wake.wait()
            if len(self._pending) < self.max_batch:
                await asyncio.sleep(self.linger_s)
            await self.flush()

    async def flush(self) -> None:
        while self._pending:
            batch, self._pending = self._pending[: self.max_batch], self._pending[self.max_batch :]
            if not self._pending:
                self._wake.clear()
            await self._write(batch)
        self._wake.clear()

    async def _write(self, batch: list[tuple[Outcome, asyncio.Future[bool]]]) -> None:
        backoff = 0.05
        while True:
            try:
                accepted = await self.store.finish([outcome for outcome, _ in batch])
                break
            except DatabaseError as exc:
                # Keep the outcomes: the database may be back before the leases run out.
                log.warning("could not record %d outcomes (%s); retrying in %.2f s", len(batch), exc, backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 2.0)
        for outcome, future in batch:
            ok = outcome.task_id in accepted
            if not ok:
                self.stale_rejected += 1
                log.warning(
                    "outcome for task %s rejected: its lease is no longer ours (stale attempt)", outcome.task_id
                )
            if not future.done():
                future.set_result(ok)
