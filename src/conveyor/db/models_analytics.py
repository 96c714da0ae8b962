"""The task statistics rollup behind ``/analytics``. Schema changes go with migration 0005.

Analytics must not cost more as the task table grows (a stats query over millions of rows is how
dashboards die). So finished minutes are counted once into ``conveyor_task_stats``: one row per
(queue, task name, minute), plus the totals per queue, per name and overall in rows whose queue and/or
name is ``''`` (``GROUP BY GROUPING SETS``). A week of any series is then a primary-key range scan of
at most 10,080 rows, whatever the number of tasks; only the few minutes not yet rolled up are read
from ``conveyor_tasks``. ``conveyor_task_stats_progress`` (one row) says which minutes are rolled up:
``[rolled_from, rolled_until)``. See ``analytics_store`` for how it advances.
"""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    CheckConstraint,
    Column,
    DateTime,
    Double,
    Index,
    SmallInteger,
    Table,
    Text,
    text,
)

from conveyor.db.models import metadata

task_stats = Table(
    "conveyor_task_stats",
    metadata,
    Column("queue", Text, primary_key=True),  # '' = all queues
    Column("name", Text, primary_key=True),  # '' = all task names
    Column("minute", DateTime(timezone=True), primary_key=True),
    Column("enqueued", BigInteger, nullable=False, server_default=text("0")),
    Column("succeeded", BigInteger, nullable=False, server_default=text("0")),
    Column("dead", BigInteger, nullable=False, server_default=text("0")),
    Column("cancelled", BigInteger, nullable=False, server_default=text("0")),
    # Finished tasks that ran (a task cancelled before it started has no run time).
    Column("run_count", BigInteger, nullable=False, server_default=text("0")),
    Column("run_s_sum", Double, nullable=False, server_default=text("0")),  # finished_at - started_at
    Column("wait_s_sum", Double, nullable=False, server_default=text("0")),  # started_at - run_at
    # For expiring old minutes; reads go by the primary key.
    Index("ix_conveyor_task_stats_minute", "minute"),
)

task_stats_progress = Table(
    "conveyor_task_stats_progress",
    metadata,
    Column("id", SmallInteger, primary_key=True, autoincrement=False),
    Column("rolled_from", DateTime(timezone=True), nullable=False),
    Column("rolled_until", DateTime(timezone=True), nullable=False),
    CheckConstraint("id = 1", name="singleton"),
    CheckConstraint("rolled_from <= rolled_until", name="range_valid"),
)
