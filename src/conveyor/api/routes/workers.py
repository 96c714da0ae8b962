"""``/api/v1/workers``: who is running what; pause, resume, drain, forget (admin)."""

from __future__ import annotations

from typing import Annotated
from uuid import UUID

from fastapi import APIRouter, Path, Response, status

from conveyor.api.auth import Scope
from conveyor.api.deps import ServicesDep, require
from conveyor.api.errors import ApiProblem
from conveyor.api.routes import problems
from conveyor.api.schemas import WorkerOut, WorkersOut
from conveyor.db.worker_store import WorkerRecord

router = APIRouter(prefix="/workers", tags=["workers"])

WorkerPath = Annotated[UUID, Path(description="The worker id.")]

_READ = [require(Scope.TASKS_READ)]
_ADMIN = [require(Scope.ADMIN)]


@router.get("", dependencies=_READ)
async def list_workers(services: ServicesDep) -> WorkersOut:
    """Every registered worker, newest first, with the tasks it is running and its last heartbeat."""
    return WorkersOut(items=[_worker_out(w) for w in await services.workers.list()])


@router.get("/{worker_id}", dependencies=_READ, responses=problems(404))
async def get_worker(worker_id: WorkerPath, services: ServicesDep) -> WorkerOut:
    """One worker: host, pid, queues, concurrency, running tasks, last heartbeat, the tasks it can run."""
    return _worker_out(await _found(services, worker_id))


@router.post("/{worker_id}/drain", dependencies=_ADMIN, responses=problems(404, 409))
async def drain_worker(worker_id: WorkerPath, services: ServicesDep) -> WorkerOut:
    """Ask the worker to finish its running tasks and exit (it sees this at its next heartbeat)."""
    await _alive(services, worker_id, "drain")
    await services.workers.request_drain(str(worker_id))
    return _worker_out(await _found(services, worker_id))


@router.post("/{worker_id}/pause", dependencies=_ADMIN, responses=problems(404, 409))
async def pause_worker(worker_id: WorkerPath, services: ServicesDep) -> WorkerOut:
    """Ask the worker to stop claiming tasks (running ones finish) until resumed."""
    await _alive(services, worker_id, "pause")
    await services.workers.set_paused(str(worker_id), True)
    return _worker_out(await _found(services, worker_id))


@router.post("/{worker_id}/resume", dependencies=_ADMIN, responses=problems(404, 409))
async def resume_worker(worker_id: WorkerPath, services: ServicesDep) -> WorkerOut:
    """Let a paused worker claim tasks again."""
    await _alive(services, worker_id, "resume")
    await services.workers.set_paused(str(worker_id), False)
    return _worker_out(await _found(services, worker_id))


@router.delete(
    "/{worker_id}",
    status_code=status.HTTP_204_NO_CONTENT,
    dependencies=_ADMIN,
    responses=problems(404, 409),
    response_class=Response,
)
async def forget_worker(worker_id: WorkerPath, services: ServicesDep) -> None:
    """Forget a worker that stopped or stopped heartbeating. A live worker is a 409.

    Its tasks are not affected: leases, not worker rows, decide when they are rescued."""
    await _found(services, worker_id)
    if not await services.workers.forget_if_gone(str(worker_id), services.app.settings.worker.lease_timeout_s):
        detail = f"worker {worker_id} is alive (heartbeat within the lease timeout); drain it first"
        raise ApiProblem(409, detail, kind="worker-alive")


async def _found(services: ServicesDep, worker_id: UUID) -> WorkerRecord:
    record = await services.workers.get(str(worker_id))
    if record is None:
        raise ApiProblem(404, f"no worker with id {worker_id}", kind="worker-not-found")
    return record


async def _alive(services: ServicesDep, worker_id: UUID, action: str) -> None:
    record = await _found(services, worker_id)
    if record.state == "stopped":
        raise ApiProblem(409, f"cannot {action} worker {worker_id}: it has stopped", kind="worker-stopped")


def _worker_out(record: WorkerRecord) -> WorkerOut:
    return WorkerOut.model_validate(record, from_attributes=True)
