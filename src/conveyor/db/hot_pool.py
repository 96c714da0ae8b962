"""Raw psycopg connections for the worker's hot statements (claim, renew, finish, rescue).

Each of those is one self-contained statement, so the connections run in autocommit: no BEGIN/COMMIT
round trips, no transaction left open. They bypass SQLAlchemy on purpose: its asyncio bridge (a
greenlet switch per call) and row processing cost more per task than the statements themselves.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from typing import Any

import psycopg
from psycopg_pool import AsyncConnectionPool, PoolTimeout

from conveyor.db.errors import translate_errors
from conveyor.db.executors import Row, execute_async
from conveyor.db.urls import libpq_conninfo
from conveyor.errors import DatabaseError


async def _configure(conn: psycopg.AsyncConnection[Any]) -> None:
    await conn.set_autocommit(True)


class HotPool:
    def __init__(self, database_url: str, *, max_size: int = 8, application_name: str = "conveyor") -> None:
        self._pool: AsyncConnectionPool[psycopg.AsyncConnection[Any]] = AsyncConnectionPool(
            libpq_conninfo(database_url),
            min_size=1,
            max_size=max(2, max_size),
            open=False,
            configure=_configure,
            kwargs={"application_name": application_name, "connect_timeout": 10},
            timeout=30,
        )
        self._opened = False
        self._lock = asyncio.Lock()

    @asynccontextmanager
    async def connection(self) -> AsyncIterator[psycopg.AsyncConnection[Any]]:
        if not self._opened:
            async with self._lock:
                if not self._opened:
                    # wait=False: a database that is down right now must not stop the worker starting;
                    # the statements fail (and are retried by their loops) until it is back.
                    await self._pool.open(wait=False)
                    self._opened = True
        try:
            async with self._pool.connection() as conn:
                yield conn
        except PoolTimeout as exc:
            raise DatabaseError(f"no database connection available: {exc}") from exc

    async def fetch(self, sql: str, params: Mapping[str, Any]) -> list[Row]:
        with translate_errors():
            async with self.connection() as conn:
                return await execute_async(conn, sql, params)

    async def close(self) -> None:
        if self._opened:
            await self._pool.close()
            self._opened = False
