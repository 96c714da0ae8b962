"""Request and response bodies of the HTTP API, typed precisely enough to generate clients from.

Ids are integers (workers: UUIDs), times are ISO 8601 with an offset, durations are seconds in fields
ending ``_s``. Request models forbid unknown fields, so a misspelt option is an error, not a silent
default. Task arguments, results and metadata are free JSON (nested at most 64 levels).
"""

from __future__ import annotations

import re
from datetime import datetime
from typing import Annotated, Any, Literal
from uuid import UUID

from pydantic import (
    AfterValidator,
    AwareDatetime,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    Strict,
    model_validator,
)

from conveyor.api.auth import Scope
from conveyor.core.states import TaskState

# -- shared field types -----------------------------------------------------------------------------

INT64_MAX = 2**63 - 1
INT32_MAX = 2**31 - 1
#: Ten years: a longer delay is a mistake, and would overflow the database's interval arithmetic.
MAX_DELAY_S = 315_576_000.0
MAX_JSON_DEPTH = 64

TASK_NAME_PATTERN = r"^[A-Za-z_][A-Za-z0-9_.:-]{0,199}$"
QUEUE_NAME_PATTERN = r"^[A-Za-z0-9_.:-]{1,100}$"

# Request bodies take numbers and times exactly as the document says: pydantic's lax mode would also
# take `false` for 0, "1.5" for 1.5 and 0.5 for a Unix time, which generated clients never send and
# schema-driven tests rightly call a violation.
StrictInt = Annotated[int, Strict()]
StrictFloat = Annotated[float, Strict(), Field(allow_inf_nan=False)]
_ISO_DATETIME = re.compile(r"\d{4}-\d{2}-\d{2}[Tt ]\d{2}:\d{2}")


def _iso_datetime(value: Any) -> Any:
    if isinstance(value, datetime):
        return value
    if not isinstance(value, str) or not _ISO_DATETIME.match(value):
        raise ValueError("must be an ISO 8601 date-time with an offset, such as 2030-01-01T09:00:00Z")
    return value


IsoDatetime = Annotated[AwareDatetime, BeforeValidator(_iso_datetime)]
"""A timezone-aware ISO 8601 date-time, for requests (query parameters and bodies alike)."""

TaskId = Annotated[StrictInt, Field(ge=1, le=INT64_MAX, description="A task id.")]
TaskName = Annotated[str, Field(pattern=TASK_NAME_PATTERN, max_length=200, description="A task's registered name.")]
QueueName = Annotated[str, Field(pattern=QUEUE_NAME_PATTERN, max_length=100, description="A queue name.")]
Priority = Annotated[StrictInt, Field(ge=-32768, le=32767, description="Higher runs first.")]
Key = Annotated[str, Field(min_length=1, max_length=255)]


def _bounded_json(value: Any) -> Any:
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if depth > MAX_JSON_DEPTH:
            raise ValueError(f"JSON nested more than {MAX_JSON_DEPTH} levels deep")
        if isinstance(item, dict):
            stack.extend((v, depth + 1) for v in item.values())
        elif isinstance(item, list):
            stack.extend((v, depth + 1) for v in item)
    return value


JsonArray = Annotated[list[Any], AfterValidator(_bounded_json)]
JsonObject = Annotated[dict[str, Any], AfterValidator(_bounded_json)]


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid")


# -- problems ---------------------------------------------------------------------------------------


class FieldProblem(BaseModel):
    field: str = Field(description="Where: 'body.tasks.0.name', 'query.limit', 'path.task_id', ...")
    message: str
    type: str = Field(description="A machine-readable code, e.g. 'missing', 'less_than_equal'.")


class Problem(BaseModel):
    """An error, as RFC 9457 problem details (``application/problem+json``)."""

    model_config = ConfigDict(extra="allow")

    type: str = Field(default="about:blank", description="A URI naming the kind of problem.")
    title: str
    status: int
    detail: str | None = None
    instance: str | None = None
    errors: list[FieldProblem] | None = Field(default=None, description="Each invalid field, for 422.")


# -- tasks ------------------------------------------------------------------------------------------


class EnqueueOptionsBody(_Request):
    args: JsonArray = Field(default_factory=list, description="Positional arguments (JSON).")
    kwargs: JsonObject = Field(default_factory=dict, description="Keyword arguments (JSON).")
    queue: QueueName | None = Field(default=None, description="Default: the task's queue.")
    priority: Priority | None = Field(default=None, description="Default: the task's priority.")
    delay_s: StrictFloat | None = Field(
        default=None, ge=0, le=MAX_DELAY_S, description="Run no sooner than this many seconds."
    )
    eta: IsoDatetime | None = Field(default=None, description="Run no sooner than this time.")
    max_attempts: StrictInt | None = Field(default=None, ge=1, le=1_000_000, description="Default: the task's.")
    timeout_s: StrictFloat | None = Field(default=None, gt=0, le=MAX_DELAY_S, description="Limit for one attempt.")
    unique_key: Key | None = Field(default=None, description="At most one unfinished task holds a unique key.")
    metadata: JsonObject | None = Field(default=None, description="Free JSON stored with the task.")

    @model_validator(mode="after")
    def _one_run_time(self) -> EnqueueOptionsBody:
        if self.delay_s is not None and self.eta is not None:
            raise ValueError("give either delay_s or eta, not both")
        return self


class EnqueueBody(EnqueueOptionsBody):
    """A task to enqueue. Send an ``Idempotency-Key`` header to make retries of this request safe."""

    name: TaskName


class BatchItem(EnqueueOptionsBody):
    name: TaskName
    idempotency_key: Key | None = Field(default=None, description="As the Idempotency-Key header, per task.")


class BatchEnqueueBody(_Request):
    """Tasks to enqueue together: all are stored, or none."""

    tasks: list[BatchItem] = Field(min_length=1, max_length=1000)


class Enqueued(BaseModel):
    id: int
    created: bool = Field(description="False: an existing task was returned (same idempotency or unique key).")
    state: TaskState


class BatchEnqueued(BaseModel):
    tasks: list[Enqueued]


class TaskSummaryOut(BaseModel):
    id: int
    name: str
    queue: str
    state: TaskState
    priority: int
    attempt: int
    max_attempts: int
    worker_id: UUID | None
    cancel_requested: bool
    error_type: str | None = Field(description="The last error's type, if the task has failed.")
    run_at: datetime
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None


class TaskPageOut(BaseModel):
    items: list[TaskSummaryOut]
    next_cursor: str | None = Field(description="Pass as `cursor` for the next page; null on the last page.")


# The pydantic mypy plugin's generated __init__ takes **kwargs, which a required field named `kwargs` shadows.
class TaskOut(BaseModel):  # type: ignore[no-redef]
    id: int
    name: str
    queue: str
    state: TaskState
    priority: int
    args: list[Any]
    kwargs: dict[str, Any]
    metadata: dict[str, Any]
    result: Any = Field(default=None, description="The return value (JSON) once the task succeeded.")
    last_error: dict[str, Any] | None = Field(description="The last failure: type, message, traceback, attempt.")
    attempt: int
    max_attempts: int
    worker_losses: int
    worker_id: UUID | None
    cancel_requested: bool
    timeout_s: float | None
    idempotency_key: str | None
    unique_key: str | None
    run_at: datetime
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    lease_expires_at: datetime | None


class TaskResultOut(BaseModel):
    id: int
    state: TaskState
    ready: bool = Field(description="True once the task has finished (succeeded, dead or cancelled).")
    result: Any = Field(default=None, description="The return value, when the task succeeded.")
    error: dict[str, Any] | None = Field(default=None, description="The last error, when it went dead.")


class TaskEventOut(BaseModel):
    id: int = Field(description="Order within the history; 0 is the enqueue (the task row itself).")
    at: datetime
    kind: str
    attempt: int
    worker_id: UUID | None
    detail: dict[str, Any] | None


class TaskEventsOut(BaseModel):
    items: list[TaskEventOut]


class AttemptOut(BaseModel):
    number: int
    worker_id: UUID | None
    started_at: datetime
    ended_at: datetime | None
    outcome: str | None = Field(description="succeeded, failed, cancelled, rescued, released; null while running.")
    error: dict[str, Any] | None
    next_state: str | None
    cancel_requested: bool


class AttemptsOut(BaseModel):
    items: list[AttemptOut]


class TaskPatch(_Request):
    """New priority and/or run time for a task that is not running yet (scheduled or queued)."""

    priority: Priority | None = None
    run_at: IsoDatetime | None = None
    delay_s: StrictFloat | None = Field(
        default=None, ge=0, le=MAX_DELAY_S, description="Run this many seconds from now."
    )

    @model_validator(mode="after")
    def _something_to_change(self) -> TaskPatch:
        if self.priority is None and self.run_at is None and self.delay_s is None:
            raise ValueError("give priority, run_at or delay_s")
        if self.run_at is not None and self.delay_s is not None:
            raise ValueError("give either run_at or delay_s, not both")
        return self


class TaskFilterBody(_Request):
    """Tasks matching every given criterion (values within one criterion are alternatives)."""

    state: list[TaskState] | None = Field(default=None, max_length=7)
    queue: list[QueueName] | None = Field(default=None, max_length=50)
    name: list[TaskName] | None = Field(default=None, max_length=50)
    created_after: IsoDatetime | None = None
    created_before: IsoDatetime | None = None

    @model_validator(mode="after")
    def _not_everything(self) -> TaskFilterBody:
        if not (self.state or self.queue or self.name or self.created_after or self.created_before):
            raise ValueError("a filter needs at least one criterion (to act on a whole queue, purge it)")
        return self


class BulkBody(_Request):
    """Either ``ids`` or ``filter``."""

    ids: list[TaskId] | None = Field(default=None, min_length=1, max_length=10_000)
    filter: TaskFilterBody | None = None
    limit: StrictInt = Field(default=10_000, ge=1, le=100_000, description="With a filter: act on at most this many.")

    @model_validator(mode="after")
    def _exactly_one(self) -> BulkBody:
        if (self.ids is None) == (self.filter is None):
            raise ValueError("give either ids or filter")
        return self


class BulkCancelOut(BaseModel):
    matched: int = Field(description="Tasks selected: the ids given, or those the filter matched.")
    cancelled: int = Field(description="Cancelled at once (they were not running).")
    cancel_requested: int = Field(description="Running: their worker was asked to stop them.")
    more: bool = Field(description="The filter matched `limit` tasks: there may be more, call again.")


class BulkRetryOut(BaseModel):
    matched: int
    retried: int
    more: bool


# -- queues -----------------------------------------------------------------------------------------


class QueueCounts(BaseModel):
    scheduled: int
    queued: int
    running: int
    succeeded: int
    dead: int
    cancelled: int
    blocked: int


class QueueOut(BaseModel):
    name: str
    paused: bool
    concurrency_limit: int | None
    rate_limit_per_s: float | None
    counts: QueueCounts
    oldest_waiting_age_s: float | None = Field(description="How long the longest-waiting due task has waited.")
    succeeded_last_minute: int
    dead_last_minute: int
    workers: int = Field(description="Live workers consuming this queue.")


class QueuesOut(BaseModel):
    items: list[QueueOut]


class QueueLimitsBody(_Request):
    """Limits for a queue; null removes one."""

    concurrency_limit: StrictInt | None = Field(default=None, ge=0, le=INT32_MAX, description="Tasks running at once.")
    rate_limit_per_s: StrictFloat | None = Field(
        default=None, gt=0, le=1_000_000, description="Task starts per second."
    )


PurgeableState = Literal["scheduled", "queued", "succeeded", "dead", "cancelled"]


def _waiting() -> list[PurgeableState]:
    return ["scheduled", "queued"]


class PurgeBody(_Request):
    states: list[PurgeableState] = Field(
        default_factory=_waiting,
        min_length=1,
        max_length=5,
        description="Which tasks to delete; running and blocked tasks are never purged.",
    )


class PurgeOut(BaseModel):
    queue: str
    purged: int


# -- workers ----------------------------------------------------------------------------------------


class WorkerOut(BaseModel):
    id: UUID
    name: str
    host: str
    pid: int
    queues: list[str]
    concurrency: int
    task_names: list[str] = Field(description="The tasks this worker can run.")
    state: Literal["running", "draining", "stopped"]
    paused: bool
    drain_requested: bool
    started_at: datetime
    last_heartbeat_at: datetime
    heartbeat_age_s: float | None
    stopped_at: datetime | None
    running_task_ids: list[int]
    metadata: dict[str, Any]


class WorkersOut(BaseModel):
    items: list[WorkerOut]


# -- API keys ---------------------------------------------------------------------------------------


class ApiKeyCreate(_Request):
    name: str = Field(min_length=1, max_length=100, description="What the key is for.")
    scopes: list[Scope] = Field(min_length=1, max_length=3)


class ApiKeyOut(BaseModel):
    id: int
    name: str
    prefix: str = Field(description="The key's first characters, to tell keys apart.")
    scopes: list[Scope]
    created_at: datetime
    last_used_at: datetime | None
    revoked_at: datetime | None
    active: bool


class ApiKeyCreated(ApiKeyOut):
    key: str = Field(description="The key itself. It is shown this once and stored nowhere: keep it now.")


class ApiKeysOut(BaseModel):
    items: list[ApiKeyOut]


# -- health -----------------------------------------------------------------------------------------


class LiveOut(BaseModel):
    status: Literal["ok"] = "ok"


class ReadyOut(BaseModel):
    status: Literal["ok"] = "ok"
    database: Literal["ok"] = "ok"
    schema_revision: str
    scheduler: Literal["ok", "degraded", "no-leader", "unknown"] = Field(
        default="unknown",
        description="Informational, never a reason for 503 (an API-only deployment runs no scheduler): the "
        "`status` of GET /api/v1/scheduler, or `unknown` if it could not be read in time.",
    )
