"""Code-declared schedules (``@app.periodic``, ``app.schedule``) into the database, at every start.

New ones are inserted, changed ones updated (a new timing starts from now), ones that are gone are
disabled rather than deleted (their runs stay on record, and they come back enabled if the code brings
them back). Schedules created through the API or the CLI are never touched.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

from conveyor.core.schedule import ScheduleDefinition
from conveyor.db.schedule_store import ScheduleStore, SyncReport

log = logging.getLogger("conveyor.scheduler")


async def sync_code_schedules(store: ScheduleStore, definitions: Iterable[ScheduleDefinition]) -> SyncReport:
    report = await store.sync(list(definitions))
    for verb, names in (
        ("added", report.created),
        ("updated", report.updated),
        ("re-enabled", report.reenabled),
        ("disabled (no longer declared in code)", report.disabled),
    ):
        if names:
            log.info("code schedules %s: %s", verb, ", ".join(names))
    for name in report.conflicts:
        log.warning(
            "schedule %r is declared in code but a schedule of that name was created through the API; "
            "the API one is kept (rename one of them)",
            name,
        )
    return report
