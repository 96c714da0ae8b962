"""``conveyor tasks``: look at tasks and act on them (list, show, retry, cancel).

A thin adapter over :class:`~conveyor.db.task_store.TaskStore`: the store decides what is allowed
(``TaskNotFound``, ``InvalidTransition``); this module only reads flags and prints.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Awaitable, Callable
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from conveyor.app import App
from conveyor.cli.common import ConfigOption, DatabaseUrlOption, JsonOption, load, opened, run_with_app
from conveyor.core.records import TaskEvent, TaskRecord
from conveyor.core.states import TaskState
from conveyor.db.task_store import TaskStore

T = TypeVar("T")

tasks = typer.Typer(help="List, inspect, retry and cancel tasks.")

TaskIdArgument = Annotated[int, typer.Argument(help="The task id.", metavar="ID", show_default=False)]


@tasks.callback(invoke_without_command=True)
def _group(ctx: typer.Context) -> None:
    if ctx.invoked_subcommand is None:
        typer.echo(ctx.get_help())
        raise typer.Exit(2)


@tasks.command("list")
def list_tasks(
    state: Annotated[
        list[TaskState] | None,
        typer.Option("--state", "-s", help="Only tasks in this state (repeatable).", show_default=False),
    ] = None,
    queue: Annotated[str | None, typer.Option("--queue", "-q", help="Only this queue.", show_default=False)] = None,
    name: Annotated[str | None, typer.Option("--name", "-n", help="Only this task name.", show_default=False)] = None,
    limit: Annotated[int, typer.Option("--limit", help="At most this many, newest first.", min=1, max=10_000)] = 50,
    as_json: JsonOption = False,
    database_url: DatabaseUrlOption = None,
    config: ConfigOption = None,
) -> None:
    """List tasks, newest first."""
    records = _with_store(
        config,
        database_url,
        lambda store: store.list(states=state or (), queue=queue, name=name, limit=limit),
    )
    if as_json:
        _print_json([_record_data(r) for r in records])
        return
    table = Table("id", "name", "queue", "state", "attempt", "created", "finished", title=f"{len(records)} tasks")
    for r in records:
        cells = [str(r.id), r.name, r.queue, r.state.value, f"{r.attempt}/{r.max_attempts}"]
        table.add_row(*map(Text, [*cells, _when(r.created_at), _when(r.finished_at)]))
    _console().print(table)


@tasks.command()
def show(
    task_id: TaskIdArgument,
    as_json: JsonOption = False,
    database_url: DatabaseUrlOption = None,
    config: ConfigOption = None,
) -> None:
    """Show one task and its history."""

    async def fetch(store: TaskStore) -> tuple[TaskRecord, list[TaskEvent]]:
        return await store.get(task_id), await store.events(task_id)

    record, events = _with_store(config, database_url, fetch)
    if as_json:
        _print_json({**_record_data(record), "events": [_event_data(e) for e in events]})
        return
    details = Table.grid(padding=(0, 2))
    for key, value in _record_data(record).items():
        details.add_row(Text(key), Text(_cell(value)))
    history = Table("at", "event", "attempt", "worker", "detail", title="history")
    for e in events:
        cells = [_when(e.at), e.kind, str(e.attempt), e.worker_id or "", _cell(e.detail)]
        history.add_row(*map(Text, cells))
    console = _console()
    console.print(details)
    console.print(history)


@tasks.command()
def retry(task_id: TaskIdArgument, database_url: DatabaseUrlOption = None, config: ConfigOption = None) -> None:
    """Run a dead, cancelled or succeeded task again."""
    record = _with_store(config, database_url, lambda store: store.retry(task_id))
    typer.echo(f"task {record.id} is {record.state.value} again")


@tasks.command()
def cancel(task_id: TaskIdArgument, database_url: DatabaseUrlOption = None, config: ConfigOption = None) -> None:
    """Cancel a waiting task, or ask the worker running it to stop."""
    record = _with_store(config, database_url, lambda store: store.cancel(task_id))
    if record.state == TaskState.CANCELLED:
        typer.echo(f"task {record.id} cancelled")
    else:
        typer.echo(f"task {record.id} is {record.state.value}: its worker was asked to stop it")


def _with_store(config: Path | None, database_url: str | None, action: Callable[[TaskStore], Awaitable[T]]) -> T:
    settings = load(config, {"database_url": database_url})
    with opened(App(settings=settings, strict_names=False)) as app:
        return run_with_app(app, lambda a: action(a.store()))


def _record_data(record: TaskRecord) -> dict[str, Any]:
    return dataclasses.asdict(record)


def _event_data(event: TaskEvent) -> dict[str, Any]:
    return dataclasses.asdict(event)


def _print_json(data: Any) -> None:
    typer.echo(json.dumps(data, default=_json_default, indent=2))


def _json_default(value: object) -> Any:
    if isinstance(value, datetime):
        return value.isoformat()
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def _console() -> Console:
    # Task names, args and errors are user data: every cell is a Text, never parsed as rich markup.
    return Console(highlight=False, markup=False, emoji=False, soft_wrap=False)


def _when(value: datetime | None) -> str:
    return "" if value is None else value.isoformat(sep=" ", timespec="seconds")


def _cell(value: object) -> str:
    if value is None:
        return ""
    if isinstance(value, datetime):
        return value.isoformat(sep=" ", timespec="milliseconds")
    if isinstance(value, str):
        return value
    return json.dumps(value, default=_json_default)
