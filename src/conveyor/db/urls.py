"""Database URLs in the three spellings the libraries want, and a safe one for logs."""

from __future__ import annotations

from sqlalchemy.engine import URL, make_url

from conveyor.errors import ConfigError


def parse(url: str) -> URL:
    try:
        parsed = make_url(url)
    except Exception as exc:  # sqlalchemy raises ArgumentError with the URL in it; don't echo secrets
        raise ConfigError("database_url is not a valid URL (expected postgresql://user@host:port/db)") from exc
    if parsed.get_backend_name() not in ("postgresql", "postgres"):
        raise ConfigError(f"database_url must be a postgresql:// URL, not {parsed.get_backend_name()}://")
    return parsed


def sqlalchemy_url(url: str) -> URL:
    """For SQLAlchemy engines: always the psycopg 3 driver (sync and async share it)."""
    return parse(url).set(drivername="postgresql+psycopg")


def libpq_conninfo(url: str) -> str:
    """For raw psycopg connections (LISTEN, COPY): a plain postgresql:// URL."""
    return sqlalchemy_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


def redact(url: str) -> str:
    """The URL with its password masked, for logs and the admin API."""
    try:
        return parse(url).render_as_string(hide_password=True)
    except ConfigError:
        return "<invalid database url>"
