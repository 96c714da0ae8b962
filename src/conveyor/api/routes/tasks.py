"""``/api/v1/tasks``: enqueue, list, inspect, wait for results, and act on tasks."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Annotated, Any

from fastapi import APIRouter, Header, Path, Query, Request, Response, status

from conveyor.api.auth import Scope
from conveyor.api.deps import ServicesDep, require
from conveyor.api.errors import invalid_field
from conveyor.api.pagination import SortParam, decode_cursor, encode_cursor, parse_sort
from conveyor.api.routes import problems
from conveyor.api.schemas import (
    INT64_MAX,
    AttemptOut,
    AttemptsOut,
    BatchEnqueueBody,
    BatchEnqueued,
    BulkBody,
    BulkCancelOut,
    BulkRetryOut,
    EnqueueBody,
    Enqueued,
    EnqueueOptionsBody,
    IsoDatetime,
    QueueName,
    TaskEventOut,
    TaskEventsOut,
    TaskName,
    TaskOut,
    TaskPageOut,
    TaskPatch,
    TaskResultOut,
    TaskSummaryOut,
)
from conveyor.app import App
from conveyor.core.attempts import attempts_from_events
from conveyor.core.records import EnqueueRequest, TaskRecord
from conveyor.core.states import TERMINAL_STATES, TaskState
from conveyor.db.task_queries import TaskFilter
from conveyor.errors import PayloadError, UnknownTask
from conveyor.handles import Signature, make_options

router = APIRouter(prefix="/tasks", tags=["tasks"])

TaskIdPath = Annotated[int, Path(ge=1, le=INT64_MAX, description="The task id.")]
IdempotencyKey = Annotated[
    str | None,
    Header(
        alias="Idempotency-Key",
        min_length=1,
        max_length=255,
        description="Repeat a request with the same key and body: you get the same task, enqueued once. "
        "The same key with a different body is a 409.",
    ),
]

#: Longest a result request may wait (seconds): under the idle timeouts of common proxies.
MAX_RESULT_WAIT_S = 30.0

_READ = [require(Scope.TASKS_READ)]
_WRITE = [require(Scope.TASKS_WRITE)]


@router.post(
    "",
    status_code=status.HTTP_201_CREATED,
    dependencies=_WRITE,
    responses={
        **problems(409),
        200: {"model": Enqueued, "description": "An existing task (same idempotency or unique key)."},
    },
)
async def enqueue_task(
    body: EnqueueBody,
    request: Request,
    response: Response,
    services: ServicesDep,
    idempotency_key: IdempotencyKey = None,
) -> Enqueued:
    """Enqueue a task by its registered name, with JSON arguments.

    201 with the new task; 200 with the existing one when the `Idempotency-Key` (same body) or the
    `unique_key` matched a task already enqueued. An unknown task name is 422; a payload over the size
    limit is 413; the same idempotency key with a different body is 409."""
    task_request = _enqueue_request(services.app, body, body.name, idempotency_key, "body")
    [result] = await services.tasks.enqueue([task_request])
    response.status_code = status.HTTP_201_CREATED if result.created else status.HTTP_200_OK
    response.headers["Location"] = str(request.url_for("get_task", task_id=result.id))
    return Enqueued(id=result.id, created=result.created, state=result.state)


@router.post("/batch", dependencies=_WRITE, responses=problems(409))
async def enqueue_tasks(body: BatchEnqueueBody, services: ServicesDep) -> BatchEnqueued:
    """Enqueue up to 1,000 tasks at once: all are stored, or none.

    Each item is what `POST /tasks` takes, with its own optional `idempotency_key`. Results come back
    in the order given. Errors name the item, e.g. `body.tasks.3.name`."""
    requests = [
        _enqueue_request(services.app, item, item.name, item.idempotency_key, f"body.tasks.{index}")
        for index, item in enumerate(body.tasks)
    ]
    results = await services.tasks.enqueue(requests)
    return BatchEnqueued(tasks=[Enqueued(id=r.id, created=r.created, state=r.state) for r in results])


# Before the /{task_id} routes: "/bulk/cancel" must not be read as task "bulk".
@router.post("/bulk/cancel", dependencies=_WRITE)
async def bulk_cancel_tasks(body: BulkBody, services: ServicesDep) -> BulkCancelOut:
    """Cancel many tasks: by `ids`, or up to `limit` matching `filter`.

    As `POST /tasks/{id}/cancel` for each, in batches: waiting tasks are cancelled, running ones asked
    to stop, finished ones left alone."""
    report = await services.queries.bulk_cancel(
        ids=body.ids or (), task_filter=_filter(body) if body.filter else None, limit=body.limit
    )
    return BulkCancelOut.model_validate(report, from_attributes=True)


@router.post("/bulk/retry", dependencies=_WRITE)
async def bulk_retry_tasks(body: BulkBody, services: ServicesDep) -> BulkRetryOut:
    """Retry many finished tasks: by `ids`, or up to `limit` matching `filter` (a filter without
    `state` means the dead ones).

    A task whose unique key another unfinished task holds is skipped."""
    report = await services.queries.bulk_retry(
        ids=body.ids or (), task_filter=_filter(body) if body.filter else None, limit=body.limit
    )
    return BulkRetryOut.model_validate(report, from_attributes=True)


@router.get("", dependencies=_READ)
async def list_tasks(
    services: ServicesDep,
    state: Annotated[list[TaskState] | None, Query(max_length=7, description="Only these states.")] = None,
    queue: Annotated[list[QueueName] | None, Query(max_length=50, description="Only these queues.")] = None,
    name: Annotated[list[TaskName] | None, Query(max_length=50, description="Only these task names.")] = None,
    created_after: Annotated[IsoDatetime | None, Query(description="Created at or after this time.")] = None,
    created_before: Annotated[IsoDatetime | None, Query(description="Created before this time.")] = None,
    sort: Annotated[
        SortParam,
        Query(
            description="'-' first for descending. `id`: creation order; `finished_at`: finished tasks only; "
            "`run_at`: waiting tasks only (needs `state` of scheduled and/or queued)."
        ),
    ] = "-id",
    limit: Annotated[int, Query(ge=1, le=200, description="Tasks per page.")] = 50,
    cursor: Annotated[str | None, Query(max_length=500, description="`next_cursor` of the previous page.")] = None,
) -> TaskPageOut:
    """List tasks, newest first by default, a page at a time.

    Filters combine with AND; repeat a filter for OR within it (`?state=dead&state=cancelled`). Pages
    continue from `next_cursor` (keyset pagination: every page costs the same, however deep)."""
    task_filter = TaskFilter(
        states=tuple(state or ()),
        queues=tuple(queue or ()),
        names=tuple(name or ()),
        created_after=created_after,
        created_before=created_before,
    )
    after = None if cursor is None else decode_cursor(cursor, sort)
    try:
        page = await services.queries.page(task_filter, parse_sort(sort), limit, after)
    except ValueError as exc:
        raise invalid_field("query.sort", str(exc)) from None
    return TaskPageOut(
        items=[TaskSummaryOut.model_validate(item, from_attributes=True) for item in page.items],
        next_cursor=None if page.next is None else encode_cursor(sort, page.next),
    )


@router.get("/{task_id}", dependencies=_READ, responses=problems(404))
async def get_task(task_id: TaskIdPath, services: ServicesDep) -> TaskOut:
    """One task: its arguments, state, attempts so far, result or last error."""
    return _task_out(await services.tasks.get(task_id))


@router.get("/{task_id}/result", dependencies=_READ, responses=problems(404))
async def get_task_result(
    task_id: TaskIdPath,
    request: Request,
    services: ServicesDep,
    wait: Annotated[
        float,
        Query(ge=0, le=MAX_RESULT_WAIT_S, allow_inf_nan=False, description="Seconds to wait for the task to finish."),
    ] = 0.0,
) -> TaskResultOut:
    """The task's outcome: `ready` is true once it has finished (succeeded, dead or cancelled).

    With `wait`, the answer is held until the task finishes or `wait` seconds pass (at most 30);
    either way the answer is 200, with `ready` saying which."""
    record = await services.tasks.get(task_id)
    deadline = time.monotonic() + wait
    pause_s = 0.02
    while record.state not in TERMINAL_STATES and time.monotonic() < deadline:
        if await request.is_disconnected():
            break
        await asyncio.sleep(min(pause_s, max(0.0, deadline - time.monotonic())))
        pause_s = min(pause_s * 2, 0.25)
        record = await services.tasks.get(task_id)
    ready = record.state in TERMINAL_STATES
    return TaskResultOut(
        id=record.id,
        state=record.state,
        ready=ready,
        result=record.result if record.state == TaskState.SUCCEEDED else None,
        error=record.last_error if ready and record.state != TaskState.SUCCEEDED else None,
    )


@router.get("/{task_id}/events", dependencies=_READ, responses=problems(404))
async def get_task_events(task_id: TaskIdPath, services: ServicesDep) -> TaskEventsOut:
    """The task's history, oldest first: enqueued, claimed, failed, retried, cancelled, ..."""
    events = await services.tasks.events(task_id)
    return TaskEventsOut(items=[TaskEventOut.model_validate(e, from_attributes=True) for e in events])


@router.get("/{task_id}/attempts", dependencies=_READ, responses=problems(404))
async def get_task_attempts(task_id: TaskIdPath, services: ServicesDep) -> AttemptsOut:
    """Each execution of the task: worker, start and end, outcome and error."""
    attempts = attempts_from_events(await services.tasks.events(task_id))
    return AttemptsOut(items=[AttemptOut.model_validate(a, from_attributes=True) for a in attempts])


@router.post("/{task_id}/cancel", dependencies=_WRITE, responses=problems(404, 409))
async def cancel_task(task_id: TaskIdPath, services: ServicesDep) -> TaskOut:
    """Cancel a task. Waiting tasks are cancelled at once; a running task's worker is asked to stop it
    (`cancel_requested`). A finished task is a 409 and stays as it was."""
    return _task_out(await services.tasks.cancel(task_id))


@router.post("/{task_id}/retry", dependencies=_WRITE, responses=problems(404, 409))
async def retry_task(task_id: TaskIdPath, services: ServicesDep) -> TaskOut:
    """Start a finished task (dead, cancelled or succeeded) again, with at least one attempt left.
    Any other state is a 409."""
    return _task_out(await services.tasks.retry(task_id))


@router.patch("/{task_id}", dependencies=_WRITE, responses=problems(404, 409))
async def update_task(task_id: TaskIdPath, body: TaskPatch, services: ServicesDep) -> TaskOut:
    """Change the priority or the run time of a task that is not running yet (scheduled or queued).

    A run time in the future makes it scheduled, one that has come makes it queued. Any other state is
    a 409 and the task is left as it was."""
    record = await services.queries.update(task_id, priority=body.priority, run_at=body.run_at, delay_s=body.delay_s)
    return _task_out(record)


@router.delete(
    "/{task_id}",
    status_code=status.HTTP_204_NO_CONTENT,
    dependencies=_WRITE,
    responses=problems(404, 409),
    response_class=Response,
)
async def delete_task(task_id: TaskIdPath, services: ServicesDep) -> None:
    """Delete a task and its history. A running task is a 409: cancel it first."""
    await services.queries.delete(task_id)


# -- helpers ----------------------------------------------------------------------------------------


def _enqueue_request(
    app: App, body: EnqueueOptionsBody, name: str, idempotency_key: str | None, where: str
) -> EnqueueRequest:
    """Validate and encode one task exactly as the Python API does; errors name the field."""
    chosen: dict[str, Any] = {
        "queue": body.queue,
        "priority": body.priority,
        "delay": body.delay_s,
        "eta": body.eta,
        "max_attempts": body.max_attempts,
        "timeout": body.timeout_s,
        "idempotency_key": idempotency_key,
        "unique_key": body.unique_key,
        "metadata": body.metadata,
    }
    try:
        options = make_options(**{k: v for k, v in chosen.items() if v is not None})
        return app.build_request(Signature(name, body.args, body.kwargs, options))
    except UnknownTask:
        raise invalid_field(f"{where}.name", f"no task named {name!r} is registered", kind="unknown-task") from None
    except PayloadError as exc:
        if _oversized(body, app.settings.payload_limit_bytes):
            raise invalid_field(where, str(exc), status=413, kind="payload-too-large") from None
        raise invalid_field(where, str(exc), kind="invalid-payload") from None
    except ValueError as exc:
        raise invalid_field(where, str(exc)) from None


def _oversized(body: EnqueueOptionsBody, limit_bytes: int) -> bool:
    """Whether the payload is over the size limit (rather than otherwise unstorable)."""

    def size(value: Any) -> int:
        try:
            return len(json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode())
        except (TypeError, ValueError):
            return 0

    return size(body.args) + size(body.kwargs) > limit_bytes or size(body.metadata or {}) > limit_bytes


def _filter(body: BulkBody) -> TaskFilter:
    assert body.filter is not None
    given = body.filter
    return TaskFilter(
        states=tuple(given.state or ()),
        queues=tuple(given.queue or ()),
        names=tuple(given.name or ()),
        created_after=given.created_after,
        created_before=given.created_before,
    )


def _task_out(record: TaskRecord) -> TaskOut:
    return TaskOut.model_validate(record, from_attributes=True)
