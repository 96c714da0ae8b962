"""What readiness probes ask of the database: is it there, and which schema revision does it have."""

from __future__ import annotations

from sqlalchemy import text
from sqlalchemy.exc import ProgrammingError
from sqlalchemy.ext.asyncio import AsyncEngine

from conveyor.db.errors import translate_errors
from conveyor.db.migrate import VERSION_TABLE


async def schema_revision(engine: AsyncEngine) -> str | None:
    """The migration revision the database is at; ``None`` for a database Conveyor never migrated.

    Raises :class:`~conveyor.errors.DatabaseError` when the database cannot be reached."""
    with translate_errors():
        async with engine.connect() as conn:
            try:
                row = (await conn.execute(text(f"SELECT version_num FROM {VERSION_TABLE}"))).first()
            except ProgrammingError:  # no version table: never migrated
                return None
    return None if row is None else str(row[0])
