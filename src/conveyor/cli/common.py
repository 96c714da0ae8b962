"""What every command does first: build the settings once from file, environment and the flags given,
set up logging from them, and find the user's app."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import sys
from collections.abc import Awaitable, Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from types import FrameType
from typing import Annotated, Any, NoReturn, Protocol, TypeVar

import typer

from conveyor.app import App, load_app
from conveyor.config import Settings, load_settings
from conveyor.monitoring.logging import configure_logging

T = TypeVar("T")


class BadInput(Exception):
    """A command-line value that cannot be used; reported as one ``conveyor: error:`` line, exit code 2."""


ConfigOption = Annotated[
    Path | None,
    typer.Option(
        "--config",
        help="Settings file (YAML, TOML, JSON or INI); default $CONVEYOR_CONFIG, else ./conveyor.<ext>.",
        dir_okay=False,
        show_default=False,
    ),
]
DatabaseUrlOption = Annotated[
    str | None,
    typer.Option(
        "--database-url",
        help="PostgreSQL URL (overrides the settings); without one the embedded server is used.",
        show_default=False,
    ),
]
AppOption = Annotated[
    str | None,
    typer.Option("--app", help="The app, as package.module:attribute.", show_default=False),
]
JsonOption = Annotated[bool, typer.Option("--json", help="Print JSON for scripts instead of a table.")]
LogLevelOption = Annotated[
    str | None, typer.Option("--log-level", help="debug, info, warning or error.", show_default=False)
]
LogFormatOption = Annotated[str | None, typer.Option("--log-format", help="console or json.", show_default=False)]


def load(config: Path | None, overrides: Mapping[str, Any] | None = None) -> Settings:
    """The process's settings (defaults < file < ``CONVEYOR_*`` < flags), with logging configured from them.

    ``overrides`` maps dotted keys to flag values; flags that were not given are ``None`` and so leave
    the lower layers alone.
    """
    settings = load_settings(config, overrides=dict(overrides or {}))
    configure_logging(settings.log_level, settings.log_format)
    return settings


def import_app(reference: str, settings: Settings) -> App:
    """Import the user's ``package.module:app`` and give it these settings (the flags must apply to it)."""
    # `python -m conveyor` puts the working directory on sys.path but the `conveyor` script does not;
    # people expect `conveyor worker --app tasks:app` to find ./tasks.py, as celery and uvicorn do.
    cwd = os.getcwd()
    if cwd not in sys.path and "" not in sys.path:
        sys.path.insert(0, cwd)
    app = load_app(reference)
    app.configure(settings)
    return app


@contextmanager
def opened(app: App) -> Iterator[App]:
    """Close the app's connections (and an embedded server it started) however the command ends."""
    try:
        yield app
    finally:
        app.close()


def run_with_app(app: App, work: Callable[[App], Awaitable[T]]) -> T:
    """Run ``work(app)`` on a fresh event loop and dispose of that loop's engine before it closes."""

    async def main() -> T:
        try:
            return await work(app)
        finally:
            await app.aclose()

    return asyncio.run(main())


def exit_leaving_threads(busy_threads: int) -> NoReturn:
    """Exit 0 now, without joining threads: call it after the app is closed.

    Task threads that ignored cancellation were released back to the queue, but Python joins worker
    threads at exit and would hang on them forever."""
    logging.getLogger("conveyor.cli").warning(
        "exiting with %d task threads still running (their tasks were released)", busy_threads
    )
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def parse_json(option: str, text: str | None, expected: type[T]) -> T | None:
    """Decode a JSON flag value and check its top-level type (``list`` for --args, ``dict`` for --kwargs)."""
    if text is None:
        return None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise BadInput(f"{option} is not valid JSON: {exc.msg} at line {exc.lineno}, column {exc.colno}") from None
    if not isinstance(value, expected):
        wanted = "array such as '[1, 2]'" if expected is list else "object such as '{\"key\": 1}'"
        raise BadInput(f"{option} must be a JSON {wanted}, not {_json_kind(value)}")
    return value


def _json_kind(value: object) -> str:
    kinds: list[tuple[type | tuple[type, ...], str]] = [
        (bool, "a boolean"),
        (dict, "an object"),
        (list, "an array"),
        (str, "a string"),
        ((int, float), "a number"),
    ]
    for kind, words in kinds:
        if isinstance(value, kind):
            return words
    return "null"


class EarlySignals:
    """SIGTERM/SIGINT that arrive before a long-running command's event loop handles them.

    Between process start and ``loop.add_signal_handler`` (imports, settings, the schema check) the
    default SIGTERM would kill the process outright, which a supervisor stopping its children would then
    see as a crash. Instead the first signal is remembered and replayed once the service runs, so it stops
    straight away and cleanly; a second one exits at once, since nothing is in flight yet.
    """

    def __init__(self) -> None:
        self.received: list[int] = []
        self._service_done = False

    def install(self) -> EarlySignals:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._record)
        return self

    def service_done(self) -> None:
        """The service has stopped: from now on a signal changes nothing (we are already on the way out).

        asyncio.run() resets the handlers to the defaults as its loop closes, so they are put back here."""
        self._service_done = True
        self.install()

    def _record(self, signum: int, frame: FrameType | None) -> None:
        self.received.append(signum)
        if len(self.received) > 1 and not self._service_done:
            raise SystemExit(128 + signum)

    def replay(self, stop: Callable[[], None]) -> None:
        """Call ``stop`` once per signal received so far."""
        for _ in self.received:
            stop()


class Service(Protocol):
    """A long-running component the CLI serves until a signal: a worker or a scheduler."""

    def install_signal_handlers(self) -> None: ...

    def request_stop(self) -> None: ...

    async def run(self) -> None: ...


def serve(app: App, service: Service, signals: EarlySignals) -> None:
    """Run ``service`` on a new event loop until it stops. A signal that arrived during start-up is
    replayed once its handlers are in place; the app's connections for that loop are closed after."""

    async def main() -> None:
        try:
            service.install_signal_handlers()
            signals.replay(service.request_stop)
            await service.run()
        finally:
            await app.aclose()

    asyncio.run(main())
    signals.service_done()
