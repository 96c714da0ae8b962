"""The OpenAPI document is good enough to generate clients from: every operation is named, described,
secured as it really is, and documents its errors as problem details."""

from __future__ import annotations

from typing import Any

import httpx

from conveyor.api.deps import PUBLIC_PATHS
from conveyor.core.states import TaskState

METHODS = {"get", "post", "put", "patch", "delete"}


async def test_document__operations_are_named_described_and_secured(anonymous: httpx.AsyncClient) -> None:
    document: dict[str, Any] = (await anonymous.get("/openapi.json")).json()

    assert document["openapi"].startswith("3.")
    assert document["components"]["securitySchemes"]["ApiKey"] == {
        "type": "http",
        "scheme": "bearer",
        "bearerFormat": "cvk_...",
        "description": document["components"]["securitySchemes"]["ApiKey"]["description"],
    }
    problem = document["components"]["schemas"]["Problem"]
    assert {"type", "title", "status", "detail", "errors"} <= set(problem["properties"])
    operation_ids = []
    for path, item in document["paths"].items():
        for method, operation in item.items():
            if method not in METHODS:
                continue
            where = f"{method.upper()} {path}"
            operation_ids.append(operation["operationId"])
            assert operation.get("description") or operation.get("summary"), where
            secured = bool(operation.get("security"))
            assert secured == (path not in PUBLIC_PATHS), where
            for status, response in operation["responses"].items():
                if status.startswith(("4", "5")):
                    assert list(response["content"]) == ["application/problem+json"], (where, status)
            if secured:
                assert {"401", "403", "422", "429", "500"} <= set(operation["responses"]), where
    assert len(operation_ids) == len(set(operation_ids))
    assert {"enqueue_task", "list_tasks", "get_task_result", "pause_queue", "drain_worker", "create_api_key"} <= set(
        operation_ids
    )


async def test_document__types_are_precise(anonymous: httpx.AsyncClient) -> None:
    document: dict[str, Any] = (await anonymous.get("/openapi.json")).json()
    schemas = document["components"]["schemas"]

    task = schemas["TaskOut"]["properties"]
    assert task["id"]["type"] == "integer"
    assert task["created_at"] == {"type": "string", "format": "date-time", "title": "Created At"}
    assert set(schemas["TaskState"]["enum"]) == {s.value for s in TaskState}
    assert schemas["WorkerOut"]["properties"]["id"]["format"] == "uuid"
    enqueue = schemas["EnqueueBody"]
    assert enqueue["additionalProperties"] is False
    assert enqueue["required"] == ["name"]
    list_tasks = document["paths"]["/api/v1/tasks"]["get"]
    limit = next(p for p in list_tasks["parameters"] if p["name"] == "limit")
    assert (limit["schema"]["minimum"], limit["schema"]["maximum"]) == (1, 200)
