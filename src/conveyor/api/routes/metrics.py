"""``/metrics``: Prometheus text format (needs a key with ``tasks:read``, like every non-probe route)."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response

from conveyor.api.auth import Scope
from conveyor.api.deps import ServicesDep, require
from conveyor.api.routes import AUTHENTICATED
from conveyor.monitoring.metrics import CONTENT_TYPE, ApiMetrics

router = APIRouter(tags=["metrics"])


@router.get(
    "/metrics",
    dependencies=[require(Scope.TASKS_READ)],
    response_class=Response,
    responses={
        **AUTHENTICATED,
        200: {"content": {"text/plain": {"schema": {"type": "string"}}}, "description": "Metrics."},
    },
)
async def metrics(request: Request, services: ServicesDep) -> Response:
    """Request counts and latencies of this API process, and every queue's depth per state, oldest
    waiting age, pause flag and live workers (computed now, from the database)."""
    registry = request.app.state.metrics
    assert isinstance(registry, ApiMetrics)
    queues = await services.queues.stats()
    return Response(registry.render(queues), media_type=CONTENT_TYPE)
