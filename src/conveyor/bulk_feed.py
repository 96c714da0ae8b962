"""The hand-off between a bulk enqueue's two threads: the caller's, which validates and formats batches,
and the event loop's, which writes them to the database while the next one is being built."""

from __future__ import annotations

import asyncio
import collections
from concurrent.futures import Future
from typing import Any

from conveyor.db.task_store import PreparedBatch, WrittenBatch

#: Marker on the feed: the caller hit an invalid item, so the writer rolls back everything.
ABORT = PreparedBatch([], [], [])


class BulkAborted(Exception):
    """The caller of a bulk enqueue hit an invalid item: roll back what was written."""


class BatchFeed:
    """A short queue of prepared batches, filled from a plain thread and drained on the event loop.

    The caller blocks on a future while the loop accepts each batch, so it lets go of the GIL at every
    hand-off. (A ``queue.Queue`` read through ``asyncio.to_thread`` woke two threads per batch, each
    waiting out the 5 ms GIL switch interval against the busy caller: about a third of the writer's
    time went to those waits.)"""

    def __init__(self, loop: asyncio.AbstractEventLoop, depth: int = 2) -> None:
        self._loop = loop
        # Bound to the loop on first use (Python >= 3.10), which happens on the loop's thread.
        self._queue: asyncio.Queue[PreparedBatch | None] = asyncio.Queue(maxsize=depth)
        self._written: collections.deque[WrittenBatch] = collections.deque()  # appends and pops are atomic

    def put(self, batch: PreparedBatch | None, writer: Future[Any]) -> None:
        """Hand a batch (``None``: the end) to the writer; if the writer died (the database refused),
        raise its error instead of waiting forever on a full queue."""
        accepted = asyncio.run_coroutine_threadsafe(self._queue.put(batch), self._loop)
        while True:
            try:
                accepted.result(timeout=0.1)
                return
            except TimeoutError:
                if writer.done():
                    accepted.cancel()
                    writer.result()
                    raise RuntimeError("bulk enqueue writer stopped early") from None

    async def get(self) -> PreparedBatch | None:
        """The next batch, ``None`` at the end; raises :class:`BulkAborted` on the abort marker."""
        batch = await self._queue.get()
        if batch is ABORT:
            raise BulkAborted
        return batch

    def written(self, batch: WrittenBatch) -> None:
        """Record a batch the writer has written (called on the loop's thread)."""
        self._written.append(batch)

    def take_written(self) -> list[WrittenBatch]:
        """The batches written since the last call, in order (called on the caller's thread)."""
        taken: list[WrittenBatch] = []
        while self._written:
            taken.append(self._written.popleft())
        return taken
