"""Engines and raw connections, built from a database URL once per process."""

from __future__ import annotations

import psycopg
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from conveyor.db.urls import libpq_conninfo, sqlalchemy_url


def create_engine(database_url: str, *, pool_size: int = 10, application_name: str = "conveyor") -> AsyncEngine:
    """An async engine on psycopg 3. ``pool_pre_ping`` makes a connection killed by the server (a
    restart, ``pg_terminate_backend``, a failover) cost one retry instead of an error."""
    return create_async_engine(
        sqlalchemy_url(database_url),
        pool_size=pool_size,
        max_overflow=pool_size,
        pool_pre_ping=True,
        pool_recycle=1800,
        connect_args={"application_name": application_name, "connect_timeout": 10},
    )


async def connect_raw(database_url: str, *, application_name: str = "conveyor") -> psycopg.AsyncConnection[object]:
    """A raw autocommit connection, for LISTEN (SQLAlchemy's pool would hand it to someone else)."""
    return await psycopg.AsyncConnection.connect(
        libpq_conninfo(database_url), autocommit=True, application_name=application_name, connect_timeout=10
    )
