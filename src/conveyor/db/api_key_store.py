"""API keys: stored as sha256 hashes only, with their scopes; revoked keys are kept for the record."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import func, select, text, update
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from conveyor.db.errors import translate_errors
from conveyor.db.models_auth import SCOPES, api_keys

# Any constant works; it serialises "make the first admin key" between processes starting together.
_FIRST_ADMIN_LOCK_KEY = 0x636B6579  # "ckey"


@dataclass(frozen=True)
class ApiKeyRecord:
    id: int
    name: str
    prefix: str
    scopes: tuple[str, ...]
    created_at: datetime
    last_used_at: datetime | None
    revoked_at: datetime | None

    @property
    def active(self) -> bool:
        return self.revoked_at is None


class ApiKeyStore:
    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine

    async def create(self, *, name: str, prefix: str, key_hash: str, scopes: Sequence[str]) -> ApiKeyRecord:
        _check_scopes(scopes)
        with translate_errors():
            async with self.engine.begin() as conn:
                return await _insert(conn, name, prefix, key_hash, scopes)

    async def create_first_admin(self, *, name: str, prefix: str, key_hash: str) -> ApiKeyRecord | None:
        """Create an admin key if no active one exists (``None`` otherwise), safely among processes
        starting at the same time: only one of them makes it."""
        with translate_errors():
            async with self.engine.begin() as conn:
                await conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _FIRST_ADMIN_LOCK_KEY})
                if await _has_active_admin(conn):
                    return None
                return await _insert(conn, name, prefix, key_hash, ["admin"])

    async def has_active_admin(self) -> bool:
        with translate_errors():
            async with self.engine.connect() as conn:
                return await _has_active_admin(conn)

    async def list(self) -> list[ApiKeyRecord]:
        with translate_errors():
            async with self.engine.connect() as conn:
                rows = (await conn.execute(select(api_keys).order_by(api_keys.c.id))).mappings().all()
        return [_record(row) for row in rows]

    async def find_active(self, key_hash: str) -> ApiKeyRecord | None:
        query = select(api_keys).where(api_keys.c.key_hash == key_hash, api_keys.c.revoked_at.is_(None))
        with translate_errors():
            async with self.engine.connect() as conn:
                row = (await conn.execute(query)).mappings().first()
        return None if row is None else _record(row)

    async def revoke(self, key_id: int) -> ApiKeyRecord | None:
        """Revoke a key (revoking it again changes nothing); ``None`` if there is no such key."""
        with translate_errors():
            async with self.engine.begin() as conn:
                await conn.execute(
                    update(api_keys)
                    .where(api_keys.c.id == key_id, api_keys.c.revoked_at.is_(None))
                    .values(revoked_at=func.now())
                )
                row = (await conn.execute(select(api_keys).where(api_keys.c.id == key_id))).mappings().first()
        return None if row is None else _record(row)

    async def touch(self, key_id: int) -> None:
        """Record that the key was used just now."""
        with translate_errors():
            async with self.engine.begin() as conn:
                await conn.execute(update(api_keys).where(api_keys.c.id == key_id).values(last_used_at=func.now()))


def _check_scopes(scopes: Sequence[str]) -> None:
    unknown = sorted(set(scopes) - set(SCOPES))
    if not scopes or unknown:
        raise ValueError(f"scopes must be one or more of {', '.join(SCOPES)}; unknown: {', '.join(unknown)}")


async def _insert(conn: AsyncConnection, name: str, prefix: str, key_hash: str, scopes: Sequence[str]) -> ApiKeyRecord:
    row = (
        (
            await conn.execute(
                api_keys.insert()
                .values(name=name, prefix=prefix, key_hash=key_hash, scopes=sorted(set(scopes)))
                .returning(*api_keys.c)
            )
        )
        .mappings()
        .one()
    )
    return _record(row)


async def _has_active_admin(conn: AsyncConnection) -> bool:
    query = select(api_keys.c.id).where(api_keys.c.scopes.any("admin"), api_keys.c.revoked_at.is_(None)).limit(1)
    return (await conn.execute(query)).first() is not None


def _record(row: Any) -> ApiKeyRecord:
    return ApiKeyRecord(
        id=int(row["id"]),
        name=row["name"],
        prefix=row["prefix"],
        scopes=tuple(row["scopes"]),
        created_at=row["created_at"],
        last_used_at=row["last_used_at"],
        revoked_at=row["revoked_at"],
    )
