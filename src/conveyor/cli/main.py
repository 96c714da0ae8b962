"""The ``conveyor`` command: its sub-commands, and one rule for every error a user can cause.

A usage mistake, a bad setting or a refused request is reported as a single line on stderr,
``conveyor: error: <message>``, with exit code 2 and no traceback: it is the user's input that needs
fixing, not our code. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import NoReturn

import psycopg
import sqlalchemy.exc
import typer
from typer.exceptions import TyperException

from conveyor.cli.api import api, api_keys
from conveyor.cli.common import BadInput
from conveyor.cli.db import db
from conveyor.cli.enqueue import enqueue
from conveyor.cli.queues import queues
from conveyor.cli.scheduler import scheduler, schedules
from conveyor.cli.tasks import tasks
from conveyor.cli.up import up
from conveyor.cli.worker import worker
from conveyor.db.errors import translate_errors
from conveyor.errors import ConveyorError, DatabaseError

#: Exit code for input the user must fix (the code click uses for usage errors).
BAD_INPUT = 2

app = typer.Typer(
    name="conveyor",
    help="Conveyor: a distributed task queue on PostgreSQL.",
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
app.command(help=worker.__doc__)(worker)
app.command(help=up.__doc__)(up)
app.command(help=enqueue.__doc__)(enqueue)
app.add_typer(tasks, name="tasks")
app.add_typer(queues, name="queues")
app.add_typer(db, name="db")
app.command(help=scheduler.__doc__)(scheduler)
app.add_typer(schedules, name="schedules")
app.command(help=api.__doc__)(api)
app.add_typer(api_keys, name="api-keys")


@app.callback(invoke_without_command=True)
def _root(ctx: typer.Context) -> None:
    """Conveyor: a distributed task queue on PostgreSQL."""
    if ctx.invoked_subcommand is None:
        typer.echo(ctx.get_help())
        raise typer.Exit(BAD_INPUT)


def run(argv: Sequence[str] | None = None) -> int:
    """Run the command line ``argv`` (default ``sys.argv[1:]``) and return the process exit code."""
    command = typer.main.get_command(app)
    try:
        # standalone_mode=False: errors come back to us instead of being drawn as a multi-line box.
        result = command.main(
            args=list(argv) if argv is not None else None, prog_name="conveyor", standalone_mode=False
        )
    except TyperException as exc:
        return _report(_usage_message(exc), exc.exit_code)
    except (ConveyorError, BadInput) as exc:
        return _report(str(exc))
    except (sqlalchemy.exc.DBAPIError, psycopg.Error) as exc:
        # Most database errors are translated where they happen; these come from places that are not.
        return _report(str(_translated(exc)))
    return result if isinstance(result, int) else 0


def main(argv: Sequence[str] | None = None) -> NoReturn:
    """Entry point of the ``conveyor`` script and of ``python -m conveyor``."""
    sys.exit(run(argv))


def _report(message: str, code: int = BAD_INPUT) -> int:
    # One line, whatever the message: multi-line errors (every invalid setting, a server log tail) are
    # joined so that scripts and log collectors see one record per failure.
    lines = [line.strip() for line in message.strip().splitlines() if line.strip()]
    text = "; ".join(lines).replace(":;", ":") or "unknown error"
    print(f"conveyor: error: {text}", file=sys.stderr, flush=True)
    return code


def _usage_message(exc: TyperException) -> str:
    message = exc.format_message()
    ctx = getattr(exc, "ctx", None)
    command_path = getattr(ctx, "command_path", None)
    if command_path:
        return f"{message} (see '{command_path} --help')"
    return message


def _translated(exc: Exception) -> DatabaseError:
    try:
        with translate_errors():
            raise exc
    except DatabaseError as translated:
        return translated
    return DatabaseError(f"database error: {type(exc).__name__}")  # pragma: no cover - translate always raises
