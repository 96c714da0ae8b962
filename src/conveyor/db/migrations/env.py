"""Alembic environment: runs on the connection ``conveyor.db.migrate`` hands over, or its own."""

from __future__ import annotations

from alembic import context
from sqlalchemy import Connection, create_engine

from conveyor.db.migrate import VERSION_TABLE
from conveyor.db.models import metadata


def _run(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=metadata,
        version_table=VERSION_TABLE,
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    connection = context.config.attributes.get("connection")
    if connection is not None:
        _run(connection)
        return
    url = context.config.get_main_option("sqlalchemy.url")
    assert url is not None
    engine = create_engine(url)
    try:
        with engine.begin() as own_connection:
            _run(own_connection)
    finally:
        engine.dispose()


if context.is_offline_mode():
    raise SystemExit("Conveyor migrations run online only: use `conveyor db upgrade`")
run_migrations_online()
