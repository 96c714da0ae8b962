"""``conveyor up``: everything in one process for a first run or a laptop.

The database (the embedded PostgreSQL unless a ``database_url`` is configured) is started and
migrated, then the services run side by side on one event loop until SIGTERM/SIGINT stops them all.
They are the worker, the scheduler and the HTTP API; on the first start (no admin API key exists yet)
an admin key is made and printed once.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import typer

from conveyor.app import App
from conveyor.cli.api import ApiServer, HostOption, PortOption, first_admin_key
from conveyor.cli.common import (
    AppOption,
    ConfigOption,
    DatabaseUrlOption,
    EarlySignals,
    LogFormatOption,
    LogLevelOption,
    exit_leaving_threads,
    import_app,
    load,
    opened,
)
from conveyor.config import Settings
from conveyor.db import migrate
from conveyor.db.urls import redact
from conveyor.scheduler import Scheduler
from conveyor.worker.worker import Worker

log = logging.getLogger("conveyor.cli.up")


class Service(Protocol):
    """A long-running part of ``up``."""

    @property
    def name(self) -> str: ...

    async def run(self) -> None:
        """Run until stopped; returning (or raising) on its own stops the other services too."""

    def stop(self) -> None:
        """Begin a graceful stop; a second call means stop now."""


@dataclass
class WorkerService:
    worker: Worker
    name: str = "worker"

    async def run(self) -> None:
        await self.worker.run()

    def stop(self) -> None:
        self.worker.request_stop()


@dataclass
class SchedulerService:
    scheduler: Scheduler
    name: str = "scheduler"

    async def run(self) -> None:
        await self.scheduler.run()

    def stop(self) -> None:
        self.scheduler.request_stop()


def up(
    app_ref: AppOption = None,
    database_url: DatabaseUrlOption = None,
    log_level: LogLevelOption = None,
    log_format: LogFormatOption = None,
    host: HostOption = None,
    port: PortOption = None,
    config: ConfigOption = None,
) -> None:
    """Start the database (embedded unless one is configured), migrate it and run a worker, the scheduler and
    the HTTP API, until SIGTERM."""
    signals = EarlySignals().install()
    overrides = {"worker.app": app_ref, "database_url": database_url, "log_level": log_level, "log_format": log_format}
    settings = load(config, {**overrides, "api.host": host, "api.port": port})
    reference = settings.worker.app
    if reference is not None:
        app = import_app(reference, settings)
    else:
        app = App(settings=settings)
        log.warning("no --app given: the worker knows no tasks and will fail every task it claims")
    with opened(app):
        url = app.database_url  # starts the embedded server when no URL is configured
        migrate.upgrade(url)
        typer.echo(f"database: {redact(url)}")
        services = _services(app, settings, reference)
        _announce_api(app, services)
        asyncio.run(_run_services(app, services, signals))
        signals.service_done()
    busy_threads = sum(s.worker.executor.busy_threads for s in services if isinstance(s, WorkerService))
    if busy_threads:
        exit_leaving_threads(busy_threads)


def _services(app: App, settings: Settings, reference: str | None) -> list[Service]:
    services: list[Service] = [WorkerService(Worker(app, app_ref=reference))]
    if settings.scheduler.enabled:
        # Code schedules are synchronised only from a loaded app: an empty one would disable them all.
        services.append(SchedulerService(Scheduler(app, sync=reference is not None)))
    services.append(ApiServer(app, settings.api.host, settings.api.port))
    return services


def _announce_api(app: App, services: Sequence[Service]) -> None:
    for service in services:
        if isinstance(service, ApiServer):
            typer.echo(f"api: {service.url} (docs: {service.url}/docs)")
    key = app.run_sync(first_admin_key(app))
    if key is not None:
        typer.echo(f"admin API key (shown this once, keep it): {key}")


async def _run_services(app: App, services: Sequence[Service], signals: EarlySignals) -> None:
    stopping = False

    def stop_all(reason: str) -> None:
        nonlocal stopping
        log.info("stopping %s: %s", ", ".join(s.name for s in services), reason)
        stopping = True
        for service in services:
            service.stop()

    def on_signal(sig: signal.Signals) -> None:
        # Each signal is passed on once: the second one turns the graceful stop into an abort.
        stop_all(f"received {sig.name}")

    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal, sig)
    for signum in signals.received:
        on_signal(signal.Signals(signum))
    running = {asyncio.create_task(service.run(), name=service.name): service for service in services}
    for service in services:
        typer.echo(f"{service.name} started")
    try:
        pending = set(running)
        while pending:
            done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            if pending and not stopping:
                # Half a system is not "up": when one part ends, end the rest.
                stop_all(", ".join(f"{running[t].name} ended" for t in done))
        for task in running:
            task.result()  # re-raise the first failure
    finally:
        await app.aclose()
