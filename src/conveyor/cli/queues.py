"""``conveyor queues``: a queue's settings from the command line (its limits).

A thin adapter over :class:`~conveyor.db.queue_store.QueueStore`, the same one the HTTP API uses;
this module only reads flags and prints.
"""

from __future__ import annotations

import math
from typing import Annotated

import typer

from conveyor.app import App
from conveyor.cli.common import BadInput, ConfigOption, DatabaseUrlOption, load, opened, run_with_app
from conveyor.core.task import check_queue_name
from conveyor.db.queue_store import KEEP, QueueStats, QueueStore

#: The same bound as the HTTP API's.
MAX_RATE_PER_S = 1_000_000.0
_NONE = "none"

queues = typer.Typer(help="Queue settings: concurrency and rate limits.")


@queues.callback(invoke_without_command=True)
def _group(ctx: typer.Context) -> None:
    if ctx.invoked_subcommand is None:
        typer.echo(ctx.get_help())
        raise typer.Exit(2)


@queues.command()
def limits(
    name: Annotated[str, typer.Argument(help="The queue name.", metavar="NAME", show_default=False)],
    concurrency: Annotated[
        str | None,
        typer.Option(
            "--concurrency",
            help="Tasks of this queue running at once across all workers, or 'none' to remove the limit.",
            metavar="N|none",
            show_default=False,
        ),
    ] = None,
    rate: Annotated[
        str | None,
        typer.Option(
            "--rate",
            help="Task starts per second across all workers (bursts of up to max(1, R)), or 'none'.",
            metavar="R|none",
            show_default=False,
        ),
    ] = None,
    database_url: DatabaseUrlOption = None,
    config: ConfigOption = None,
) -> None:
    """Show a queue's limits, or change them (a limit not given stays as it is).

    Workers enforce the limits together and notice a change within about a second."""
    try:
        check_queue_name(name)
    except ValueError as exc:
        raise BadInput(str(exc)) from None
    concurrency_limit = KEEP if concurrency is None else _concurrency(concurrency)
    rate_limit = KEEP if rate is None else _rate(rate)
    settings = load(config, {"database_url": database_url})

    async def apply(app: App) -> QueueStats | None:
        store = QueueStore(app.runtime().engine)
        await store.set_limits(name, concurrency_limit=concurrency_limit, rate_limit_per_s=rate_limit)
        return await store.get(name)

    with opened(App(settings=settings, strict_names=False)) as app:
        stats = run_with_app(app, apply)
    if stats is None:
        typer.echo(f"queue {name}: no limits (the queue is not known yet)")
        return
    shown_concurrency = "unlimited" if stats.concurrency_limit is None else str(stats.concurrency_limit)
    shown_rate = "unlimited" if stats.rate_limit_per_s is None else f"{stats.rate_limit_per_s:g}/s"
    typer.echo(f"queue {name}: concurrency {shown_concurrency}, rate {shown_rate}")


def _concurrency(text: str) -> int | None:
    if text.strip().lower() == _NONE:
        return None
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0 or value > 2**31 - 1:
        raise BadInput(f"--concurrency must be a whole number, 0 or more, or 'none': {text!r}")
    return value


def _rate(text: str) -> float | None:
    if text.strip().lower() == _NONE:
        return None
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0 < value <= MAX_RATE_PER_S:  # also refuses nan and inf
        raise BadInput(f"--rate must be tasks per second, above 0 and at most {MAX_RATE_PER_S:g}, or 'none': {text!r}")
    return value
