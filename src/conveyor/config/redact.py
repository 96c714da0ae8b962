"""Masking secrets for logs and the admin endpoint while keeping what an operator needs to see."""

from __future__ import annotations

from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

__all__ = ["MASK", "mask_secret"]

MASK = "***"

# libpq and redis-py both accept credentials as query parameters too (`?password=...`).
_SECRET_PARAM_HINTS = ("pass", "secret", "token", "key")


def mask_secret(value: str) -> str:
    """Mask a secret; a URL keeps scheme, user, host, port, path and harmless query parameters.

    ``postgresql://user:pw@host:5432/db`` becomes ``postgresql://user:***@host:5432/db``.
    Anything that does not parse cleanly as a URL is masked whole rather than guessed at.
    """
    try:
        parts = urlsplit(value)
        parts.port  # noqa: B018 - raises ValueError on a malformed port
    except ValueError:
        return MASK
    if not parts.scheme or not parts.netloc:
        return MASK
    # An unescaped "/", "?" or "#" in a password makes the rest of it look like a path or query, so an "@"
    # after the host means we cannot tell where the password ends.
    if "@" in parts.path or "@" in parts.query or "@" in parts.fragment:
        return MASK

    userinfo, at, hostport = parts.netloc.rpartition("@")
    if at and ":" in userinfo:
        user = userinfo.partition(":")[0]
        netloc = f"{user}:{MASK}@{hostport}"
    else:
        netloc = parts.netloc
    query = urlencode(
        [
            (name, MASK if any(hint in name.lower() for hint in _SECRET_PARAM_HINTS) else val)
            for name, val in parse_qsl(parts.query, keep_blank_values=True)
        ],
        safe="*",
    )
    # Fragments have no meaning in a connection URL; drop rather than risk echoing one.
    return urlunsplit((parts.scheme, netloc, parts.path, query, ""))
