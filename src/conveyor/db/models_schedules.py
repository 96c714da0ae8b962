"""Tables of the scheduler (schedules, their runs, leader leases, scheduler processes). Schema changes go with
migrations 0003 and 0006 (``conveyor_scheduler_processes``).

What makes a tick impossible to lose or double is in the constraints, not in application code:
``conveyor_schedule_runs`` holds one row per (schedule, fire time), the task of each run carries the
unique idempotency key ``schedule:<id>:<fire time>``, and ``conveyor_leases`` holds the fencing token every
enqueueing transaction must still present (see ``schedule_store``).
"""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Boolean,
    CheckConstraint,
    Column,
    DateTime,
    Double,
    ForeignKey,
    Identity,
    Index,
    Integer,
    SmallInteger,
    Table,
    Text,
    UniqueConstraint,
    func,
    text,
)
from sqlalchemy.dialects.postgresql import JSONB

from conveyor.db.models import metadata

schedules = Table(
    "conveyor_schedules",
    metadata,
    Column("id", BigInteger, Identity(always=False), primary_key=True),
    Column("name", Text, nullable=False),
    Column("task_name", Text, nullable=False),
    Column("cron", Text, nullable=True),
    Column("interval_s", Integer, nullable=True),
    Column("timezone", Text, nullable=False, server_default=text("'UTC'")),
    Column("args", JSONB, nullable=False, server_default=text("'[]'::jsonb")),
    Column("kwargs", JSONB, nullable=False, server_default=text("'{}'::jsonb")),
    # NULL queue or priority: the task's own default, resolved at each enqueue.
    Column("queue", Text, nullable=True),
    Column("priority", SmallInteger, nullable=True),
    Column("enabled", Boolean, nullable=False, server_default=text("true")),
    # Why a schedule is disabled: 'paused' by an operator, or 'removed' from the code that declared it.
    # Kept apart so that a schedule that comes back in code is re-enabled but an operator's pause holds.
    Column("disabled_reason", Text, nullable=True),
    Column("misfire_policy", Text, nullable=False, server_default=text("'once'")),
    Column("max_lateness_s", Double, nullable=True),
    # The cursor: every fire time before it has been dealt with (enqueued or skipped by the policy).
    Column("next_fire_at", DateTime(timezone=True), nullable=False),
    # The latest fire time actually enqueued.
    Column("last_fire_at", DateTime(timezone=True), nullable=True),
    Column("source", Text, nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    Column("updated_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    UniqueConstraint("name"),
    CheckConstraint("(cron IS NULL) <> (interval_s IS NULL)", name="cron_xor_interval"),
    CheckConstraint("interval_s IS NULL OR interval_s >= 1", name="interval_valid"),
    CheckConstraint("misfire_policy IN ('skip', 'once', 'all')", name="misfire_policy_known"),
    CheckConstraint("max_lateness_s IS NULL OR max_lateness_s > 0", name="max_lateness_valid"),
    CheckConstraint("source IN ('code', 'api')", name="source_known"),
    CheckConstraint(
        "(enabled AND disabled_reason IS NULL) OR (NOT enabled AND disabled_reason IN ('paused', 'removed'))",
        name="disabled_reason_valid",
    ),
    # The leader's "what is due" scan: enabled schedules by cursor only.
    Index("ix_conveyor_schedules_next_fire_at", "next_fire_at", postgresql_where=text("enabled")),
)

schedule_runs = Table(
    "conveyor_schedule_runs",
    metadata,
    Column("id", BigInteger, Identity(always=False), primary_key=True),
    Column("schedule_id", BigInteger, ForeignKey("conveyor_schedules.id", ondelete="CASCADE"), nullable=False),
    Column("fire_at", DateTime(timezone=True), nullable=False),
    # NULL once the task has been deleted (pruned); the run itself stays on record.
    Column("task_id", BigInteger, ForeignKey("conveyor_tasks.id", ondelete="SET NULL"), nullable=True),
    Column("enqueued_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    # 'schedule': a tick of the cadence; 'manual': an operator's trigger.
    Column("kind", Text, nullable=False, server_default=text("'schedule'")),
    # The leader term that enqueued a tick (NULL for a manual run): the audit trail of the fencing.
    Column("fencing_token", BigInteger, nullable=True),
    # One run per schedule and fire time, whoever believes it leads: the database says no to a second.
    UniqueConstraint("schedule_id", "fire_at"),
    CheckConstraint("kind IN ('schedule', 'manual')", name="kind_known"),
    # Deleting (pruning) tasks sets task_id to NULL here; without this index each delete scans the runs.
    Index("ix_conveyor_schedule_runs_task_id", "task_id"),
)

leases = Table(
    "conveyor_leases",
    metadata,
    Column("name", Text, primary_key=True),
    Column("holder", Text, nullable=False),
    # Bumped on every change of holder (and re-acquisition): each enqueueing transaction presents the
    # token it was granted, so a leader that lost the lease, however briefly, can never write again.
    Column("fencing_token", BigInteger, nullable=False),
    Column("expires_at", DateTime(timezone=True), nullable=False),
    Column("acquired_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    Column("renewed_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    CheckConstraint("fencing_token >= 1", name="fencing_token_valid"),
)

# One row per running scheduler process, written by the process itself once per lease cycle (on the
# database clock) and deleted when it stops gracefully, so that any process (the API) can tell which
# schedulers run, which one leads, and whose clock is off. A row that is no longer refreshed belongs to a
# process that was killed or cut off: it is reported stale, and the leader deletes it after
# ``scheduler.stale_retention_s``.
scheduler_processes = Table(
    "conveyor_scheduler_processes",
    metadata,
    # The process's lease holder name (host:pid:random), as it appears in conveyor_leases.holder.
    Column("id", Text, primary_key=True),
    Column("host", Text, nullable=False),
    Column("pid", Integer, nullable=False),
    Column("started_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    Column("last_seen_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    # Not seen for longer than this, the process is stale (it set it from its own lease cycle).
    Column("stale_after_s", Double, nullable=False),
    # Whether it held the leader lease at its last report, and under which fencing token.
    Column("is_leader", Boolean, nullable=False, server_default=text("false")),
    Column("fencing_token", BigInteger, nullable=True),
    # The database clock minus this process's host clock at its last measurement (NULL: not measured yet).
    Column("clock_skew_s", Double, nullable=True),
    # Set while the skew is beyond the process's max_clock_skew_s.
    Column("warning", Text, nullable=True),
    CheckConstraint("NOT is_leader OR fencing_token IS NOT NULL", name="leader_has_token"),
    CheckConstraint("stale_after_s > 0", name="stale_after_valid"),
)
