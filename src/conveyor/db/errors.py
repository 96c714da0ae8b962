"""Driver and SQLAlchemy errors become Conveyor errors here, once, at the boundary."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import psycopg
import sqlalchemy.exc

from conveyor.errors import DatabaseError


@contextmanager
def translate_errors() -> Iterator[None]:
    """Re-raise connection-level failures as :class:`DatabaseError` (message without the URL or
    parameters, which may hold secrets). Integrity errors pass through: callers decide what they mean."""
    try:
        yield
    except (sqlalchemy.exc.IntegrityError, psycopg.errors.IntegrityError):
        raise
    except sqlalchemy.exc.DBAPIError as exc:
        raise DatabaseError(f"database error: {type(exc.orig).__name__}: {_first_line(exc.orig)}") from exc
    except psycopg.Error as exc:
        raise DatabaseError(f"database error: {type(exc).__name__}: {_first_line(exc)}") from exc
    except OSError as exc:
        raise DatabaseError(f"database unreachable: {exc}") from exc


def _first_line(exc: BaseException | None) -> str:
    return str(exc).strip().splitlines()[0] if exc is not None and str(exc).strip() else "no detail"
