"""The schema, as SQLAlchemy Core metadata. Alembic migrations must always produce exactly this
(``tests/migration`` proves it); change both together."""

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
    MetaData,
    SmallInteger,
    Table,
    Text,
    func,
    text,
)
from sqlalchemy.dialects.postgresql import ARRAY, JSONB, UUID

from conveyor.core.states import TaskState

metadata = MetaData(
    naming_convention={
        "ix": "ix_%(table_name)s_%(column_0_N_name)s",
        "uq": "uq_%(table_name)s_%(column_0_N_name)s",
        "ck": "ck_%(table_name)s_%(constraint_name)s",
        "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
        "pk": "pk_%(table_name)s",
    }
)

_STATES = ", ".join(f"'{s.value}'" for s in TaskState)
# Kept as literal SQL because partial-index predicates must match the migration text exactly.
_UNIQUE_HOLDING = "unique_key IS NOT NULL AND state IN ('scheduled', 'queued', 'running', 'blocked')"
_CLAIMABLE = "state IN ('scheduled', 'queued')"

tasks = Table(
    "conveyor_tasks",
    metadata,
    Column("id", BigInteger, Identity(always=False), primary_key=True),
    Column("name", Text, nullable=False),
    Column("queue", Text, nullable=False),
    Column("state", Text, nullable=False),
    Column("priority", SmallInteger, nullable=False, server_default=text("0")),
    Column("args", JSONB, nullable=False, server_default=text("'[]'::jsonb")),
    Column("kwargs", JSONB, nullable=False, server_default=text("'{}'::jsonb")),
    Column("metadata", JSONB, nullable=False, server_default=text("'{}'::jsonb")),
    Column("result", JSONB, nullable=True),
    Column("last_error", JSONB, nullable=True),
    # attempt counts claims that were not given back by a shutting-down worker; each claim bumps it
    # and issues a fresh lease_token, and every write for that attempt must present both (fencing).
    Column("attempt", Integer, nullable=False, server_default=text("0")),
    Column("max_attempts", Integer, nullable=False, server_default=text("3")),
    Column("worker_losses", Integer, nullable=False, server_default=text("0")),
    Column("lease_token", UUID(as_uuid=False), nullable=True),
    Column("lease_expires_at", DateTime(timezone=True), nullable=True),
    Column("worker_id", UUID(as_uuid=False), nullable=True),
    Column("cancel_requested", Boolean, nullable=False, server_default=text("false")),
    Column("timeout_s", Double, nullable=True),
    Column("idempotency_key", Text, nullable=True),
    Column("payload_hash", Text, nullable=True),
    Column("unique_key", Text, nullable=True),
    Column("run_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    Column("created_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    Column("started_at", DateTime(timezone=True), nullable=True),
    Column("finished_at", DateTime(timezone=True), nullable=True),
    # The workflow this task is a step of (see models_workflows; no foreign key on purpose).
    Column("workflow_id", BigInteger, nullable=True),
    CheckConstraint(f"state IN ({_STATES})", name="state_known"),
    CheckConstraint("attempt >= 0 AND max_attempts >= 1 AND worker_losses >= 0", name="counters_valid"),
    CheckConstraint("state <> 'running' OR lease_token IS NOT NULL", name="running_has_lease"),
    # The claim: per queue, highest priority first, then the earliest run time. Partial, so finished
    # rows (the vast majority in a busy system) never enter it and it stays small.
    Index(
        "ix_conveyor_tasks_claim",
        "queue",
        text("priority DESC"),
        "run_at",
        "id",
        postgresql_where=text(_CLAIMABLE),
    ),
    # Recovery scans only running rows by lease expiry.
    Index("ix_conveyor_tasks_lease", "lease_expires_at", postgresql_where=text("state = 'running'")),
    # Partial: most tasks have no key, and an index entry per NULL would tax every plain enqueue.
    Index(
        "ix_conveyor_tasks_idempotency_key",
        "idempotency_key",
        unique=True,
        postgresql_where=text("idempotency_key IS NOT NULL"),
    ),
    # Uniqueness is a database guarantee, not an application check: only one holder at a time.
    Index(
        "ix_conveyor_tasks_unique_key",
        "unique_key",
        unique=True,
        postgresql_where=text(_UNIQUE_HOLDING),
    ),
    # Promotion of due scheduled tasks and an idle worker's "when is the next one due" both walk this.
    Index("ix_conveyor_tasks_scheduled", "run_at", postgresql_where=text("state = 'scheduled'")),
    # BRIN: created_at only grows with the table, so a block-range index serves time-range filters at a
    # tiny fraction of a B-tree's cost on every insert.
    Index("ix_conveyor_tasks_created_at", "created_at", postgresql_using="brin"),
    Index("ix_conveyor_tasks_state_queue", "state", "queue"),
    # Partial: only workflow steps enter it, so plain tasks pay nothing for it.
    Index("ix_conveyor_tasks_workflow_id", "workflow_id", postgresql_where=text("workflow_id IS NOT NULL")),
)

task_events = Table(
    "conveyor_task_events",
    metadata,
    Column("id", BigInteger, Identity(always=False), primary_key=True),
    Column("task_id", BigInteger, ForeignKey("conveyor_tasks.id", ondelete="CASCADE"), nullable=False),
    Column("at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    Column("kind", Text, nullable=False),
    Column("attempt", Integer, nullable=False),
    Column("worker_id", UUID(as_uuid=False), nullable=True),
    Column("detail", JSONB, nullable=True),
    Index("ix_conveyor_task_events_task_id", "task_id", "id"),
)

workers = Table(
    "conveyor_workers",
    metadata,
    Column("id", UUID(as_uuid=False), primary_key=True),
    Column("name", Text, nullable=False),
    Column("host", Text, nullable=False),
    Column("pid", Integer, nullable=False),
    Column("queues", ARRAY(Text), nullable=False),
    Column("concurrency", Integer, nullable=False),
    Column("task_names", ARRAY(Text), nullable=False, server_default=text("'{}'::text[]")),
    Column("state", Text, nullable=False, server_default=text("'running'")),
    Column("paused", Boolean, nullable=False, server_default=text("false")),
    Column("drain_requested", Boolean, nullable=False, server_default=text("false")),
    Column("started_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    Column("last_heartbeat_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    Column("stopped_at", DateTime(timezone=True), nullable=True),
    Column("metadata", JSONB, nullable=False, server_default=text("'{}'::jsonb")),
    CheckConstraint("state IN ('running', 'draining', 'stopped')", name="state_known"),
    Index("ix_conveyor_workers_last_heartbeat_at", "last_heartbeat_at"),
)

queues = Table(
    "conveyor_queues",
    metadata,
    Column("name", Text, primary_key=True),
    Column("paused", Boolean, nullable=False, server_default=text("false")),
    Column("concurrency_limit", Integer, nullable=True),
    Column("rate_limit_per_s", Double, nullable=True),
    Column("updated_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    # The rate limit's token bucket (conveyor.db.limit_sql): tokens left at rate_tokens_at, on the
    # database clock. Written only by claims of rate-limited queues, under this row's lock.
    Column("rate_tokens", Double, nullable=True),
    Column("rate_tokens_at", DateTime(timezone=True), nullable=True),
    CheckConstraint("concurrency_limit IS NULL OR concurrency_limit >= 0", name="concurrency_limit_valid"),
    CheckConstraint("rate_limit_per_s IS NULL OR rate_limit_per_s > 0", name="rate_limit_valid"),
)


# Tables owned by other subsystems live in their own modules on the same metadata; importing them here
# registers them, so `metadata` (and the migration drift test) always sees the whole schema.
from conveyor.db import models_admin, models_analytics, models_auth, models_debug, models_schedules, models_workflows  # noqa: E402, F401  # noqa: E402, F401
