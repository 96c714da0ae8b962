"""``conveyor enqueue NAME``: put a task on a queue from the shell, by name, with JSON arguments."""

from __future__ import annotations

import json
from typing import Annotated, Any

import typer

from conveyor.app import App
from conveyor.cli.common import (
    AppOption,
    BadInput,
    ConfigOption,
    DatabaseUrlOption,
    JsonOption,
    import_app,
    load,
    opened,
    parse_json,
)
from conveyor.core.task import check_task_name
from conveyor.handles import Signature, make_options


def enqueue(
    name: Annotated[str, typer.Argument(help="The task's registered name.", metavar="NAME", show_default=False)],
    args: Annotated[
        str | None, typer.Option("--args", help="Positional arguments as a JSON array.", show_default=False)
    ] = None,
    kwargs: Annotated[
        str | None, typer.Option("--kwargs", help="Keyword arguments as a JSON object.", show_default=False)
    ] = None,
    queue: Annotated[
        str | None, typer.Option("--queue", "-q", help="Queue (default: the task's).", show_default=False)
    ] = None,
    priority: Annotated[
        int | None, typer.Option("--priority", help="Higher runs first (default: the task's).", show_default=False)
    ] = None,
    delay: Annotated[
        float | None, typer.Option("--delay", help="Seconds to wait before it may run.", show_default=False)
    ] = None,
    max_attempts: Annotated[
        int | None, typer.Option("--max-attempts", help="Attempts before it goes dead.", show_default=False)
    ] = None,
    idempotency_key: Annotated[
        str | None,
        typer.Option("--idempotency-key", help="Same key and payload: the same task.", show_default=False),
    ] = None,
    unique_key: Annotated[
        str | None,
        typer.Option("--unique-key", help="At most one unfinished task holds this key.", show_default=False),
    ] = None,
    app_ref: AppOption = None,
    as_json: JsonOption = False,
    database_url: DatabaseUrlOption = None,
    config: ConfigOption = None,
) -> None:
    """Enqueue a task by name and print its id ("(existing)" when an idempotency or unique key matched).

    Without --app any name is accepted (the task may live in another code base); with --app it must be one of its tasks.
    """
    positional: list[Any] = parse_json("--args", args, list) or []
    keywords: dict[str, Any] = parse_json("--kwargs", kwargs, dict) or {}
    settings = load(config, {"database_url": database_url})
    try:
        check_task_name(name)
        options = make_options(
            **{
                key: value
                for key, value in {
                    "queue": queue,
                    "priority": priority,
                    "delay": delay,
                    "max_attempts": max_attempts,
                    "idempotency_key": idempotency_key,
                    "unique_key": unique_key,
                }.items()
                if value is not None
            }
        )
    except ValueError as exc:
        raise BadInput(str(exc)) from None
    app = import_app(app_ref, settings) if app_ref is not None else App(settings=settings, strict_names=False)
    signature = Signature(name, positional, keywords, options)
    with opened(app):
        # Validate (unknown name, payload size) before the write starts: a refused enqueue then never
        # opens a transaction at all.
        app.build_request(signature)
        handle = app.enqueue_signature(signature)
    if as_json:
        typer.echo(json.dumps({"id": handle.id, "created": handle.created}))
    else:
        typer.echo(f"{handle.id}{'' if handle.created else ' (existing)'}")
