"""The task of a schedule's run, built the way every enqueue is (``App.build_request``)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import TYPE_CHECKING

from conveyor.core.records import EnqueueRequest
from conveyor.core.schedule import run_key
from conveyor.core.schedule_records import ScheduleRecord
from conveyor.core.task import EnqueueOptions
from conveyor.handles import Signature

if TYPE_CHECKING:
    from conveyor.app import App


def build_run_request(app: App, schedule: ScheduleRecord, fire_at: datetime) -> EnqueueRequest:
    """The task for ``schedule``'s run at ``fire_at``: its arguments, queue and priority (``None``: the
    task's defaults), the run's idempotency key, and metadata naming the schedule and fire time."""
    definition = schedule.definition
    fire_text = fire_at.astimezone(UTC).isoformat()
    options = EnqueueOptions(
        queue=definition.queue,
        priority=definition.priority,
        idempotency_key=run_key(schedule.id, fire_at),
        metadata={"schedule": definition.name, "schedule_id": schedule.id, "fire_at": fire_text},
    )
    return app.build_request(Signature(definition.task_name, definition.args, definition.kwargs, options))
