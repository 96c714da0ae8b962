"""``conveyor scheduler`` (run one) and ``conveyor schedules`` (list, status, add, pause, resume, trigger).

Thin adapters over :class:`~conveyor.scheduler.Scheduler` and
:class:`~conveyor.db.schedule_store.ScheduleStore`: the store decides what is allowed (``ScheduleNotFound``,
``ScheduleConflict``), a bad value is a ``BadInput``; both end as one ``conveyor: error:`` line, exit 2.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable
from dataclasses import asdict
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from conveyor.api.schemas_scheduler import SchedulerOut
from conveyor.app import App
from conveyor.cli.common import (
    AppOption,
    BadInput,
    ConfigOption,
    DatabaseUrlOption,
    EarlySignals,
    JsonOption,
    LogFormatOption,
    LogLevelOption,
    import_app,
    load,
    opened,
    parse_json,
    run_with_app,
    serve,
)
from conveyor.core.schedule import MISFIRE_POLICIES, MisfirePolicy, ScheduleDefinition, Timing
from conveyor.core.schedule_records import Lease, ScheduleRecord, SchedulerOverview
from conveyor.db.schedule_store import ScheduleStore
from conveyor.db.scheduler_process_store import SchedulerProcessStore
from conveyor.scheduler import Scheduler
from conveyor.scheduler.runs import build_run_request

T = TypeVar("T")
log = logging.getLogger("conveyor.cli")

ScheduleRef = Annotated[str, typer.Argument(help="The schedule's id or name.", metavar="SCHEDULE", show_default=False)]


def scheduler(
    app_ref: AppOption = None,
    database_url: DatabaseUrlOption = None,
    tick_interval: Annotated[
        float | None, typer.Option("--tick-interval", help="Seconds between checks.", show_default=False)
    ] = None,
    leader_lease: Annotated[
        float | None, typer.Option("--leader-lease", help="Seconds a leader's lease lasts.", show_default=False)
    ] = None,
    log_level: LogLevelOption = None,
    log_format: LogFormatOption = None,
    config: ConfigOption = None,
) -> None:
    """Run a scheduler until SIGTERM/SIGINT: any number may run, one leads and enqueues what is due.

    With --app its code-declared schedules (@app.periodic) are written into the database first; without,
    only schedules in the database fire, enqueued by task name.
    """
    signals = EarlySignals().install()
    settings = load(
        config,
        {
            "worker.app": app_ref,
            "database_url": database_url,
            "scheduler.tick_interval_s": tick_interval,
            "scheduler.leader_lease_s": leader_lease,
            "log_level": log_level,
            "log_format": log_format,
        },
    )
    reference = settings.worker.app
    app = import_app(reference, settings) if reference is not None else App(settings=settings, strict_names=False)
    if reference is None:
        log.info("no --app: code-declared schedules are left as they are in the database")
    with opened(app):
        if settings.database_url is not None:
            app.check_schema()
        serve(app, Scheduler(app, sync=reference is not None), signals)


schedules = typer.Typer(help="List, add, pause, resume and trigger schedules; show the schedulers' health.")


@schedules.callback(invoke_without_command=True)
def _group(ctx: typer.Context) -> None:
    if ctx.invoked_subcommand is None:
        typer.echo(ctx.get_help())
        raise typer.Exit(2)


@schedules.command("list")
def list_schedules(
    as_json: JsonOption = False, database_url: DatabaseUrlOption = None, config: ConfigOption = None
) -> None:
    """List every schedule, by name."""

    async def fetch(store: ScheduleStore, _: App) -> tuple[list[ScheduleRecord], Lease | None]:
        return await store.list_all(), await store.lease()

    records, lease = _with_store(config, database_url, fetch)
    if as_json:
        typer.echo(json.dumps([schedule_data(r) for r in records], default=_json_default, indent=2))
        return
    table = Table("id", "name", "task", "when", "misfire", "state", "next fire", "last fire", "source")
    table.title = f"{len(records)} schedules"
    if lease is not None:
        # Expiry is on the database clock; a lapsed lease means no scheduler is leading right now.
        table.caption = (
            f"leader: {lease.holder} (fencing token {lease.fencing_token}, lease until {_when(lease.expires_at)})"
        )
    for r in records:
        d = r.definition
        state = "enabled" if r.enabled else f"disabled ({r.disabled_reason})"
        cells = [str(r.id), d.name, d.task_name, d.timing.describe(), d.misfire, state]
        table.add_row(*map(Text, [*cells, _when(r.next_fire_at), _when(r.last_fire_at), r.source]))
    # Names and tasks are user data: never parsed as rich markup.
    Console(highlight=False, markup=False, emoji=False, soft_wrap=False).print(table)


@schedules.command()
def status(as_json: JsonOption = False, database_url: DatabaseUrlOption = None, config: ConfigOption = None) -> None:
    """Who leads, and every scheduler process as it last reported itself (host, pid, clock skew, stale).

    Exit code 0 when the status is ok, 1 when it is degraded or no scheduler leads (for scripts and
    container health checks), 2 for bad input as everywhere."""

    async def fetch(_: ScheduleStore, app: App) -> SchedulerOverview:
        return await SchedulerProcessStore(app.runtime().engine).overview()

    overview = _with_store(config, database_url, fetch)
    if as_json:
        # The API's body for GET /api/v1/scheduler: one shape for scripts, whichever way they ask.
        typer.echo(json.dumps(SchedulerOut.of(overview).model_dump(mode="json"), indent=2))
    else:
        _print_overview(overview)
    if overview.status != "ok":
        raise typer.Exit(1)


def _print_overview(overview: SchedulerOverview) -> None:
    console = Console(highlight=False, markup=False, emoji=False, soft_wrap=False)
    lease = overview.lease
    leader = "none" if lease is None else f"{lease.holder} (fencing token {lease.fencing_token})"
    if lease is not None and overview.leader_expired:
        leader += f", lease expired at {_when(lease.expires_at)}"
    console.print(Text(f"status: {overview.status}   leader: {leader}   checked: {_when(overview.checked_at)}"))
    table = Table("id", "host", "pid", "role", "started", "last seen", "clock skew", "state")
    for p in overview.processes:
        skew = "" if p.clock_skew_s is None else f"{p.clock_skew_s:+.3f} s"
        state = f"stale ({p.seen_age_s:.0f} s)" if p.stale else (p.warning or "ok")
        cells = [p.id, p.host, str(p.pid), "leader" if p.leading else "standby", _when(p.started_at)]
        table.add_row(*map(Text, [*cells, _when(p.last_seen_at), skew, state]))
    console.print(table)
    for problem in overview.problems:
        console.print(Text(f"problem: {problem}"))


@schedules.command()
def add(
    name: Annotated[str, typer.Option("--name", help="A unique schedule name.", show_default=False)],
    task: Annotated[str, typer.Option("--task", help="The task's registered name.", show_default=False)],
    cron: Annotated[
        str | None,
        typer.Option("--cron", help="5 fields, or 6 with seconds first.", show_default=False),
    ] = None,
    interval: Annotated[
        int | None, typer.Option("--interval", help="Whole seconds between runs (at least 1).", show_default=False)
    ] = None,
    timezone: Annotated[str, typer.Option("--timezone", help="IANA time zone of the cron.")] = "UTC",
    args: Annotated[
        str | None, typer.Option("--args", help="Positional arguments as a JSON array.", show_default=False)
    ] = None,
    kwargs: Annotated[
        str | None, typer.Option("--kwargs", help="Keyword arguments as a JSON object.", show_default=False)
    ] = None,
    queue: Annotated[
        str | None, typer.Option("--queue", help="Queue (default: the task's).", show_default=False)
    ] = None,
    priority: Annotated[
        int | None, typer.Option("--priority", help="Priority (default: the task's).", show_default=False)
    ] = None,
    misfire: Annotated[str, typer.Option("--misfire", help=f"After downtime: {', '.join(MISFIRE_POLICIES)}.")] = "once",
    max_lateness: Annotated[
        float | None,
        typer.Option("--max-lateness", help="Seconds after which a missed run is dropped.", show_default=False),
    ] = None,
    as_json: JsonOption = False,
    database_url: DatabaseUrlOption = None,
    config: ConfigOption = None,
) -> None:
    """Add a schedule (managed here and over the API, never overwritten by code)."""
    if misfire not in MISFIRE_POLICIES:
        raise BadInput(f"--misfire must be one of {', '.join(MISFIRE_POLICIES)}, not {misfire!r}")
    policy: MisfirePolicy = misfire  # checked just above
    try:
        definition = ScheduleDefinition(
            name=name,
            task_name=task,
            timing=Timing(cron=cron, interval_s=interval, timezone=timezone),
            args=tuple(parse_json("--args", args, list) or ()),
            kwargs=parse_json("--kwargs", kwargs, dict) or {},
            queue=queue,
            priority=priority,
            misfire=policy,
            max_lateness_s=max_lateness,
        )
    except ValueError as exc:
        raise BadInput(str(exc)) from None
    record = _with_store(config, database_url, lambda store, _: store.create(definition))
    if as_json:
        typer.echo(json.dumps(schedule_data(record), default=_json_default, indent=2))
    else:
        typer.echo(f"schedule {record.id} {record.name!r} added: next run {_when(record.next_fire_at)}")


@schedules.command()
def pause(ref: ScheduleRef, database_url: DatabaseUrlOption = None, config: ConfigOption = None) -> None:
    """Stop a schedule from firing until it is resumed."""

    async def act(store: ScheduleStore, _: App) -> ScheduleRecord:
        return await store.pause((await store.get(_ref(ref))).id)

    record = _with_store(config, database_url, act)
    typer.echo(f"schedule {record.id} {record.name!r} paused")


@schedules.command()
def resume(ref: ScheduleRef, database_url: DatabaseUrlOption = None, config: ConfigOption = None) -> None:
    """Let a paused schedule fire again, from its next fire time (the paused ones are not caught up)."""

    async def act(store: ScheduleStore, _: App) -> ScheduleRecord:
        return await store.resume((await store.get(_ref(ref))).id)

    record = _with_store(config, database_url, act)
    typer.echo(f"schedule {record.id} {record.name!r} resumed: next run {_when(record.next_fire_at)}")


@schedules.command()
def trigger(
    ref: ScheduleRef,
    app_ref: AppOption = None,
    database_url: DatabaseUrlOption = None,
    config: ConfigOption = None,
) -> None:
    """Enqueue one run of a schedule now, outside its cadence, and print the task id.

    With --app the task must be one of its tasks (and takes its defaults from it)."""

    async def act(store: ScheduleStore, app: App) -> int | None:
        record = await store.get(_ref(ref))
        run = await store.trigger(record.id, lambda schedule, at: build_run_request(app, schedule, at))
        return run.task_id

    typer.echo(str(_with_store(config, database_url, act, app_ref)))


def _with_store(
    config: Path | None,
    database_url: str | None,
    action: Callable[[ScheduleStore, App], Awaitable[T]],
    app_ref: str | None = None,
) -> T:
    settings = load(config, {"database_url": database_url})
    app = import_app(app_ref, settings) if app_ref is not None else App(settings=settings, strict_names=False)
    with opened(app):
        return run_with_app(app, lambda a: action(ScheduleStore(a.runtime().engine), a))


def _ref(text: str) -> int | str:
    # Names start with a letter or '_', so an all-digit reference can only be an id.
    return int(text) if text.isdigit() else text


def schedule_data(record: ScheduleRecord) -> dict[str, Any]:
    """A schedule as JSON-ready data (the CLI's ``--json``)."""
    data = asdict(record)
    definition = data.pop("definition")
    timing = definition.pop("timing")
    return {"id": data.pop("id"), **definition, **timing, **data}


def _json_default(value: object) -> Any:
    if isinstance(value, datetime):
        return value.isoformat()
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def _when(value: datetime | None) -> str:
    return "" if value is None else value.isoformat(sep=" ", timespec="seconds")
