"""Every error the API returns has one shape: RFC 9457 problem details (``application/problem+json``).

Conveyor's own errors map to statuses here, once: an unknown task is 404, a state that does not allow
the request 409, an unknown task name 422, a payload over the limit 413, an unreachable database 503.
Validation errors are 422 and name each field. Anything unexpected is a 500 whose body says nothing
about the cause (that goes to the log, never to the client).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from http import HTTPStatus
from typing import Any

import sqlalchemy.exc
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from conveyor.db.errors import translate_errors
from conveyor.errors import (
    ConfigError,
    ConveyorError,
    DatabaseError,
    IdempotencyConflict,
    InvalidTransition,
    PayloadError,
    TaskError,
    TaskNotFound,
    UnknownTask,
)

log = logging.getLogger("conveyor.api")

PROBLEM_JSON = "application/problem+json"
_TYPE = "urn:conveyor:problem:"


class ApiProblem(Exception):
    """Raised by routes for a failure they describe themselves."""

    def __init__(
        self,
        status: int,
        detail: str,
        *,
        kind: str | None = None,
        errors: Sequence[dict[str, str]] | None = None,
        headers: dict[str, str] | None = None,
        **extra: Any,
    ) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail
        self.kind = kind
        self.errors = errors
        self.headers = headers
        self.extra = extra


def invalid_field(field: str, message: str, *, status: int = 422, kind: str = "validation") -> ApiProblem:
    """A problem with one named field, shaped like a validation error."""
    return ApiProblem(
        status, f"{field}: {message}", kind=kind, errors=[{"field": field, "message": message, "type": kind}]
    )


def problem_response(
    status: int,
    detail: str | None = None,
    *,
    kind: str | None = None,
    title: str | None = None,
    errors: Sequence[dict[str, str]] | None = None,
    headers: dict[str, str] | None = None,
    **extra: Any,
) -> JSONResponse:
    body: dict[str, Any] = {
        "type": _TYPE + kind if kind else "about:blank",
        "title": title or _phrase(status),
        "status": status,
    }
    if detail is not None:
        body["detail"] = detail
    if errors:
        body["errors"] = list(errors)
    body.update({k: v for k, v in extra.items() if v is not None})
    return JSONResponse(body, status_code=status, headers=headers, media_type=PROBLEM_JSON)


def install_error_handlers(app: FastAPI) -> None:
    handlers: list[tuple[type[Exception], Any]] = [
        (RequestValidationError, _on_validation_error),
        (StarletteHTTPException, _on_http_error),
        (ApiProblem, _on_api_problem),
        (TaskNotFound, _on_task_not_found),
        (InvalidTransition, _on_invalid_transition),
        (IdempotencyConflict, _on_idempotency_conflict),
        (UnknownTask, _on_unknown_task),
        (PayloadError, _on_payload_error),
        (ConfigError, _on_config_error),
        (DatabaseError, _on_database_error),
        (sqlalchemy.exc.DBAPIError, _on_driver_error),
        (TaskError, _on_task_error),
        (ConveyorError, _on_unexpected),
        (Exception, _on_unexpected),
    ]
    for exc_class, handler in handlers:
        app.add_exception_handler(exc_class, handler)


# -- handlers ---------------------------------------------------------------------------------------


async def _on_validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    errors = [
        {"field": _field(error.get("loc", ())), "message": _message(error), "type": str(error.get("type", "invalid"))}
        for error in exc.errors()
    ]
    first = errors[0] if errors else {"field": "request", "message": "invalid"}
    more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
    # Never echo the input: it may be large, or hold something the client should not see in logs.
    return problem_response(422, f"{first['field']}: {first['message']}{more}", kind="validation", errors=errors)


async def _on_http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    detail = exc.detail if isinstance(exc.detail, str) and exc.detail != _phrase(exc.status_code) else None
    if exc.status_code == 404 and detail is None:
        detail = f"nothing at {request.url.path}"
    if exc.status_code == 405 and detail is None:
        detail = f"{request.method} is not allowed here"
    return problem_response(exc.status_code, detail, headers=dict(exc.headers or {}))


async def _on_api_problem(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ApiProblem)
    return problem_response(exc.status, exc.detail, kind=exc.kind, errors=exc.errors, headers=exc.headers, **exc.extra)


async def _on_task_not_found(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, TaskNotFound)
    return problem_response(404, str(exc), kind="task-not-found", task_id=exc.task_id)


async def _on_invalid_transition(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, InvalidTransition)
    task_id = exc.task_id if exc.task_id > 0 else None
    return problem_response(409, str(exc), kind="invalid-transition", task_id=task_id, state=exc.state)


async def _on_idempotency_conflict(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, IdempotencyConflict)
    return problem_response(409, str(exc), kind="idempotency-conflict", task_id=exc.existing_id)


async def _on_unknown_task(request: Request, exc: Exception) -> JSONResponse:
    errors = [{"field": "body.name", "message": str(exc), "type": "unknown-task"}]
    return problem_response(422, str(exc), kind="unknown-task", errors=errors)


async def _on_payload_error(request: Request, exc: Exception) -> JSONResponse:
    # Payloads over the size limit are turned into 413 where they are enqueued; what reaches here is
    # JSON that cannot be stored (a NUL character, a non-finite number).
    return problem_response(422, str(exc), kind="invalid-payload")


async def _on_config_error(request: Request, exc: Exception) -> JSONResponse:
    return problem_response(422, str(exc), kind="invalid-configuration")


async def _on_database_error(request: Request, exc: Exception) -> JSONResponse:
    log.warning("database unavailable during %s %s: %s", request.method, request.url.path, exc)
    return _database_unavailable()


async def _on_driver_error(request: Request, exc: Exception) -> JSONResponse:
    # Stores not yet translating their driver errors: translate here (the message loses URL and params).
    try:
        with translate_errors():
            raise exc
    except DatabaseError as translated:
        log.warning("database unavailable during %s %s: %s", request.method, request.url.path, translated)
    except Exception:  # an integrity error nobody expected: a bug, not the client's input
        return await _on_unexpected(request, exc)
    return _database_unavailable()


async def _on_task_error(request: Request, exc: Exception) -> JSONResponse:
    return problem_response(422, str(exc), kind="task-error")


async def _on_unexpected(request: Request, exc: Exception) -> JSONResponse:
    log.error("unhandled error in %s %s", request.method, request.url.path, exc_info=exc)
    return problem_response(500, "an unexpected error occurred; it has been logged", kind="internal")


# -- helpers ----------------------------------------------------------------------------------------


def _database_unavailable() -> JSONResponse:
    return problem_response(
        503, "the database is unavailable; try again shortly", kind="database-unavailable", headers={"Retry-After": "5"}
    )


def _phrase(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Error"


def _field(loc: Sequence[Any]) -> str:
    return ".".join(str(part) for part in loc) or "request"


def _message(error: Any) -> str:
    message = str(error.get("msg", "invalid"))
    # pydantic prefixes messages of custom validators with "Value error, ".
    return message.removeprefix("Value error, ")
