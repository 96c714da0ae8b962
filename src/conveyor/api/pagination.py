"""Opaque cursors for keyset pagination: the sort and the last row's ``(value, id)``, base64url JSON.

A cursor only ever becomes bound parameters, and is checked strictly on the way in: a cursor made for
another sort, or altered, is a 422 naming ``cursor``, never a database error.
"""

from __future__ import annotations

import base64
import binascii
import json
from datetime import datetime
from typing import Any, Literal, get_args

from conveyor.api.errors import invalid_field
from conveyor.api.schemas import INT64_MAX
from conveyor.db.task_queries import Keyset, Sort

SortParam = Literal["-id", "id", "-finished_at", "finished_at", "run_at", "-run_at"]
SORTS: tuple[str, ...] = get_args(SortParam)

_FIELD = "query.cursor"


def parse_sort(text: str) -> Sort:
    return Sort(text.lstrip("-"), descending=text.startswith("-"))


def encode_cursor(sort: str, key: Keyset) -> str:
    value: Any = key.value.isoformat() if isinstance(key.value, datetime) else key.value
    raw = json.dumps([sort, value, key.id], separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str, sort: str) -> Keyset:
    try:
        raw = base64.urlsafe_b64decode(cursor.encode("ascii") + b"=" * (-len(cursor) % 4))
        data = json.loads(raw)
    except (ValueError, UnicodeError, binascii.Error):
        raise invalid_field(_FIELD, "is not a cursor this API returned") from None
    if not (isinstance(data, list) and len(data) == 3):
        raise invalid_field(_FIELD, "is not a cursor this API returned")
    cursor_sort, value, task_id = data
    if cursor_sort != sort:
        raise invalid_field(_FIELD, f"was made for sort={cursor_sort!r}; pass the same sort with it")
    if not _whole(task_id, 1, INT64_MAX):
        raise invalid_field(_FIELD, "is not a cursor this API returned")
    field = sort.lstrip("-")
    if field == "id":
        return Keyset(int(task_id), int(task_id))
    if field in ("run_at", "finished_at") and isinstance(value, str):
        try:
            moment = datetime.fromisoformat(value)
        except ValueError:
            moment = None
        if moment is not None and moment.tzinfo is not None:
            return Keyset(moment, int(task_id))
    raise invalid_field(_FIELD, "is not a cursor this API returned")


def _whole(value: Any, low: int, high: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and low <= value <= high
