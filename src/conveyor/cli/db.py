"""``conveyor db``: the schema of the configured database (or of the embedded server)."""

from __future__ import annotations

import typer

from conveyor.app import App
from conveyor.cli.common import ConfigOption, DatabaseUrlOption, load, opened
from conveyor.db import migrate
from conveyor.db.urls import redact

db = typer.Typer(help="Inspect and upgrade the database schema.")


@db.callback(invoke_without_command=True)
def _group(ctx: typer.Context) -> None:
    if ctx.invoked_subcommand is None:
        typer.echo(ctx.get_help())
        raise typer.Exit(2)


@db.command()
def upgrade(database_url: DatabaseUrlOption = None, config: ConfigOption = None) -> None:
    """Migrate the schema to the version this Conveyor needs (safe to run from several hosts at once)."""
    settings = load(config, {"database_url": database_url})
    with opened(App(settings=settings, strict_names=False)) as app:
        url = app.database_url
        before = migrate.current_revision(url)
        migrate.upgrade(url)
        after = migrate.current_revision(url)
    where = redact(url)
    if before == after:
        typer.echo(f"{where}: already at {after} (head)")
    else:
        typer.echo(f"{where}: {before or 'empty'} -> {after}")


@db.command()
def current(database_url: DatabaseUrlOption = None, config: ConfigOption = None) -> None:
    """Print the schema revision; exit code 1 if it is behind this Conveyor's (run `conveyor db upgrade`)."""
    settings = load(config, {"database_url": database_url})
    with opened(App(settings=settings, strict_names=False)) as app:
        url = app.database_url
        revision = migrate.current_revision(url)
    head = migrate.head_revision()
    where = redact(url)
    if revision == head:
        typer.echo(f"{where}: {revision} (head)")
        return
    typer.echo(f"{where}: {revision or 'empty'} (behind: head is {head}; run `conveyor db upgrade`)")
    raise typer.Exit(1)
