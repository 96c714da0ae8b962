"""Schema migrations, run programmatically (``conveyor db upgrade``) from the scripts shipped in the package."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from sqlalchemy import Engine, create_engine, text

from conveyor.db.errors import translate_errors
from conveyor.db.urls import sqlalchemy_url

if TYPE_CHECKING:  # alembic is imported where used: it adds most of a second to every CLI start
    from alembic.config import Config

MIGRATIONS_DIR = Path(__file__).parent / "migrations"
# Any constant works; it only has to be the same for every Conveyor process sharing a database.
_MIGRATION_LOCK_KEY = 0x636F6E76  # "conv"
#: Our own name, so Conveyor's migrations never collide with the host application's Alembic history.
VERSION_TABLE = "conveyor_alembic_version"


def _engine(database_url: str) -> Engine:
    return create_engine(sqlalchemy_url(database_url), connect_args={"connect_timeout": 10})


def alembic_config(database_url: str) -> Config:
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    # Alembic interpolates %-signs in options; a password may contain them.
    rendered = sqlalchemy_url(database_url).render_as_string(hide_password=False)
    config.set_main_option("sqlalchemy.url", rendered.replace("%", "%%"))
    return config


def upgrade(database_url: str, revision: str = "head") -> None:
    """Bring the schema up to ``revision``. Safe to call from many processes at once: an advisory lock
    serialises them and the later ones find nothing to do."""
    from alembic import command

    engine = _engine(database_url)
    try:
        with translate_errors(), engine.connect() as connection:
            connection.execute(text("SELECT pg_advisory_lock(:key)"), {"key": _MIGRATION_LOCK_KEY})
            try:
                config = alembic_config(database_url)
                config.attributes["connection"] = connection
                command.upgrade(config, revision)
                connection.commit()
            finally:
                connection.execute(text("SELECT pg_advisory_unlock(:key)"), {"key": _MIGRATION_LOCK_KEY})
                connection.commit()
    finally:
        engine.dispose()


def current_revision(database_url: str) -> str | None:
    from alembic.runtime.migration import MigrationContext

    engine = _engine(database_url)
    try:
        with translate_errors(), engine.connect() as connection:
            context = MigrationContext.configure(connection, opts={"version_table": VERSION_TABLE})
            return context.get_current_revision()
    finally:
        engine.dispose()


def head_revision() -> str:
    from alembic.script import ScriptDirectory

    head = ScriptDirectory.from_config(alembic_config("postgresql://localhost/x")).get_current_head()
    assert head is not None, "the package ships no migrations"
    return head
