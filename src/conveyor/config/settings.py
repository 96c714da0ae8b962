"""The settings models: one frozen tree, validated once at start-up and passed down as a value.

Every model forbids unknown keys so that a typo (``concurency``) fails loudly instead of being ignored.
Durations carry an ``_s`` suffix and are float seconds, so sub-second values such as ``0.1`` work.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    SecretStr,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from conveyor.config.redact import mask_secret

__all__ = [
    "ApiSettings",
    "EmbeddedSettings",
    "LogFormat",
    "LogLevel",
    "SchedulerSettings",
    "Settings",
    "WorkerSettings",
]

LogLevel = Literal["debug", "info", "warning", "error"]
LogFormat = Literal["console", "json"]

# The ``type`` of the error raised when one setting must exceed another; the loader recognises it to name
# both keys and both sources.
MUST_EXCEED = "must_exceed"

_APP_PATTERN = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*(\.[A-Za-z_]\w*)*")


def _blank_to_none(value: object) -> object:
    # `CONVEYOR_DATABASE_URL=` in a compose file or `port =` in an INI file means "not set", and
    # neither source can express a real null.
    if isinstance(value, str) and not value.strip():
        return None
    return value


def _split_commas(value: object) -> object:
    # Environment variables and INI values cannot hold a list, so "a, b" stands for ["a", "b"].
    if isinstance(value, str):
        value = value.split(",")
    if isinstance(value, list | tuple):
        items = (item.strip() if isinstance(item, str) else item for item in value)
        # A trailing comma ("a,b,") is a slip, not an empty name.
        return tuple(item for item in items if item != "")
    return value


def _lowercase(value: object) -> object:
    # LOG_LEVEL=INFO is what people type.
    return value.lower() if isinstance(value, str) else value


def _check_queue_names(queues: tuple[str, ...]) -> tuple[str, ...]:
    if not queues:
        raise ValueError("must name at least one queue")
    duplicates = sorted({name for name in queues if queues.count(name) > 1})
    if duplicates:
        raise ValueError(f"lists a queue more than once: {', '.join(duplicates)}")
    return queues


def _must_exceed(section: BaseModel, field: str, other: str) -> None:
    value, floor = getattr(section, field), getattr(section, other)
    if value <= floor:
        raise PydanticCustomError(
            MUST_EXCEED,
            "{field} ({value}) must be greater than {other} ({floor})",
            {"field": field, "other": other, "value": value, "floor": floor},
        )


Seconds = Annotated[float, Field(gt=0, allow_inf_nan=False)]
"""A positive, finite duration in seconds."""

CommaList = Annotated[tuple[str, ...], BeforeValidator(_split_commas)]
"""A tuple of strings that also accepts one comma-separated string."""

Blankable = BeforeValidator(_blank_to_none)

Port = Annotated[int, Field(ge=1, le=65535)]


class _Section(BaseModel):
    # hide_input_in_errors: a ValidationError raised by direct use of these models must not print a
    # database password back; load_settings builds its own messages anyway.
    model_config = ConfigDict(
        frozen=True,
        extra="forbid",
        hide_input_in_errors=True,
        use_attribute_docstrings=True,
    )


class EmbeddedSettings(_Section):
    """The PostgreSQL server Conveyor starts itself when no ``database_url`` is given."""

    data_dir: Annotated[Path | None, Blankable] = None
    """Where the cluster lives; ``None`` uses the library's per-user data directory."""

    # The bounds sit on the int, not the optional: pydantic cannot compare None with them.
    port: Annotated[Port | None, Blankable] = None
    """TCP port of the embedded server; ``None`` picks a free one. Never 5432."""

    @field_validator("port")
    @classmethod
    def _not_the_system_port(cls, port: int | None) -> int | None:
        # 5432 almost always belongs to a system PostgreSQL; sharing it would connect us to the wrong server.
        if port == 5432:
            raise ValueError("5432 is left to a system PostgreSQL; choose another port")
        return port


class WorkerSettings(_Section):
    """How a worker process claims and runs tasks."""

    app: Annotated[str | None, Blankable] = None
    """The application to load, as ``"package.module:attribute"``."""

    queues: Annotated[CommaList, AfterValidator(_check_queue_names)] = ("default",)
    """Queues to consume; a list or a comma-separated string such as ``"emails,reports"``."""

    concurrency: int = Field(default=10, ge=1, le=10_000)
    """Tasks run at once by each worker process."""

    processes: int = Field(default=1, ge=1, le=256)
    """Worker processes started by the supervisor."""

    name: Annotated[str | None, Blankable] = None
    """A readable worker name; ``None`` derives one from host and pid."""

    batch_size: int = Field(default=0, ge=0, le=1000)
    """Tasks claimed per database round trip; 0 means the same as ``concurrency``."""

    heartbeat_interval_s: Seconds = 2.0
    """Seconds between lease renewals of running tasks."""

    lease_timeout_s: Seconds = 30.0
    """Seconds without a heartbeat after which a task's lease expires; must exceed the heartbeat interval."""

    rescue_interval_s: Seconds = 5.0
    """Seconds between sweeps that requeue tasks whose lease expired."""

    poll_interval_s: Seconds = 1.0
    """Seconds between polls for new tasks when no notification arrives."""

    shutdown_grace_s: float = Field(default=30.0, ge=0, allow_inf_nan=False)
    """Seconds running tasks get to finish after a shutdown signal; 0 stops at once."""

    max_worker_losses: int = Field(default=3, ge=1)
    """A task whose worker dies this many times while running it goes to dead."""

    process_pool_size: int = Field(default=0, ge=0)
    """Processes for CPU-bound tasks; 0 means one per CPU."""

    @field_validator("app")
    @classmethod
    def _app_reference(cls, app: str | None) -> str | None:
        if app is not None and not _APP_PATTERN.fullmatch(app):
            raise ValueError("must look like 'package.module:attribute'")
        return app

    @model_validator(mode="after")
    def _lease_outlives_heartbeat(self) -> WorkerSettings:
        # A lease shorter than the heartbeat expires between renewals and healthy tasks get rescued twice.
        _must_exceed(self, "lease_timeout_s", "heartbeat_interval_s")
        return self

    @property
    def claim_batch_size(self) -> int:
        """Tasks to claim per round trip, with 0 resolved to ``concurrency``."""
        return self.batch_size or self.concurrency

    @property
    def pool_size(self) -> int:
        """Processes in the CPU-bound pool, with 0 resolved to the CPU count (at least 1)."""
        return self.process_pool_size or max(1, os.cpu_count() or 1)


class ApiSettings(_Section):
    """The HTTP API server."""

    host: str = "127.0.0.1"
    """Interface to bind; the loopback default keeps the API private until asked otherwise."""

    port: int = Field(default=8000, ge=0, le=65535)
    """TCP port to bind; 0 lets the operating system choose (useful in tests)."""

    workers: int = Field(default=1, ge=1)
    """Server processes."""

    debug_routes: bool = False
    """Mount the /debug routes; never enable in production."""

    cors_origins: CommaList = ()
    """Origins allowed by CORS; a list or a comma-separated string. Empty disables CORS."""

    search_page_budget_s: Seconds = 0.25
    """Seconds a search may scan for one page before it answers with a partial page and a cursor."""

    search_count_budget_s: Seconds = 0.1
    """Seconds a search may count after its page; past it the count is a lower bound."""


class SchedulerSettings(_Section):
    """The periodic-task scheduler; one leader at a time enqueues due runs."""

    enabled: bool = True
    """Run the scheduler in this process."""

    tick_interval_s: Seconds = 1.0
    """Seconds between checks for due schedules."""

    leader_lease_s: Seconds = 10.0
    """Seconds a leader holds its lease without renewing; must exceed the tick interval."""

    max_clock_skew_s: Seconds = 2.0
    """Largest clock difference between hosts that the scheduler tolerates."""

    run_retention_s: float = Field(default=604_800.0, ge=60, allow_inf_nan=False)
    """Seconds a schedule's runs are kept, by fire time (default 7 days); the leader prunes older ones."""

    run_keep_newest: int = Field(default=100, ge=0, le=1_000_000)
    """Runs of each schedule kept whatever their age, so a rarely firing schedule keeps its history."""

    retention_interval_s: Seconds = 600.0
    """Seconds between the leader's retention passes (old runs, rows of vanished scheduler processes)."""

    stale_retention_s: Seconds = 3600.0
    """Seconds a scheduler process that stopped reporting without stopping (killed, host lost) stays
    listed as stale before its row is deleted."""

    @model_validator(mode="after")
    def _lease_outlives_tick(self) -> SchedulerSettings:
        # The leader renews once per tick; a shorter lease would change leaders on every tick.
        _must_exceed(self, "leader_lease_s", "tick_interval_s")
        return self


def _check_url_scheme(url: SecretStr | None, schemes: frozenset[str], example: str) -> SecretStr | None:
    if url is None:
        return None
    # "postgresql+psycopg" is an SQLAlchemy driver spelling of "postgresql".
    scheme = urlsplit(url.get_secret_value()).scheme.partition("+")[0].lower()
    if scheme not in schemes:
        # Never echo the value: it may carry a password.
        raise ValueError(f"must be a URL such as {example}")
    return url


class Settings(_Section):
    """Everything Conveyor can be configured with. Build it with ``load_settings()``."""

    database_url: Annotated[SecretStr | None, Blankable] = None
    """PostgreSQL URL; ``None`` starts the embedded PostgreSQL."""

    redis_url: Annotated[SecretStr | None, Blankable] = None
    """Optional Redis URL for the event fan-out."""

    payload_limit_bytes: int = Field(default=1_048_576, gt=0)
    """Largest JSON-encoded size of a task's args and kwargs, and of its result."""

    traceback_limit_bytes: int = Field(default=16_384, gt=0)
    """Stored tracebacks are cut to this many bytes."""

    log_level: Annotated[LogLevel, BeforeValidator(_lowercase)] = "info"
    """Least severe level logged."""

    log_format: Annotated[LogFormat, BeforeValidator(_lowercase)] = "console"
    """``console`` for people, ``json`` for log collectors."""

    embedded: EmbeddedSettings = Field(default_factory=EmbeddedSettings)
    worker: WorkerSettings = Field(default_factory=WorkerSettings)
    api: ApiSettings = Field(default_factory=ApiSettings)
    scheduler: SchedulerSettings = Field(default_factory=SchedulerSettings)

    @field_validator("database_url")
    @classmethod
    def _postgres_url(cls, url: SecretStr | None) -> SecretStr | None:
        return _check_url_scheme(url, frozenset({"postgresql", "postgres"}), "postgresql://user@host:5432/db")

    @field_validator("redis_url")
    @classmethod
    def _redis_url(cls, url: SecretStr | None) -> SecretStr | None:
        return _check_url_scheme(url, frozenset({"redis", "rediss", "unix"}), "redis://host:6379/0")

    def redacted(self) -> dict[str, Any]:
        """All settings as JSON-ready data with secrets masked, for logs and the admin endpoint.

        A URL keeps its user, host, port and database and loses its password:
        ``postgresql://user:***@host:5432/db``.
        """
        return _redact(self)


def _redact(model: BaseModel) -> dict[str, Any]:
    data = model.model_dump(mode="json")
    for name in type(model).model_fields:
        value = getattr(model, name)
        if isinstance(value, SecretStr):
            data[name] = mask_secret(value.get_secret_value())
        elif isinstance(value, BaseModel):
            data[name] = _redact(value)
    return data
