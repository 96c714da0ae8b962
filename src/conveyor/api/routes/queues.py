"""``/api/v1/queues``: depth and throughput per queue; pause, resume, purge and limits (admin)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Body, Path

from conveyor.api.auth import Scope
from conveyor.api.deps import ServicesDep, require
from conveyor.api.errors import ApiProblem
from conveyor.api.routes import problems
from conveyor.api.schemas import QUEUE_NAME_PATTERN, PurgeBody, PurgeOut, QueueLimitsBody, QueueOut, QueuesOut
from conveyor.core.states import TaskState
from conveyor.db.queue_store import QueueStats

router = APIRouter(prefix="/queues", tags=["queues"])

QueuePath = Annotated[str, Path(pattern=QUEUE_NAME_PATTERN, max_length=100, description="The queue name.")]

_READ = [require(Scope.TASKS_READ)]
_ADMIN = [require(Scope.ADMIN)]


@router.get("", dependencies=_READ)
async def list_queues(services: ServicesDep) -> QueuesOut:
    """Every known queue (it holds tasks, has settings, or a live worker consumes it) with its depth
    per state, the age of its longest-waiting due task, its last minute's throughput and its workers."""
    return QueuesOut(items=[_queue_out(stats) for stats in await services.queues.stats()])


@router.get("/{name}", dependencies=_READ, responses=problems(404))
async def get_queue(name: QueuePath, services: ServicesDep) -> QueueOut:
    """One queue's statistics and settings."""
    return _queue_out(await _known(services, name))


@router.post("/{name}/pause", dependencies=_ADMIN)
async def pause_queue(name: QueuePath, services: ServicesDep) -> QueueOut:
    """Stop workers from claiming this queue's tasks (running ones finish). The pause is stored in
    the database: it outlasts restarts, and every worker honours it at its next claim."""
    await services.queues.set_paused(name, True)
    return _queue_out(await _known(services, name))


@router.post("/{name}/resume", dependencies=_ADMIN)
async def resume_queue(name: QueuePath, services: ServicesDep) -> QueueOut:
    """Let workers claim this queue's tasks again."""
    await services.queues.set_paused(name, False)
    return _queue_out(await _known(services, name))


@router.post("/{name}/purge", dependencies=_ADMIN)
async def purge_queue(
    name: QueuePath, services: ServicesDep, body: Annotated[PurgeBody | None, Body()] = None
) -> PurgeOut:
    """Delete the queue's waiting tasks (scheduled and queued; `states` to choose) with their
    history. Running and blocked tasks are never purged."""
    states = (body or PurgeBody()).states
    purged = await services.queues.purge(name, [TaskState(s) for s in states])
    return PurgeOut(queue=name, purged=purged)


@router.put("/{name}/limits", dependencies=_ADMIN)
async def set_queue_limits(name: QueuePath, body: QueueLimitsBody, services: ServicesDep) -> QueueOut:
    """Set the queue's concurrency and rate limits (null removes a limit)."""
    await services.queues.set_limits(
        name, concurrency_limit=body.concurrency_limit, rate_limit_per_s=body.rate_limit_per_s
    )
    return _queue_out(await _known(services, name))


async def _known(services: ServicesDep, name: str) -> QueueStats:
    stats = await services.queues.get(name)
    if stats is None:
        raise ApiProblem(404, f"no queue named {name!r} is known", kind="queue-not-found")
    return stats


def _queue_out(stats: QueueStats) -> QueueOut:
    return QueueOut.model_validate(
        {
            "name": stats.name,
            "paused": stats.paused,
            "concurrency_limit": stats.concurrency_limit,
            "rate_limit_per_s": stats.rate_limit_per_s,
            "counts": stats.counts,
            "oldest_waiting_age_s": stats.oldest_waiting_age_s,
            "succeeded_last_minute": stats.succeeded_last_minute,
            "dead_last_minute": stats.dead_last_minute,
            "workers": stats.workers,
        }
    )
