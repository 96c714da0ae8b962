"""Migrations and models can never drift apart (procrastinate's check, here with Alembic)."""

from __future__ import annotations

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import create_engine, inspect

from conveyor.db import migrate
from conveyor.db.models import metadata
from conveyor.db.urls import sqlalchemy_url


def test_upgrade_from_empty__matches_the_models(empty_database_url: str) -> None:
    assert migrate.current_revision(empty_database_url) is None
    migrate.upgrade(empty_database_url)
    assert migrate.current_revision(empty_database_url) == migrate.head_revision()
    engine = create_engine(sqlalchemy_url(empty_database_url))
    try:
        with engine.connect() as conn:
            opts = {"compare_type": True, "version_table": migrate.VERSION_TABLE}
            context = MigrationContext.configure(conn, opts=opts)
            diff = compare_metadata(context, metadata)
            tables = set(inspect(conn).get_table_names())
    finally:
        engine.dispose()
    assert diff == []
    assert {"conveyor_tasks", "conveyor_task_events", "conveyor_workers", "conveyor_queues"} <= tables


def test_upgrade__is_idempotent_and_concurrent_safe(empty_database_url: str) -> None:
    import threading

    errors: list[BaseException] = []

    def run() -> None:
        try:
            migrate.upgrade(empty_database_url)
        except BaseException as exc:  # collected and asserted below
            errors.append(exc)

    threads = [threading.Thread(target=run) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    migrate.upgrade(empty_database_url)
    assert migrate.current_revision(empty_database_url) == migrate.head_revision()


def test_downgrade_to_base__removes_everything(empty_database_url: str) -> None:
    from alembic import command

    migrate.upgrade(empty_database_url)
    command.downgrade(migrate.alembic_config(empty_database_url), "base")
    engine = create_engine(sqlalchemy_url(empty_database_url))
    try:
        with engine.connect() as conn:
            leftover = [t for t in inspect(conn).get_table_names() if t != "conveyor_alembic_version"]
    finally:
        engine.dispose()
    assert leftover == []


def test_task_tables__are_vacuumed_and_analysed_sooner_than_the_defaults(empty_database_url: str) -> None:
    from alembic import command

    def options() -> dict[str, dict[str, str]]:
        engine = create_engine(sqlalchemy_url(empty_database_url))
        try:
            with engine.connect() as conn:
                rows = conn.exec_driver_sql(
                    "SELECT relname, reloptions FROM pg_class "
                    "WHERE relname IN ('conveyor_tasks', 'conveyor_task_events') AND relkind = 'r'"
                ).all()
        finally:
            engine.dispose()
        return {name: dict(o.split("=", 1) for o in (opts or [])) for name, opts in rows}

    migrate.upgrade(empty_database_url)
    tuned = options()
    assert float(tuned["conveyor_tasks"]["autovacuum_vacuum_scale_factor"]) <= 0.02
    assert float(tuned["conveyor_tasks"]["autovacuum_analyze_scale_factor"]) <= 0.02
    assert float(tuned["conveyor_task_events"]["autovacuum_vacuum_insert_scale_factor"]) <= 0.05

    command.downgrade(migrate.alembic_config(empty_database_url), "0007")
    assert options() == {"conveyor_tasks": {}, "conveyor_task_events": {}}
    migrate.upgrade(empty_database_url)
    assert options() == tuned
