"""``conveyor worker``: run a worker process, or a supervisor of several with ``--processes``."""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Annotated

import typer

from conveyor.app import App
from conveyor.cli.common import (
    AppOption,
    BadInput,
    ConfigOption,
    DatabaseUrlOption,
    EarlySignals,
    LogFormatOption,
    LogLevelOption,
    exit_leaving_threads,
    import_app,
    load,
    opened,
    serve,
)
from conveyor.config import Settings
from conveyor.worker.supervisor import Supervisor
from conveyor.worker.worker import Worker

log = logging.getLogger("conveyor.cli")


def worker(
    app_ref: AppOption = None,
    queues: Annotated[
        str | None, typer.Option("--queues", "-Q", help="Comma-separated queues to consume.", show_default=False)
    ] = None,
    concurrency: Annotated[
        int | None, typer.Option("--concurrency", "-c", help="Tasks run at once per process.", show_default=False)
    ] = None,
    processes: Annotated[
        int | None, typer.Option("--processes", "-p", help="Worker processes to supervise.", show_default=False)
    ] = None,
    burst: Annotated[bool, typer.Option("--burst", help="Exit once the queues are drained.")] = False,
    name: Annotated[
        str | None, typer.Option("--name", help="Worker name (with --processes: NAME-1..N).", show_default=False)
    ] = None,
    database_url: DatabaseUrlOption = None,
    lease_timeout: Annotated[
        float | None, typer.Option("--lease-timeout", help="Lease length in seconds.", show_default=False)
    ] = None,
    heartbeat_interval: Annotated[
        float | None,
        typer.Option("--heartbeat-interval", help="Seconds between lease renewals.", show_default=False),
    ] = None,
    poll_interval: Annotated[
        float | None, typer.Option("--poll-interval", help="Seconds between polls for work.", show_default=False)
    ] = None,
    shutdown_grace: Annotated[
        float | None,
        typer.Option("--shutdown-grace", help="Seconds in-flight tasks get after SIGTERM.", show_default=False),
    ] = None,
    log_level: LogLevelOption = None,
    log_format: LogFormatOption = None,
    config: ConfigOption = None,
) -> None:
    """Run a worker that claims and executes tasks until SIGTERM/SIGINT (a second signal aborts)."""
    signals = EarlySignals().install()
    settings = load(
        config,
        {
            "worker.app": app_ref,
            "worker.queues": queues,
            "worker.concurrency": concurrency,
            "worker.processes": processes,
            "worker.name": name,
            "database_url": database_url,
            "worker.lease_timeout_s": lease_timeout,
            "worker.heartbeat_interval_s": heartbeat_interval,
            "worker.poll_interval_s": poll_interval,
            "worker.shutdown_grace_s": shutdown_grace,
            "log_level": log_level,
            "log_format": log_format,
        },
    )
    reference = settings.worker.app
    if reference is None:
        raise BadInput("no app to run: pass --app package.module:app or set worker.app in the settings")
    app = import_app(reference, settings)
    busy_threads = 0
    with opened(app):
        # Before anything starts, so a wrong schema is one clear error rather than N crashing children.
        # An embedded server is ours and was migrated when it started.
        if settings.database_url is not None:
            app.check_schema()
        if settings.worker.processes > 1:
            code = _supervise(app, settings, reference, burst, config, database_url, signals)
        else:
            busy_threads = _run_worker(app, reference, burst, signals).executor.busy_threads
            code = 0
    if code:
        raise typer.Exit(code)
    if busy_threads:
        exit_leaving_threads(busy_threads)


def _run_worker(app: App, reference: str, burst: bool, signals: EarlySignals) -> Worker:
    worker = Worker(app, burst=burst, app_ref=reference)
    serve(app, worker, signals)
    return worker


def _supervise(
    app: App,
    settings: Settings,
    reference: str,
    burst: bool,
    config: Path | None,
    database_url_flag: str | None,
    signals: EarlySignals,
) -> int:
    if signals.received:
        return 0  # stopped before anything was started
    worker_settings = settings.worker
    # Settings reach the children as flags (besides the environment and the file they share with us), so
    # a value given on our command line wins there too.
    shared = ["--app", reference, "--processes", "1"]
    shared += ["--queues", ",".join(worker_settings.queues), "--concurrency", str(worker_settings.concurrency)]
    shared += ["--lease-timeout", repr(worker_settings.lease_timeout_s)]
    shared += ["--heartbeat-interval", repr(worker_settings.heartbeat_interval_s)]
    shared += ["--poll-interval", repr(worker_settings.poll_interval_s)]
    shared += ["--shutdown-grace", repr(worker_settings.shutdown_grace_s)]
    shared += ["--log-level", settings.log_level, "--log-format", settings.log_format]
    if config is not None:
        shared += ["--config", str(config.absolute())]
    if database_url_flag is not None:
        shared += ["--database-url", database_url_flag]  # already on our own command line
    elif settings.database_url is None:
        # One embedded server for the whole group, owned by the supervisor: a child that started it would
        # take it down for everyone when it restarts. Its URL carries no password (local trust auth).
        shared += ["--database-url", app.database_url]
    if burst:
        shared.append("--burst")
    count = worker_settings.processes
    base = [sys.executable, "-m", "conveyor", "worker", *shared]
    names = [f"{worker_settings.name}-{i}" for i in range(1, count + 1)] if worker_settings.name else None
    commands = [[*base, "--name", names[i]] if names else base for i in range(count)]
    log.info("supervising %d worker processes of %s", count, reference)
    return Supervisor(commands, labels=names).run()
