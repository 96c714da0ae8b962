"""Driver and SQLAlchemy errors become Conveyor errors here, once, at the boundary."""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from typing import ParamSpec, TypeVar

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


P = ParamSpec("P")
T = TypeVar("T")


def translated(method: Callable[P, Awaitable[T]]) -> Callable[P, Awaitable[T]]:
    """:func:`translate_errors` around a whole repository coroutine."""

    @functools.wraps(method)
    async def wrapper(*args: P.args, **kwargs: P.kwargs) -> T:
        with translate_errors():
            return await method(*args, **kwargs)

    return wrapper
