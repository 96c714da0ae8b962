"""The maintenance switch (``POST /admin/maintenance``). Schema changes go with migration 0005.

One row at most (``id = 1``). Maintenance pauses queues through ``conveyor_queues.paused``, which the
claim statement already honours; this row remembers *which* queues maintenance paused, so resuming
leaves alone a queue an operator had paused on purpose before.
"""

from __future__ import annotations

from sqlalchemy import Boolean, CheckConstraint, Column, DateTime, Index, SmallInteger, Table, Text, func, text
from sqlalchemy.dialects.postgresql import ARRAY

from conveyor.db.models import metadata, tasks

maintenance = Table(
    "conveyor_maintenance",
    metadata,
    Column("id", SmallInteger, primary_key=True, autoincrement=False),
    Column("active", Boolean, nullable=False, server_default=text("false")),
    Column("reason", Text, nullable=True),
    Column("paused_queues", ARRAY(Text), nullable=False, server_default=text("'{}'::text[]")),
    Column("changed_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    CheckConstraint("id = 1", name="singleton"),
)

# -- an index on conveyor_tasks for searching errors and triaging dead letters --------------------
# Searching error text cannot use an index on the text (ILIKE '%...%'), but it only ever concerns
# tasks that failed at least once. This partial index holds those alone (a task keeps its last error
# once it has one), so an error search walks them newest first instead of reading every task, and
# tasks that never fail, the vast majority, pay nothing for it.
Index("ix_conveyor_tasks_errored", tasks.c.id, postgresql_where=text("last_error IS NOT NULL"))
