"""Shared fixtures: a real PostgreSQL for the whole run, and a fresh database per test.

With ``TEST_DATABASE_URL`` the suite uses that server, creating (and dropping) throwaway databases
named ``conveyor_test_*`` on it and touching nothing else. Without it, the suite starts its own private
server from the same binaries as the embedded default (fsync off, a free port, deleted afterwards). If
neither works the tests fail with the reason: nothing is skipped silently.
"""

from __future__ import annotations

import os
import secrets
import sys
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import psycopg
import pytest
from sqlalchemy.engine import make_url

from conveyor.app import App
from conveyor.config import load_settings
from conveyor.db import migrate

ROOT = Path(__file__).resolve().parent.parent
TEMPLATE_DB = f"conveyor_template_{os.getpid()}"


def _admin_url(url: str, database: str = "postgres") -> str:
    return make_url(url).set(database=database).render_as_string(hide_password=False)


@pytest.fixture(scope="session")
def pg_server() -> Iterator[str]:
    """The URL of a PostgreSQL server's maintenance database."""
    external = os.environ.get("TEST_DATABASE_URL")
    if external:
        yield _admin_url(external)
        return
    from conveyor.db.embedded import EmbeddedPostgres

    data_dir = Path(tempfile.mkdtemp(prefix="conveyor-test-pg-"))
    data_dir.chmod(0o755)  # as root the server runs as an unprivileged user, who must reach the data dir
    server = EmbeddedPostgres(data_dir / "data", fsync=False, stop_with_parent=True, ephemeral=True)
    try:
        url = server.start()
    except Exception as exc:  # the reason must be seen, not skipped over
        pytest.fail(f"cannot start the private test PostgreSQL: {exc}", pytrace=False)
    try:
        yield url
    finally:
        server.stop()


@pytest.fixture(scope="session")
def template_db(pg_server: str) -> Iterator[str]:
    """A database migrated once, cloned for each test (much faster than migrating each time)."""
    with psycopg.connect(pg_server, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{TEMPLATE_DB}"')
        conn.execute(f'CREATE DATABASE "{TEMPLATE_DB}"')
    migrate.upgrade(_admin_url(pg_server, TEMPLATE_DB))
    yield TEMPLATE_DB
    with psycopg.connect(pg_server, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{TEMPLATE_DB}" WITH (FORCE)')


def _create_db(pg_server: str, template: str | None) -> tuple[str, str]:
    name = f"conveyor_test_{secrets.token_hex(6)}"
    with psycopg.connect(pg_server, autocommit=True) as conn:
        if template:
            conn.execute(f'CREATE DATABASE "{name}" TEMPLATE "{template}"')
        else:
            conn.execute(f'CREATE DATABASE "{name}"')
    return name, _admin_url(pg_server, name)


def _drop_db(pg_server: str, name: str) -> None:
    with psycopg.connect(pg_server, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def database_url(pg_server: str, template_db: str) -> Iterator[str]:
    """A fresh, migrated database for one test."""
    name, url = _create_db(pg_server, template_db)
    try:
        yield url
    finally:
        _drop_db(pg_server, name)


@pytest.fixture
def empty_database_url(pg_server: str) -> Iterator[str]:
    """A fresh database with no schema (for migration tests)."""
    name, url = _create_db(pg_server, None)
    try:
        yield url
    finally:
        _drop_db(pg_server, name)


FAST_TIMERS = {
    "worker.heartbeat_interval_s": 0.1,
    "worker.lease_timeout_s": 1.0,
    "worker.rescue_interval_s": 0.2,
    "worker.poll_interval_s": 0.2,
    "worker.shutdown_grace_s": 2.0,
}


def make_settings(database_url: str, **overrides: object):  # type: ignore[no-untyped-def]
    values: dict[str, object] = {"database_url": database_url, **FAST_TIMERS}
    values.update({k.replace("__", "."): v for k, v in overrides.items()})
    return load_settings(None, environ={}, overrides=values)


@pytest.fixture
def app(database_url: str) -> Iterator[App]:
    application = App(settings=make_settings(database_url))
    try:
        yield application
    finally:
        application.close()


@pytest.fixture
async def aapp(database_url: str) -> AsyncIterator[App]:
    """An App used from async tests (its engine lives on the test's loop)."""
    application = App(settings=make_settings(database_url))
    try:
        yield application
    finally:
        await application.aclose()
        application.close()


def subprocess_env(database_url: str, **extra: str) -> dict[str, str]:
    """Environment for CLI/worker subprocesses: the test database, fast timers, importable test apps."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CONVEYOR_")}
    env.update(
        {
            "CONVEYOR_DATABASE_URL": database_url,
            "CONVEYOR_WORKER__HEARTBEAT_INTERVAL_S": "0.1",
            "CONVEYOR_WORKER__LEASE_TIMEOUT_S": "1.0",
            "CONVEYOR_WORKER__RESCUE_INTERVAL_S": "0.2",
            "CONVEYOR_WORKER__POLL_INTERVAL_S": "0.2",
            "PYTHONPATH": os.pathsep.join([str(ROOT / "tests" / "apps"), env.get("PYTHONPATH", "")]),
            "PYTHONUNBUFFERED": "1",
        }
    )
    env.update(extra)
    return env


PYTHON = sys.executable
