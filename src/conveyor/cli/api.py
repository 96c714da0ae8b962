"""``conveyor api``: serve the HTTP API; ``conveyor api-keys``: make, list and revoke API keys.

The API is served by uvicorn. With one worker (the default) it runs in this process on our own event
loop, its socket bound before anything starts (so a busy port is one clear error) and its signals
handled by us, which is also how ``conveyor up`` runs it beside a worker. With ``--workers N`` uvicorn
supervises N processes, each building the app from the environment this command passes down.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import socket
import threading
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager, suppress
from functools import partial
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Annotated, TypeVar

import typer

from conveyor.api.auth import Scope, new_key
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
    run_with_app,
)
from conveyor.config import Settings
from conveyor.db.api_key_store import ApiKeyRecord, ApiKeyStore

if TYPE_CHECKING:
    import uvicorn
    from fastapi import FastAPI

T = TypeVar("T")
log = logging.getLogger("conveyor.cli.api")

HostOption = Annotated[
    str | None, typer.Option("--host", help="Interface to bind (default 127.0.0.1).", show_default=False)
]
PortOption = Annotated[
    int | None, typer.Option("--port", help="TCP port (default 8000; 0 picks a free one).", show_default=False)
]
WorkersOption = Annotated[
    int | None, typer.Option("--workers", help="Server processes (default 1).", min=1, show_default=False)
]

#: Seconds open requests get to finish after a stop signal (a second signal stops at once).
GRACEFUL_SHUTDOWN_S = 10
#: Connections the kernel queues before they are accepted (uvicorn's default).
_BACKLOG = 2048


class _NoColorMessage(logging.Filter):
    """uvicorn attaches an ANSI-coloured copy of some messages as an extra; our formatter would print it."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.__dict__.pop("color_message", None)
        return True


logging.getLogger("uvicorn.error").addFilter(_NoColorMessage())


def _uvicorn_server(config: uvicorn.Config) -> uvicorn.Server:
    """uvicorn, minus its signal handlers: whoever runs it owns the signals (``conveyor up`` stops the
    worker and the API together)."""
    import uvicorn

    class Server(uvicorn.Server):
        @contextmanager
        def capture_signals(self) -> Iterator[None]:
            yield

    return Server(config)


class ApiServer:
    """The API as a long-running service (the ``Service`` of ``conveyor up``)."""

    name = "api"

    def __init__(self, app: App, host: str, port: int) -> None:
        # Imported here: every `conveyor` command imports this module, few of them serve HTTP.
        import uvicorn

        from conveyor.api.app import create_app
        from conveyor.api.operations import end_streams

        self.socket = _bind(host, port)
        api = create_app(app)
        self._end_streams = partial(end_streams, api)
        config = uvicorn.Config(
            api,
            log_config=None,  # our logging is already set up; uvicorn's records go through it
            timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S,
            proxy_headers=True,  # trusts X-Forwarded-For from 127.0.0.1 only (uvicorn's default)
        )
        self.server = _uvicorn_server(config)
        bound_port = int(self.socket.getsockname()[1])
        shown = f"[{host}]" if ":" in host else host
        self.url = f"http://{shown}:{bound_port}"

    async def run(self) -> None:
        await self.server.serve(sockets=[self.socket])

    def stop(self) -> None:
        if self.server.should_exit:
            self.server.force_exit = True  # the second request: drop open connections
        else:
            # uvicorn lets open responses finish (up to GRACEFUL_SHUTDOWN_S) before the app's own
            # shutdown runs, and an event stream never finishes by itself: end the streams now.
            self._end_streams()
        self.server.should_exit = True


def api(
    app_ref: AppOption = None,
    host: HostOption = None,
    port: PortOption = None,
    workers: WorkersOption = None,
    database_url: DatabaseUrlOption = None,
    log_level: LogLevelOption = None,
    log_format: LogFormatOption = None,
    config: ConfigOption = None,
) -> None:
    """Serve the HTTP API (docs at /docs) until SIGTERM/SIGINT.

    Without --app any task name can be enqueued (the tasks may be defined in another code base); with
    --app, names must be the app's tasks.
    """
    signals = EarlySignals().install()
    overrides = {
        "worker.app": app_ref,
        "api.host": host,
        "api.port": port,
        "api.workers": workers,
        "database_url": database_url,
        "log_level": log_level,
        "log_format": log_format,
    }
    settings = load(config, overrides)
    app = _load_app(settings)
    with opened(app):
        if settings.database_url is not None:
            app.check_schema()
        database = app.database_url  # starts (and migrates) the embedded server when none is configured
        if settings.api.workers > 1:
            _serve_processes(settings, database, config)
        else:
            server = ApiServer(app, settings.api.host, settings.api.port)
            typer.echo(f"api: {server.url} (docs: {server.url}/docs)")
            asyncio.run(_serve(app, server, signals))
        signals.service_done()


async def _serve(app: App, server: ApiServer, signals: EarlySignals) -> None:
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, server.stop)
    signals.replay(server.stop)
    try:
        await server.run()
    finally:
        await app.aclose()


def _serve_processes(settings: Settings, database_url: str, config: Path | None) -> None:
    # The children are new interpreters: they get their settings the way any process does, from the
    # environment (and the config file), which we set here to what this command resolved.
    passed = {
        "CONVEYOR_DATABASE_URL": database_url,
        "CONVEYOR_LOG_LEVEL": settings.log_level,
        "CONVEYOR_LOG_FORMAT": settings.log_format,
    }
    if settings.worker.app is not None:
        passed["CONVEYOR_WORKER__APP"] = settings.worker.app
    if config is not None:
        passed["CONVEYOR_CONFIG"] = str(config.absolute())
    os.environ.update(passed)
    import uvicorn

    host, port = settings.api.host, settings.api.port
    typer.echo(f"api: http://{host}:{port} ({settings.api.workers} processes)")
    uvicorn.run(
        "conveyor.cli.api:app_factory",
        factory=True,
        host=host,
        port=port,
        workers=settings.api.workers,
        log_config=None,
        timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S,
    )


def app_factory() -> FastAPI:
    """What each process of ``conveyor api --workers N`` serves (uvicorn imports it by name)."""
    from conveyor.api.app import create_app

    settings = load(None)
    api = create_app(_load_app(settings), close_on_shutdown=True)
    _end_streams_on_stop_signals(api)
    return api


def _end_streams_on_stop_signals(api: FastAPI) -> None:
    """In a process of ``conveyor api --workers N``: end the event streams as soon as a stop signal
    arrives, then let uvicorn's own handler (which called this factory) do the rest.

    uvicorn runs this process's signals, and after a stop signal it waits for open responses before
    the application's shutdown runs; an event stream never ends by itself, so without this every stop
    would take the whole graceful timeout. The stream ending is handed to the event loop (signal
    handlers must not touch asyncio objects), and uvicorn restores its handlers' predecessors when it
    stops, which removes this one too. If uvicorn has no handler installed here (another uvicorn
    version, another caller), nothing is changed: the streams then end at the graceful timeout."""
    from conveyor.api.operations import end_streams

    if threading.current_thread() is not threading.main_thread():
        return  # signal handlers belong to the main thread, where uvicorn runs its server
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        return
    for sig in (signal.SIGTERM, signal.SIGINT):
        uvicorn_handler = signal.getsignal(sig)
        if not callable(uvicorn_handler):
            continue

        def on_stop(
            signum: int, frame: FrameType | None, handler: Callable[[int, FrameType | None], object] = uvicorn_handler
        ) -> None:
            with suppress(RuntimeError):  # the loop already closed: there are no streams left
                loop.call_soon_threadsafe(end_streams, api)
            handler(signum, frame)

        signal.signal(sig, on_stop)


def _load_app(settings: Settings) -> App:
    reference = settings.worker.app
    if reference is not None:
        return import_app(reference, settings)
    return App(settings=settings, strict_names=False)


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        # Listening from here on: a client that read the printed URL while the server was still
        # starting waits in the kernel's backlog until it is served, rather than being refused.
        sock.listen(_BACKLOG)
    except OSError as exc:
        sock.close()
        raise BadInput(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    return sock


# -- first start --------------------------------------------------------------------------------------


async def first_admin_key(app: App) -> str | None:
    """Make an admin key if none exists yet (the first start of ``conveyor up``); ``None`` otherwise.

    Safe when several processes start at once: only one makes it."""
    made = new_key()
    store = ApiKeyStore(app.runtime().engine)
    record = await store.create_first_admin(
        name="first admin (conveyor up)", prefix=made.prefix, key_hash=made.key_hash
    )
    return None if record is None else made.key


# -- api-keys -----------------------------------------------------------------------------------------

api_keys = typer.Typer(help="Make, list and revoke API keys.")


@api_keys.callback(invoke_without_command=True)
def _group(ctx: typer.Context) -> None:
    if ctx.invoked_subcommand is None:
        typer.echo(ctx.get_help())
        raise typer.Exit(2)


@api_keys.command("create")
def create_key(
    scopes: Annotated[
        str,
        typer.Option("--scopes", help="Comma-separated: tasks:read, tasks:write, admin.", show_default=False),
    ],
    name: Annotated[str, typer.Option("--name", help="What the key is for.")] = "cli",
    as_json: JsonOption = False,
    database_url: DatabaseUrlOption = None,
    config: ConfigOption = None,
) -> None:
    """Make an API key and print it. It is shown this once (only its hash is stored): keep it now."""
    wanted = _scopes(scopes)
    if not 1 <= len(name) <= 100:
        raise BadInput("--name must be 1 to 100 characters")
    made = new_key()

    async def create(store: ApiKeyStore) -> ApiKeyRecord:
        return await store.create(name=name, prefix=made.prefix, key_hash=made.key_hash, scopes=wanted)

    record = _with_keys(config, database_url, create)
    if as_json:
        typer.echo(json.dumps({**_key_data(record), "key": made.key}))
        return
    typer.echo(made.key)
    typer.echo(f"key {record.id} ({record.name}, scopes {', '.join(record.scopes)}): shown once, keep it now", err=True)


@api_keys.command("list")
def list_keys(as_json: JsonOption = False, database_url: DatabaseUrlOption = None, config: ConfigOption = None) -> None:
    """List API keys (never the keys themselves: they are not stored)."""

    async def fetch(store: ApiKeyStore) -> list[ApiKeyRecord]:
        return await store.list()

    records = _with_keys(config, database_url, fetch)
    if as_json:
        typer.echo(json.dumps([_key_data(r) for r in records]))
        return
    for r in records:
        status = "revoked" if r.revoked_at else "active"
        used = r.last_used_at.isoformat(timespec="seconds") if r.last_used_at else "never used"
        typer.echo(f"{r.id}\t{r.prefix}...\t{status}\t{','.join(r.scopes)}\t{used}\t{r.name}")


@api_keys.command("revoke")
def revoke_key(
    key_id: Annotated[int, typer.Argument(help="The key's id (see `api-keys list`).", metavar="ID", min=1)],
    database_url: DatabaseUrlOption = None,
    config: ConfigOption = None,
) -> None:
    """Revoke an API key; servers stop accepting it within 2 seconds."""

    async def revoke(store: ApiKeyStore) -> ApiKeyRecord | None:
        return await store.revoke(key_id)

    if _with_keys(config, database_url, revoke) is None:
        raise BadInput(f"no API key with id {key_id}")
    typer.echo(f"revoked key {key_id}")


def _scopes(text: str) -> list[str]:
    given = [part.strip() for part in text.split(",") if part.strip()]
    known = {s.value for s in Scope}
    unknown = [s for s in given if s not in known]
    if not given or unknown:
        raise BadInput(f"--scopes must list one or more of {', '.join(sorted(known))} (got {text!r})")
    return given


def _with_keys(config: Path | None, database_url: str | None, work: Callable[[ApiKeyStore], Awaitable[T]]) -> T:
    settings = load(config, {"database_url": database_url})
    with opened(App(settings=settings, strict_names=False)) as app:
        return run_with_app(app, lambda a: work(ApiKeyStore(a.runtime().engine)))


def _key_data(record: ApiKeyRecord) -> dict[str, object]:
    return {
        "id": record.id,
        "name": record.name,
        "prefix": record.prefix,
        "scopes": list(record.scopes),
        "created_at": record.created_at.isoformat(),
        "last_used_at": record.last_used_at.isoformat() if record.last_used_at else None,
        "revoked_at": record.revoked_at.isoformat() if record.revoked_at else None,
    }
