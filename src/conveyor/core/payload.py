"""JSON payloads: the only thing Conveyor ever stores or sends as task data (never pickle)."""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping, Sequence
from typing import Any

from conveyor.errors import PayloadError

JSONValue = Any  # what json.loads can return; kept loose on purpose, JSON has no precise static type

# One encoder for the process: json.dumps builds a new one per call, which shows up in bulk enqueue.
_ENCODER = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, allow_nan=False)


# An escaped NUL (an odd number of backslashes before u0000): PostgreSQL's jsonb cannot hold it.
_JSON_NUL = re.compile(r"(?<!\\)(?:\\\\)*\\u0000")


def encode(value: JSONValue, *, what: str, limit_bytes: int) -> str:
    """Serialise ``value`` to compact JSON, refusing non-JSON values and anything over ``limit_bytes``."""
    try:
        text = _ENCODER.encode(value)
    except (TypeError, ValueError) as exc:
        raise PayloadError(f"{what} must be JSON-serialisable: {exc}") from None
    if "u0000" in text and _JSON_NUL.search(text):
        raise PayloadError(f"{what} contains a NUL character (\\u0000), which PostgreSQL cannot store")
    # UTF-8 needs at most 4 bytes a character: short texts can skip the byte count.
    if len(text) * 4 > limit_bytes:
        size = len(text.encode())
        if size > limit_bytes:
            raise PayloadError(f"{what} is {size} bytes of JSON, over the limit of {limit_bytes} bytes")
    return text


def encode_arguments(
    args: Sequence[JSONValue], kwargs: Mapping[str, JSONValue], *, limit_bytes: int
) -> tuple[str, str]:
    """Encode positional and keyword arguments, applying the size limit to both together."""
    if isinstance(args, str | bytes) or not isinstance(args, Sequence):
        raise PayloadError("args must be a list")
    if not isinstance(kwargs, Mapping) or not all(isinstance(k, str) for k in kwargs):
        raise PayloadError("kwargs must be an object with string keys")
    args_text = encode(list(args), what="args", limit_bytes=limit_bytes) if args else "[]"
    kwargs_text = encode(dict(kwargs), what="kwargs", limit_bytes=limit_bytes) if kwargs else "{}"
    if (len(args_text) + len(kwargs_text)) * 4 > limit_bytes and (
        total := len(args_text.encode()) + len(kwargs_text.encode())
    ) > limit_bytes:
        raise PayloadError(f"arguments are {total} bytes of JSON, over the limit of {limit_bytes} bytes")
    return args_text, kwargs_text


def payload_fingerprint(name: str, queue: str, args_json: str, kwargs_json: str) -> str:
    """A stable digest of what an idempotency key promises: same key, same task, same arguments."""
    canonical = json.dumps(
        [name, queue, json.loads(args_json), json.loads(kwargs_json)], sort_keys=True, separators=(",", ":")
    )
    return hashlib.sha256(canonical.encode()).hexdigest()
