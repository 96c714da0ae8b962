"""Request and response bodies of task search and dead letters (``/search``, ``/dead``).

The filter is structured: each criterion is a typed field, values within one criterion are
alternatives, criteria combine with AND. JSON conditions carry a SQL/JSON path and JSON values, which
reach the database as bound parameters only.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any
from uuid import UUID

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, Strict, model_validator

from conveyor.api.pagination import SortParam
from conveyor.api.schemas import MAX_JSON_DEPTH, IsoDatetime, QueueName, StrictInt, TaskId, TaskName, TaskSummaryOut
from conveyor.core.states import TaskState
from conveyor.db.search_store import COUNT_CAP, JsonCondition, SearchFilter

#: Longest SQL/JSON path accepted.
MAX_PATH_CHARS = 500


def _no_nul(text: str) -> str:
    # PostgreSQL text cannot hold a NUL character: refuse it here, as the client's error, rather than
    # let the database refuse it as if it were failing.
    if "\x00" in text:
        raise ValueError("must not contain a NUL character")
    return text


def _bounded(value: Any) -> Any:
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if depth > MAX_JSON_DEPTH:
            raise ValueError(f"JSON nested more than {MAX_JSON_DEPTH} levels deep")
        if isinstance(item, str):
            _no_nul(item)
        elif isinstance(item, dict):
            for key in item:
                _no_nul(key)
            stack.extend((v, depth + 1) for v in item.values())
        elif isinstance(item, list):
            stack.extend((v, depth + 1) for v in item)
    return value


Text = Annotated[str, AfterValidator(_no_nul)]
"""Free text bound for the database: any characters but NUL."""
AnyJson = Annotated[Any, AfterValidator(_bounded)]
StrictBool = Annotated[bool, Strict()]
ErrorType = Annotated[Text, Field(min_length=1, max_length=200, description="An error's type, e.g. 'ValueError'.")]


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid")


class JsonConditionBody(_Request):
    """A condition on a JSON field. Give ``path`` (optionally with ``equals`` and ``vars``), or ``contains``:

    * `{"path": "$.customer.id"}`: the path selects something;
    * `{"path": "$.amount ? (@ > $min)", "vars": {"min": 100}}`: a SQL/JSON predicate holds;
    * `{"path": "$.customer.id", "equals": 42}`: something the path selects equals 42 (objects and
      arrays match when they contain the value);
    * `{"contains": {"customer": {"id": 42}}}`: the document contains this JSON (`@>`).

    Paths are PostgreSQL SQL/JSON paths in lax mode; a path that does not parse is a 422 naming it.
    """

    path: Text | None = Field(default=None, min_length=1, max_length=MAX_PATH_CHARS)
    equals: AnyJson = Field(default=None, description="Any JSON value, null included (when given).")
    contains: AnyJson = Field(default=None, description="Any JSON value (when given).")
    vars: dict[Text, AnyJson] | None = Field(default=None, description="The path's variables ($name).")

    @model_validator(mode="after")
    def _one_form(self) -> JsonConditionBody:
        given = self.model_fields_set
        if "contains" in given:
            if given & {"path", "equals", "vars"}:
                raise ValueError("give contains alone, or path (with equals and vars)")
        elif self.path is None:
            raise ValueError("give path (with optional equals and vars) or contains")
        if self.vars is not None and len(self.vars) > 20:
            raise ValueError("at most 20 vars")
        return self

    def condition(self, where: str) -> JsonCondition:
        given = self.model_fields_set
        return JsonCondition(
            where=where,
            path=self.path,
            vars=self.vars,
            **({"equals": self.equals} if "equals" in given else {}),
            **({"contains": self.contains} if "contains" in given else {}),
        )


_PAIRS = (
    ("created_after", "created_before"),
    ("started_after", "started_before"),
    ("finished_after", "finished_before"),
)


class TaskCriteria(_Request):
    """Every criterion but the state (dead letters are always dead)."""

    id: list[TaskId] | None = Field(default=None, max_length=1000, description="Only these task ids.")
    queue: list[QueueName] | None = Field(default=None, max_length=50)
    name: list[TaskName] | None = Field(default=None, max_length=50)
    worker_id: list[UUID] | None = Field(default=None, max_length=50, description="Claimed (last) by these workers.")
    created_after: IsoDatetime | None = Field(default=None, description="Created at or after.")
    created_before: IsoDatetime | None = Field(default=None, description="Created before.")
    started_after: IsoDatetime | None = Field(default=None, description="Last attempt started at or after.")
    started_before: IsoDatetime | None = None
    finished_after: IsoDatetime | None = None
    finished_before: IsoDatetime | None = None
    error: Text | None = Field(
        default=None,
        min_length=1,
        max_length=200,
        description="Text in the last error's type or message (case-insensitive; % and _ are literal).",
    )
    error_type: list[ErrorType] | None = Field(default=None, max_length=20, description="Exact error types.")
    args: list[JsonConditionBody] | None = Field(default=None, max_length=10, description="On positional args.")
    kwargs: list[JsonConditionBody] | None = Field(default=None, max_length=10, description="On keyword args.")
    metadata: list[JsonConditionBody] | None = Field(default=None, max_length=10, description="On metadata.")

    @model_validator(mode="after")
    def _ranges(self) -> TaskCriteria:
        for after, before in _PAIRS:
            low, high = getattr(self, after), getattr(self, before)
            if low is not None and high is not None and low >= high:
                raise ValueError(f"{after} must be earlier than {before}")
        return self

    def to_filter(self, where: str, states: tuple[TaskState, ...] = ()) -> SearchFilter:
        def conditions(field: str, given: list[JsonConditionBody] | None) -> tuple[JsonCondition, ...]:
            return tuple(c.condition(f"{where}.{field}.{i}") for i, c in enumerate(given or ()))

        return SearchFilter(
            ids=tuple(self.id or ()),
            states=states,
            queues=tuple(self.queue or ()),
            names=tuple(self.name or ()),
            worker_ids=tuple(str(w) for w in self.worker_id or ()),
            created_after=self.created_after,
            created_before=self.created_before,
            started_after=self.started_after,
            started_before=self.started_before,
            finished_after=self.finished_after,
            finished_before=self.finished_before,
            error=self.error,
            error_types=tuple(self.error_type or ()),
            args=conditions("args", self.args),
            kwargs=conditions("kwargs", self.kwargs),
            metadata=conditions("metadata", self.metadata),
        )


class SearchFilterBody(TaskCriteria):
    """Tasks matching every given criterion; values within one criterion are alternatives."""

    state: list[TaskState] | None = Field(default=None, max_length=7)

    def search_filter(self, where: str = "body.filter") -> SearchFilter:
        return self.to_filter(where, tuple(self.state or ()))


def _no_filter() -> SearchFilterBody:
    return SearchFilterBody()


class SearchBody(_Request):
    filter: SearchFilterBody = Field(default_factory=_no_filter)
    sort: SortParam = Field(
        default="-id",
        description="'-' first for descending. `id`: creation order; `finished_at`: finished tasks only; "
        "`run_at`: waiting tasks only (needs `state` of scheduled and/or queued).",
    )
    limit: StrictInt = Field(default=50, ge=1, le=200, description="Tasks per page.")
    cursor: str | None = Field(default=None, max_length=500, description="`next_cursor` of the previous page.")
    count: StrictBool = Field(default=True, description="Also count the matches (capped; see `count_is_exact`).")


class SearchItemOut(TaskSummaryOut):
    error_message: str | None = Field(description="The start of the last error's message.")


class ScanPositionOut(BaseModel):
    """A position in the sort order: the sort field's value there, and the task id (ties break by id)."""

    value: int | datetime = Field(description="The task id (sort by id), or the time (finished_at, run_at).")
    id: int


class SearchOut(BaseModel):
    items: list[SearchItemOut]
    next_cursor: str | None = Field(description="Pass as `cursor` for the next page; null on the last page.")
    complete: bool = Field(
        description="False when the search's time budget ran out before the page filled: `items` are the "
        "matches found up to `scanned_to` (maybe none) and `next_cursor` resumes the scan exactly there, "
        "so paging on returns every match once, in order. Only filters no index answers (JSON conditions, "
        "error text or type, worker, start time) scan; the others always answer complete pages."
    )
    scanned_to: ScanPositionOut | None = Field(
        description="On a partial page, how far the scan got: every task up to here in sort order was examined."
    )
    count: int | None = Field(
        description=f"How many tasks match: exact when `count_is_exact`, otherwise at least this many "
        f"(counting stops past {COUNT_CAP:,} matches, or when its time budget runs out). Null when not "
        f"asked for, or when nothing could be counted in time."
    )
    count_is_exact: bool


class DeadActionBody(_Request):
    """Which dead tasks: every criterion must hold (an empty filter means every dead task)."""

    filter: TaskCriteria
    limit: StrictInt = Field(default=10_000, ge=1, le=100_000, description="Act on at most this many.")


class DeadActionOut(BaseModel):
    matched: int = Field(description="Dead tasks the filter selected (at most `limit`).")
    retried: int | None = Field(default=None, description="Queued again (a task whose unique key is held stays).")
    deleted: int | None = Field(default=None, description="Deleted, with their history.")
    more: bool = Field(description="More dead tasks match than `limit`: call again for the rest.")
