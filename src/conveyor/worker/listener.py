"""LISTEN for wake-ups, and come back by itself whenever the connection dies.

A dropped LISTEN connection that is never re-established silently degrades a queue to slow polling
(bullmq#4729, graphile/worker#541). So the listener owns its reconnect loop, verifies its connection
between waits, and after every reconnect wakes the worker once, since notifications sent while it was
away are lost.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Collection

import psycopg

from conveyor.db.engine import connect_raw
from conveyor.db.task_sql import WAKEUP_CHANNEL

log = logging.getLogger("conveyor.worker.listener")


class Listener:
    def __init__(
        self,
        database_url: str,
        queues: Collection[str],
        on_wakeup: Callable[[], None],
        *,
        check_interval_s: float = 5.0,
        max_backoff_s: float = 5.0,
    ) -> None:
        self.database_url = database_url
        self.queues = frozenset(queues)
        self.on_wakeup = on_wakeup
        self.check_interval_s = check_interval_s
        self.max_backoff_s = max_backoff_s
        self.connected = asyncio.Event()
        self.reconnects = 0
        self.backend_pid: int | None = None

    async def run(self) -> None:
        backoff = 0.05
        while True:
            try:
                conn = await connect_raw(self.database_url, application_name="conveyor-listener")
            except (psycopg.Error, OSError) as exc:
                log.warning("listener cannot connect (%s); retrying in %.2f s", type(exc).__name__, backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, self.max_backoff_s)
                continue
            try:
                await conn.execute(f"LISTEN {WAKEUP_CHANNEL}")
                self.backend_pid = conn.info.backend_pid
                self.connected.set()
                backoff = 0.05
                # Whatever was notified while we were away is lost: look for work once now.
                self.on_wakeup()
                await self._listen(conn)
            except (psycopg.Error, OSError) as exc:
                self.connected.clear()
                self.reconnects += 1
                log.warning("listener connection lost (%s: %s); reconnecting", type(exc).__name__, exc)
            finally:
                self.connected.clear()
                await _close_quietly(conn)

    async def _listen(self, conn: psycopg.AsyncConnection[object]) -> None:
        while True:
            async for notify in conn.notifies(timeout=self.check_interval_s):
                if notify.payload in self.queues:
                    self.on_wakeup()
            # A silent network drop raises nothing while we wait; a query between waits notices it.
            await conn.execute("SELECT 1")


async def _close_quietly(conn: psycopg.AsyncConnection[object]) -> None:
    with contextlib.suppress(psycopg.Error, OSError):
        await conn.close()
