"""Run one SQL text on whatever connection the caller has: ours, or theirs (transactional enqueue).

Statements are written once in the driver's parameter style (see ``task_sql``); a *plan* is a
generator that yields ``(sql, params)`` and receives the rows, so multi-step logic such as enqueue's
conflict resolution is written once and driven either synchronously or asynchronously.
"""

from __future__ import annotations

from collections.abc import Generator, Mapping
from typing import Any, TypeVar

import psycopg
from psycopg.rows import dict_row
from sqlalchemy import Connection
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession
from sqlalchemy.orm import Session

from conveyor.db.errors import translate_errors

Row = dict[str, Any]
Statement = tuple[str, Mapping[str, Any]]
T = TypeVar("T")
Plan = Generator[Statement, list[Row], T]

SyncConnectionLike = Connection | Session | psycopg.Connection[Any]
AsyncConnectionLike = AsyncConnection | AsyncSession | psycopg.AsyncConnection[Any]


def execute_sync(conn: SyncConnectionLike, sql: str, params: Mapping[str, Any]) -> list[Row]:
    with translate_errors():
        if isinstance(conn, psycopg.Connection):
            with conn.cursor(row_factory=dict_row) as cursor:
                cursor.execute(sql, params)
                return cursor.fetchall() if cursor.description else []
        connection = conn.connection() if isinstance(conn, Session) else conn
        result = connection.exec_driver_sql(sql, dict(params))
        return [dict(row) for row in result.mappings()] if result.returns_rows else []


async def execute_async(conn: AsyncConnectionLike, sql: str, params: Mapping[str, Any]) -> list[Row]:
    with translate_errors():
        if isinstance(conn, psycopg.AsyncConnection):
            async with conn.cursor(row_factory=dict_row) as cursor:
                await cursor.execute(sql, params)
                return await cursor.fetchall() if cursor.description else []
        connection = await conn.connection() if isinstance(conn, AsyncSession) else conn
        result = await connection.exec_driver_sql(sql, dict(params))
        return [dict(row) for row in result.mappings()] if result.returns_rows else []


def drive_sync(plan: Plan[T], conn: SyncConnectionLike) -> T:
    try:
        statement = next(plan)
        while True:
            statement = plan.send(execute_sync(conn, *statement))
    except StopIteration as done:
        return done.value  # type: ignore[no-any-return]


async def drive_async(plan: Plan[T], conn: AsyncConnectionLike) -> T:
    try:
        statement = next(plan)
        while True:
            statement = plan.send(await execute_async(conn, *statement))
    except StopIteration as done:
        return done.value  # type: ignore[no-any-return]
