"""The API's routes, one module per resource. Each route declares its scope with ``require(...)``
(a route that declares none needs ``admin``: see ``conveyor.api.deps``) and documents every status it
can answer with, so generated clients and schema-driven tests know them all."""

from __future__ import annotations

from typing import Any

from conveyor.api.errors import PROBLEM_JSON

_DESCRIPTIONS = {
    400: "The request could not be read (e.g. a malformed body).",
    401: "No API key, or one that is malformed, unknown or revoked.",
    403: "The API key lacks the scope this needs.",
    404: "No such resource.",
    409: "The resource's state does not allow this.",
    413: "The request body (or a task's payload) is over the size limit.",
    422: "A field is invalid; `errors` names each one.",
    429: "Too many bad API keys from this client; see Retry-After.",
    500: "An unexpected error (logged on the server).",
    503: "The database is unavailable; see Retry-After.",
}


def problems(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses`` entries for problem-details answers with these statuses."""
    return {
        status: {
            "description": _DESCRIPTIONS[status],
            "content": {PROBLEM_JSON: {"schema": {"$ref": "#/components/schemas/Problem"}}},
        }
        for status in statuses
    }


#: What any route behind authentication can answer besides its own outcomes.
AUTHENTICATED = problems(400, 401, 403, 413, 422, 429, 500, 503)
