"""``conveyor up``: everything in one process for a first run or a laptop.

The database (the embedded PostgreSQL unless a ``database_url`` is configured) is started and
migrated, then the services run side by side on one event loop until SIGTERM/SIGINT stops them all.
Today that is the worker; the API server and the scheduler join :func:`_services` as further
:class:`Service` values without touching the rest.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Annotated, Protocol

import typer

from conveyor.app import App
from conveyor.cli.common import (
    AppOption,
    ConfigOption,
    DatabaseUrlOption,
    EarlySignals,
    exit_leaving_threads,
    import_app,
    load,
    opened,
)
from conveyor.config import Settings
from conveyor.db import migrate
from conveyor.db.urls import redact
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


def up(
    app_ref: AppOption = None,
    database_url: DatabaseUrlOption = None,
    log_level: Annotated[
        str | None, typer.Option("--log-level", help="debug, info, warning or error.", show_default=False)
    ] = None,
    log_format: Annotated[str | None, typer.Option("--log-format", help="console or json.", show_default=False)] = None,
    config: ConfigOption = None,
) -> None:
    """Start the database (embedded unless one is configured), migrate it and run a worker, until SIGTERM."""
    signals = EarlySignals().install()
    overrides = {"worker.app": app_ref, "database_url": database_url, "log_level": log_level, "log_format": log_format}
    settings = load(config, overrides)
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
        asyncio.run(_run_services(app, services, signals))
        signals.service_done()
    busy_threads = sum(s.worker.executor.busy_threads for s in services if isinstance(s, WorkerService))
    if busy_threads:
        exit_leaving_threads(busy_threads)


def _services(app: App, settings: Settings, reference: str | None) -> list[Service]:
    return [WorkerService(Worker(app, app_ref=reference))]


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
