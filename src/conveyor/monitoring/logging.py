"""Process-wide log output: structlog in front of the standard library, configured once per command.

The library logs through ``logging.getLogger("conveyor...")``; ``configure_logging`` puts one handler on
the root logger whose structlog formatter renders those records (and structlog's own) either for people
(``console``: time, level, event, then ``key=value`` pairs) or for collectors (``json``: one object per
line with ``timestamp``, ``level``, ``logger`` and ``event``). Output goes to stderr so that a command's
stdout stays clean for its result (``--json``).

Every line passes through :func:`redact_secrets` last, so a URL with a password that slips into a message
is masked before it is written: logs are copied to places a database password must never reach.
"""

from __future__ import annotations

import logging
import re
import sys
from typing import Any, Literal, TextIO

import structlog
from structlog.typing import EventDict, Processor, WrappedLogger

__all__ = ["configure_logging", "redact_secrets"]

LogFormatName = Literal["console", "json"]

# scheme://user:password@host -> scheme://user:***@host. Deliberately loose: masking a false positive in
# a log line costs nothing, leaking a password costs a rotation.
_URL_PASSWORD = re.compile(r"(?P<prefix>\b[a-zA-Z][a-zA-Z0-9+.-]*://[^:/?#@\s]*:)(?P<password>[^@\s]+)(?P<at>@)")
_MASK = "***"

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}


def _mask(value: Any) -> Any:
    if isinstance(value, str):
        return _URL_PASSWORD.sub(lambda m: f"{m['prefix']}{_MASK}{m['at']}", value)
    if isinstance(value, dict):
        return {key: _mask(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_mask(item) for item in value]
    return value


def redact_secrets(logger: WrappedLogger, method_name: str, event_dict: EventDict) -> EventDict:
    """A structlog processor masking URL passwords in every string of the event, nested ones included."""
    for key, value in event_dict.items():
        event_dict[key] = _mask(value)
    return event_dict


def _drop_formatter_leftovers(logger: WrappedLogger, method_name: str, event_dict: EventDict) -> EventDict:
    # Another handler's Formatter, run on the same record before ours, stores these on it; ExtraAdder would
    # take them for `extra=` values and repeat the message. The stdlib forbids them as real extras.
    event_dict.pop("message", None)
    event_dict.pop("asctime", None)
    return event_dict


class _ConveyorHandler(logging.StreamHandler[TextIO]):
    """Our root handler, recognisable so a second ``configure_logging`` replaces it instead of doubling."""


def configure_logging(level: str = "info", fmt: LogFormatName = "console", *, stream: TextIO | None = None) -> None:
    """Send every log record of the process to ``stream`` (default stderr) at ``level`` or above.

    ``level`` is ``debug``, ``info``, ``warning`` or ``error``; ``fmt`` is ``console`` or ``json``.
    Safe to call more than once: the last call wins.
    """
    numeric = _LEVELS.get(level.lower())
    if numeric is None:
        raise ValueError(f"unknown log level {level!r}; use one of {', '.join(_LEVELS)}")
    if fmt not in ("console", "json"):
        raise ValueError(f"unknown log format {fmt!r}; use console or json")
    output = stream if stream is not None else sys.stderr

    # Run for records from both worlds before rendering: stdlib records ("foreign") lack these keys.
    shared: list[Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=fmt == "json"),
    ]
    renderer: Processor
    if fmt == "json":
        # Never the frames' local variables: they hold task arguments and, sooner or later, a password.
        tracebacks: Processor = structlog.processors.ExceptionRenderer(
            structlog.tracebacks.ExceptionDictTransformer(show_locals=False)
        )
        renderer = structlog.processors.JSONRenderer()
    else:
        # Plain text, rendered before redaction so that it is redacted too; rich's boxes survive neither
        # grep nor copy and paste.
        tracebacks = structlog.processors.format_exc_info
        renderer = structlog.dev.ConsoleRenderer(colors=_is_tty(output))
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[
            *shared,
            structlog.stdlib.PositionalArgumentsFormatter(),
            # `log.info(..., extra={"task_id": ...})` becomes keys, like structlog's own key/values.
            structlog.stdlib.ExtraAdder(),
            _drop_formatter_leftovers,
        ],
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            tracebacks,
            redact_secrets,
            renderer,
        ],
    )
    handler = _ConveyorHandler(output)
    handler.setFormatter(formatter)

    root = logging.getLogger()
    for old in [h for h in root.handlers if isinstance(h, _ConveyorHandler)]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(numeric)
    # SQLAlchemy echoes every statement, with its parameters (user data), as soon as its logger is
    # enabled for INFO; alembic narrates each step of a migration the CLI reports itself.
    for library in ("sqlalchemy", "alembic"):
        logging.getLogger(library).setLevel(max(numeric, logging.WARNING))

    structlog.configure(
        processors=[
            *shared,
            structlog.stdlib.PositionalArgumentsFormatter(),
            structlog.processors.StackInfoRenderer(),
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=True,
    )


def _is_tty(stream: Any) -> bool:
    isatty = getattr(stream, "isatty", None)
    return bool(isatty()) if callable(isatty) else False
