"""Rows for the operations tests, written straight into the database: any state, any time, any error,
without running a worker (time travel by back-dating rows)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import psycopg

_COLUMNS = (
    "name",
    "queue",
    "state",
    "priority",
    "args",
    "kwargs",
    "metadata",
    "attempt",
    "max_attempts",
    "worker_id",
    "last_error",
    "unique_key",
    "lease_token",
    "lease_expires_at",
    "run_at",
    "created_at",
    "started_at",
    "finished_at",
)
_JSON = {"args", "kwargs", "metadata", "last_error"}
# Times are SQL expressions relative to the database clock, e.g. "now() - interval '2 hours'".
_TIMES = {"lease_expires_at", "run_at", "created_at", "started_at", "finished_at"}


def task(**values: Any) -> dict[str, Any]:
    """A task row with sensible defaults: a finished, succeeded 'add' task on 'default'."""
    row: dict[str, Any] = {
        "name": "add",
        "queue": "default",
        "state": "succeeded",
        "priority": 0,
        "args": [],
        "kwargs": {},
        "metadata": {},
        "attempt": 1,
        "max_attempts": 3,
        "worker_id": None,
        "last_error": None,
        "unique_key": None,
        "lease_token": None,
        "lease_expires_at": None,
        "run_at": "now() - interval '1 minute'",
        "created_at": "now() - interval '1 minute'",
        "started_at": "now() - interval '50 seconds'",
        "finished_at": "now() - interval '40 seconds'",
    }
    row.update(values)
    if row["state"] in ("queued", "scheduled", "blocked"):
        if "finished_at" not in values:
            row["finished_at"] = None
        if "started_at" not in values:
            row["started_at"] = None
    if row["state"] == "running":
        if "finished_at" not in values:
            row["finished_at"] = None
        if row["lease_token"] is None:
            row["lease_token"] = "00000000-0000-4000-8000-000000000001"
        if row["lease_expires_at"] is None:
            row["lease_expires_at"] = "now() + interval '1 hour'"
    return row


def error(kind: str = "ValueError", message: str = "bad input") -> dict[str, Any]:
    return {"type": kind, "message": message, "traceback": "Traceback (most recent call last):\n  ..."}


def insert(database_url: str, rows: Sequence[dict[str, Any]]) -> list[int]:
    """Insert task rows (see :func:`task`); their ids, in order."""
    ids = []
    with psycopg.connect(database_url, autocommit=True) as conn:
        for row in rows:
            values = []
            params: list[Any] = []
            for column in _COLUMNS:
                value = row[column]
                if column in _TIMES and value is not None:
                    values.append(value)  # a trusted SQL expression written by the test itself
                elif column in _JSON and value is not None:
                    values.append("%s::jsonb")
                    params.append(json.dumps(value))
                else:
                    values.append("%s")
                    params.append(value)
            sql = f"INSERT INTO conveyor_tasks ({', '.join(_COLUMNS)}) VALUES ({', '.join(values)}) RETURNING id"
            found = conn.execute(sql.encode(), params).fetchone()  # type: ignore[call-overload]
            assert found is not None
            ids.append(int(found[0]))
    return ids


def execute(database_url: str, sql: str, params: Sequence[Any] | dict[str, Any] = ()) -> list[tuple[Any, ...]]:
    with psycopg.connect(database_url, autocommit=True) as conn:
        cursor = conn.execute(sql.encode(), params or None)  # type: ignore[call-overload]
        return list(cursor.fetchall()) if cursor.description else []
