"""``/api/v1/workflows``: submit a workflow by task names, list workflows, read one's graph, cancel, retry.

A thin adapter over :class:`~conveyor.db.workflow_store.WorkflowStore`; the graph is validated by the
same code as ``app.workflow()`` (:mod:`conveyor.core.workflow`), and every step by the same code as any
enqueue. Errors name the step by its index in the request: ``body.steps.3.depends_on``.

Scopes: reading needs ``tasks:read``; submitting, cancelling and retrying ``tasks:write``.
"""

from __future__ import annotations

import json
from datetime import datetime
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Path, Query, Request, Response, status
from pydantic import AwareDatetime, BaseModel, ConfigDict, Field

from conveyor.api.auth import Scope
from conveyor.api.deps import conveyor_app, require
from conveyor.api.errors import ApiProblem, invalid_field
from conveyor.api.pagination import decode_cursor, encode_cursor
from conveyor.api.routes import problems
from conveyor.api.schemas import (
    INT64_MAX,
    MAX_DELAY_S,
    JsonArray,
    JsonObject,
    Priority,
    QueueName,
    TaskName,
)
from conveyor.core.states import TaskState
from conveyor.core.workflow_records import (
    InvalidWorkflow,
    WorkflowGraph,
    WorkflowNotFound,
    WorkflowRecord,
    WorkflowState,
    WorkflowStateError,
)
from conveyor.db.task_queries import Keyset
from conveyor.db.workflow_store import WorkflowStore
from conveyor.errors import PayloadError, UnknownTask
from conveyor.handles import Signature, make_options
from conveyor.workflows import Workflow

router = APIRouter(prefix="/workflows", tags=["workflows"])

WorkflowIdPath = Annotated[int, Path(ge=1, le=INT64_MAX, description="The workflow id.")]
StepName = Annotated[str, Field(min_length=1, max_length=200, description="A step name, unique in its workflow.")]

#: Steps one request may submit (a bigger workflow: submit it from Python).
MAX_STEPS = 10_000
#: The cursor format is shared with the task list; workflows are always listed newest first.
_SORT = "-id"

_READ = [require(Scope.TASKS_READ)]
_WRITE = [require(Scope.TASKS_WRITE)]


# -- bodies -----------------------------------------------------------------------------------------


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid")  # a misspelt option is an error, not a silent default


class StepOptionsBody(_Request):
    queue: QueueName | None = Field(default=None, description="Default: the task's queue.")
    priority: Priority | None = Field(default=None, description="Default: the task's priority.")
    max_attempts: int | None = Field(default=None, ge=1, le=1_000_000, description="Default: the task's.")
    timeout_s: float | None = Field(
        default=None, gt=0, le=MAX_DELAY_S, allow_inf_nan=False, description="Limit for one attempt."
    )
    delay_s: float | None = Field(
        default=None,
        ge=0,
        le=MAX_DELAY_S,
        allow_inf_nan=False,
        description="Only for steps without dependencies: run no sooner than this many seconds.",
    )
    eta: AwareDatetime | None = Field(default=None, description="Only for steps without dependencies.")
    metadata: JsonObject | None = Field(default=None, description="Free JSON stored with the step's task.")


class WorkflowStepBody(_Request):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    name: StepName
    task: TaskName = Field(description="The task to run, by its registered name.")
    args: JsonArray = Field(default_factory=list, description="The step's own positional arguments (JSON).")
    kwargs: JsonObject = Field(default_factory=dict, description="Keyword arguments (JSON).")
    depends_on: list[StepName] = Field(
        default_factory=list, max_length=MAX_STEPS, description="Steps that must finish first, by name."
    )
    pass_results: bool = Field(
        default=True,
        description="Prepend the dependencies' results to `args`: the one result, or the list of them in "
        "`depends_on` order. Under `on_failure: continue`, a step with `pass_results: false` still runs "
        "when a dependency fails.",
    )
    options: StepOptionsBody | None = None


class WorkflowBody(_Request):
    """A workflow: steps by name, each with the steps it depends on. Stored all at once, or not at all."""

    name: str = Field(default="workflow", min_length=1, max_length=200)
    on_failure: Literal["stop", "continue"] = Field(
        default="stop",
        description="`stop`: a failed step cancels its dependents and stops the rest of the workflow. "
        "`continue`: only the dependents that need its result are cancelled.",
    )
    steps: list[WorkflowStepBody] = Field(min_length=1, max_length=MAX_STEPS)


# -- answers ----------------------------------------------------------------------------------------


class WorkflowOut(BaseModel):
    id: int
    name: str
    kind: str = Field(description="chain, group, chord or dag.")
    state: WorkflowState
    on_failure: str
    steps_total: int
    steps_remaining: int = Field(description="Steps not yet succeeded, dead or cancelled.")
    cancel_requested: bool
    stop_reason: str | None = Field(description="What stopped the workflow: a failed step under `stop`, or a cancel.")
    created_at: datetime
    finished_at: datetime | None


class WorkflowStepOut(BaseModel):
    task_id: int
    name: str
    task: str
    queue: str
    state: TaskState
    depends_on: list[str]
    result_mode: str = Field(description="How dependencies' results reach the step: none, single or list.")
    deps_pending: int = Field(description="Dependencies whose outcome has not yet let the step run.")
    attempt: int
    max_attempts: int
    cancel_requested: bool
    result: Any = None
    error: dict[str, Any] | None = None
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None


class WorkflowEdgeOut(BaseModel):
    parent: str
    child: str
    parent_task_id: int
    child_task_id: int
    position: int = Field(description="Where the parent's result goes among the child's inputs.")
    needs_result: bool


class WorkflowGraphOut(WorkflowOut):
    steps: list[WorkflowStepOut]
    edges: list[WorkflowEdgeOut]


class WorkflowPageOut(BaseModel):
    items: list[WorkflowOut]
    next_cursor: str | None


class WorkflowSubmittedOut(WorkflowOut):
    step_ids: dict[str, int] = Field(description="Step name -> the id of its task.")


# -- routes -----------------------------------------------------------------------------------------


async def workflow_store(request: Request) -> WorkflowStore:
    return conveyor_app(request).workflow_store()


StoreDep = Annotated[WorkflowStore, Depends(workflow_store)]


@router.post("", status_code=status.HTTP_201_CREATED, dependencies=_WRITE)
async def submit_workflow(
    body: WorkflowBody, request: Request, response: Response, store: StoreDep
) -> WorkflowSubmittedOut:
    """Submit a workflow by task names and start it.

    Each step names its `task` and the steps it `depends_on`; steps without dependencies start at once,
    the others when their dependencies are done. A graph that cannot run (an unknown dependency, a
    cycle, a step name used twice) or a step that cannot be enqueued (an unknown task, a bad payload) is
    a 422 naming the step: `body.steps.<index>.<field>`."""
    app = conveyor_app(request)
    where = _step_index(body)
    try:
        workflow = Workflow(app, body.name, body.on_failure)
        for index, step in enumerate(body.steps):
            options = step.options or StepOptionsBody()
            try:
                chosen = make_options(
                    **{
                        key: value
                        for key, value in {
                            "queue": options.queue,
                            "priority": options.priority,
                            "max_attempts": options.max_attempts,
                            "timeout": options.timeout_s,
                            "delay": options.delay_s,
                            "eta": options.eta,
                            "metadata": options.metadata,
                        }.items()
                        if value is not None
                    }
                )
            except ValueError as exc:
                raise invalid_field(f"body.steps.{index}.options", str(exc)) from None
            workflow.add(
                Signature(step.task, step.args, step.kwargs, chosen),
                name=step.name,
                depends_on=step.depends_on,
                pass_results=step.pass_results,
            )
        spec = workflow.build()
        requests = app.workflow_requests(spec)
    except InvalidWorkflow as exc:
        raise _invalid(exc, where, app.settings.payload_limit_bytes, body) from None
    submitted = await store.submit(spec, requests)
    response.headers["Location"] = str(request.url_for("get_workflow", workflow_id=submitted.id))
    record = await store.get(submitted.id)
    return WorkflowSubmittedOut(**_workflow_out(record).model_dump(), step_ids=submitted.step_ids)


@router.get("", dependencies=_READ)
async def list_workflows(
    store: StoreDep,
    state: Annotated[list[WorkflowState] | None, Query(max_length=4, description="Only these states.")] = None,
    name: Annotated[str | None, Query(min_length=1, max_length=200, description="Only workflows so named.")] = None,
    limit: Annotated[int, Query(ge=1, le=200, description="Workflows per page.")] = 50,
    cursor: Annotated[str | None, Query(max_length=500, description="`next_cursor` of the previous page.")] = None,
) -> WorkflowPageOut:
    """List workflows, newest first, a page at a time (keyset pagination: every page costs the same)."""
    before = None if cursor is None else int(decode_cursor(cursor, _SORT).id)
    page = await store.page(states=tuple(state or ()), name=name, limit=limit, before=before)
    return WorkflowPageOut(
        items=[_workflow_out(item) for item in page.items],
        next_cursor=None
        if page.next_before is None
        else encode_cursor(_SORT, Keyset(page.next_before, page.next_before)),
    )


@router.get("/{workflow_id}", dependencies=_READ, responses=problems(404))
async def get_workflow(workflow_id: WorkflowIdPath, store: StoreDep) -> WorkflowGraphOut:
    """One workflow with its graph: every step (state, attempts, result or last error) and every edge."""
    try:
        graph = await store.graph(workflow_id)
    except WorkflowNotFound as exc:
        raise _not_found(exc) from None
    return _graph_out(graph)


@router.post("/{workflow_id}/cancel", dependencies=_WRITE, responses=problems(404, 409))
async def cancel_workflow(workflow_id: WorkflowIdPath, store: StoreDep) -> WorkflowOut:
    """Cancel the workflow's waiting steps and ask its running ones to stop; it ends `cancelled` when the
    last of them has finished. A finished workflow is a 409 and stays as it was."""
    try:
        return _workflow_out(await store.cancel(workflow_id))
    except WorkflowNotFound as exc:
        raise _not_found(exc) from None
    except WorkflowStateError as exc:
        raise _conflict(exc) from None


@router.post("/{workflow_id}/retry", dependencies=_WRITE, responses=problems(404, 409))
async def retry_workflow(workflow_id: WorkflowIdPath, store: StoreDep) -> WorkflowOut:
    """Run again the steps of a failed or cancelled workflow that did not succeed (the failed ones and
    those they stopped), each with at least one more attempt; succeeded steps keep their results. Any
    other state is a 409."""
    try:
        return _workflow_out(await store.retry(workflow_id))
    except WorkflowNotFound as exc:
        raise _not_found(exc) from None
    except WorkflowStateError as exc:
        raise _conflict(exc) from None


# -- helpers ----------------------------------------------------------------------------------------


def _step_index(body: WorkflowBody) -> dict[str, int]:
    """Step name -> its index in the request (the later one for a name used twice: that is the error)."""
    return {step.name: index for index, step in enumerate(body.steps)}


def _invalid(exc: InvalidWorkflow, where: dict[str, int], limit_bytes: int, body: WorkflowBody) -> ApiProblem:
    field = "body.steps"
    if exc.step is not None and exc.step in where:
        field = f"body.steps.{where[exc.step]}"
        if exc.field is not None:
            field += f".{exc.field}"
    elif exc.field in ("name", "on_failure"):
        field = f"body.{exc.field}"
    cause = exc.__cause__
    if isinstance(cause, UnknownTask):
        return invalid_field(field, str(exc), kind="unknown-task")
    if isinstance(cause, PayloadError):
        step = body.steps[where[exc.step]] if exc.step in where else None
        if step is not None and _size(step.args) + _size(step.kwargs) > limit_bytes:
            return invalid_field(field, str(exc), status=413, kind="payload-too-large")
        return invalid_field(field, str(exc), kind="invalid-payload")
    return invalid_field(field, str(exc), kind="invalid-workflow")


def _size(value: Any) -> int:
    try:
        return len(json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode())
    except (TypeError, ValueError):
        return 0


def _not_found(exc: WorkflowNotFound) -> ApiProblem:
    return ApiProblem(404, str(exc), kind="workflow-not-found", workflow_id=exc.workflow_id)


def _conflict(exc: WorkflowStateError) -> ApiProblem:
    return ApiProblem(409, str(exc), kind="invalid-transition", workflow_id=exc.workflow_id, state=exc.state)


def _workflow_out(record: WorkflowRecord) -> WorkflowOut:
    return WorkflowOut(
        id=record.id,
        name=record.name,
        kind=record.kind,
        state=record.state,
        on_failure=record.on_failure,
        steps_total=record.steps_total,
        steps_remaining=record.steps_remaining,
        cancel_requested=record.cancel_requested,
        stop_reason=record.stop_reason,
        created_at=record.created_at,
        finished_at=record.finished_at,
    )


def _graph_out(graph: WorkflowGraph) -> WorkflowGraphOut:
    depends: dict[int, list[str]] = {}
    for edge in graph.edges:
        depends.setdefault(edge.child_task_id, []).append(edge.parent)
    return WorkflowGraphOut(
        **_workflow_out(graph.workflow).model_dump(),
        steps=[
            WorkflowStepOut(
                task_id=step.task_id,
                name=step.name,
                task=step.task,
                queue=step.queue,
                state=step.state,
                depends_on=depends.get(step.task_id, []),
                result_mode=step.result_mode,
                deps_pending=step.deps_pending,
                attempt=step.attempt,
                max_attempts=step.max_attempts,
                cancel_requested=step.cancel_requested,
                result=step.result if step.state == TaskState.SUCCEEDED else None,
                error=step.last_error if step.state != TaskState.SUCCEEDED else None,
                created_at=step.created_at,
                started_at=step.started_at,
                finished_at=step.finished_at,
            )
            for step in graph.steps
        ],
        edges=[WorkflowEdgeOut.model_validate(edge, from_attributes=True) for edge in graph.edges],
    )
