"""initial schema: tasks, events, workers, queues

Revision ID: 0001
Revises:
Create Date: 2026-11-22 06:43:11.528205
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "conveyor_queues",
        sa.Column("name", sa.Text(), nullable=False),
        sa.Column("paused", sa.Boolean(), server_default=sa.text("false"), nullable=False),
        sa.Column("concurrency_limit", sa.Integer(), nullable=True),
        sa.Column("rate_limit_per_s", sa.Double(), nullable=True),
        sa.Column("updated_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.CheckConstraint(
            "concurrency_limit IS NULL OR concurrency_limit >= 0",
            name=op.f("ck_conveyor_queues_concurrency_limit_valid"),
        ),
        sa.CheckConstraint(
            "rate_limit_per_s IS NULL OR rate_limit_per_s > 0", name=op.f("ck_conveyor_queues_rate_limit_valid")
        ),
        sa.PrimaryKeyConstraint("name", name=op.f("pk_conveyor_queues")),
    )
    op.create_table(
        "conveyor_tasks",
        sa.Column("id", sa.BigInteger(), sa.Identity(always=False), nullable=False),
        sa.Column("name", sa.Text(), nullable=False),
        sa.Column("queue", sa.Text(), nullable=False),
        sa.Column("state", sa.Text(), nullable=False),
        sa.Column("priority", sa.SmallInteger(), server_default=sa.text("0"), nullable=False),
        sa.Column(
            "args", postgresql.JSONB(astext_type=sa.Text()), server_default=sa.text("'[]'::jsonb"), nullable=False
        ),
        sa.Column(
            "kwargs", postgresql.JSONB(astext_type=sa.Text()), server_default=sa.text("'{}'::jsonb"), nullable=False
        ),
        sa.Column(
            "metadata", postgresql.JSONB(astext_type=sa.Text()), server_default=sa.text("'{}'::jsonb"), nullable=False
        ),
        sa.Column("result", postgresql.JSONB(astext_type=sa.Text()), nullable=True),
        sa.Column("last_error", postgresql.JSONB(astext_type=sa.Text()), nullable=True),
        sa.Column("attempt", sa.Integer(), server_default=sa.text("0"), nullable=False),
        sa.Column("max_attempts", sa.Integer(), server_default=sa.text("3"), nullable=False),
        sa.Column("worker_losses", sa.Integer(), server_default=sa.text("0"), nullable=False),
        sa.Column("lease_token", sa.UUID(as_uuid=False), nullable=True),
        sa.Column("lease_expires_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("worker_id", sa.UUID(as_uuid=False), nullable=True),
        sa.Column("cancel_requested", sa.Boolean(), server_default=sa.text("false"), nullable=False),
        sa.Column("timeout_s", sa.Double(), nullable=True),
        sa.Column("idempotency_key", sa.Text(), nullable=True),
        sa.Column("payload_hash", sa.Text(), nullable=True),
        sa.Column("unique_key", sa.Text(), nullable=True),
        sa.Column("run_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.CheckConstraint(
            "state <> 'running' OR lease_token IS NOT NULL", name=op.f("ck_conveyor_tasks_running_has_lease")
        ),
        sa.CheckConstraint(
            "state IN ('scheduled', 'queued', 'running', 'succeeded', 'dead', 'cancelled', 'blocked')",
            name=op.f("ck_conveyor_tasks_state_known"),
        ),
        sa.CheckConstraint(
            "attempt >= 0 AND max_attempts >= 1 AND worker_losses >= 0", name=op.f("ck_conveyor_tasks_counters_valid")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_conveyor_tasks")),
    )
    op.create_index(
        "ix_conveyor_tasks_claim",
        "conveyor_tasks",
        ["queue", sa.literal_column("priority DESC"), "run_at", "id"],
        unique=False,
        postgresql_where=sa.text("state IN ('scheduled', 'queued')"),
    )
    op.create_index(
        "ix_conveyor_tasks_created_at", "conveyor_tasks", ["created_at"], unique=False, postgresql_using="brin"
    )
    op.create_index(
        "ix_conveyor_tasks_idempotency_key",
        "conveyor_tasks",
        ["idempotency_key"],
        unique=True,
        postgresql_where=sa.text("idempotency_key IS NOT NULL"),
    )
    op.create_index(
        "ix_conveyor_tasks_lease",
        "conveyor_tasks",
        ["lease_expires_at"],
        unique=False,
        postgresql_where=sa.text("state = 'running'"),
    )
    op.create_index(
        "ix_conveyor_tasks_scheduled",
        "conveyor_tasks",
        ["run_at"],
        unique=False,
        postgresql_where=sa.text("state = 'scheduled'"),
    )
    op.create_index("ix_conveyor_tasks_state_queue", "conveyor_tasks", ["state", "queue"], unique=False)
    op.create_index(
        "ix_conveyor_tasks_unique_key",
        "conveyor_tasks",
        ["unique_key"],
        unique=True,
        postgresql_where=sa.text("unique_key IS NOT NULL AND state IN ('scheduled', 'queued', 'running', 'blocked')"),
    )
    op.create_table(
        "conveyor_workers",
        sa.Column("id", sa.UUID(as_uuid=False), nullable=False),
        sa.Column("name", sa.Text(), nullable=False),
        sa.Column("host", sa.Text(), nullable=False),
        sa.Column("pid", sa.Integer(), nullable=False),
        sa.Column("queues", postgresql.ARRAY(sa.Text()), nullable=False),
        sa.Column("concurrency", sa.Integer(), nullable=False),
        sa.Column("task_names", postgresql.ARRAY(sa.Text()), server_default=sa.text("'{}'::text[]"), nullable=False),
        sa.Column("state", sa.Text(), server_default=sa.text("'running'"), nullable=False),
        sa.Column("paused", sa.Boolean(), server_default=sa.text("false"), nullable=False),
        sa.Column("drain_requested", sa.Boolean(), server_default=sa.text("false"), nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.Column("last_heartbeat_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.Column("stopped_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column(
            "metadata", postgresql.JSONB(astext_type=sa.Text()), server_default=sa.text("'{}'::jsonb"), nullable=False
        ),
        sa.CheckConstraint("state IN ('running', 'draining', 'stopped')", name=op.f("ck_conveyor_workers_state_known")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_conveyor_workers")),
    )
    op.create_index("ix_conveyor_workers_last_heartbeat_at", "conveyor_workers", ["last_heartbeat_at"], unique=False)
    op.create_table(
        "conveyor_task_events",
        sa.Column("id", sa.BigInteger(), sa.Identity(always=False), nullable=False),
        sa.Column("task_id", sa.BigInteger(), nullable=False),
        sa.Column("at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.Column("kind", sa.Text(), nullable=False),
        sa.Column("attempt", sa.Integer(), nullable=False),
        sa.Column("worker_id", sa.UUID(as_uuid=False), nullable=True),
        sa.Column("detail", postgresql.JSONB(astext_type=sa.Text()), nullable=True),
        sa.ForeignKeyConstraint(
            ["task_id"],
            ["conveyor_tasks.id"],
            name=op.f("fk_conveyor_task_events_task_id_conveyor_tasks"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_conveyor_task_events")),
    )
    op.create_index("ix_conveyor_task_events_task_id", "conveyor_task_events", ["task_id", "id"], unique=False)


def downgrade() -> None:
    op.drop_index("ix_conveyor_task_events_task_id", table_name="conveyor_task_events")
    op.drop_table("conveyor_task_events")
    op.drop_index("ix_conveyor_workers_last_heartbeat_at", table_name="conveyor_workers")
    op.drop_table("conveyor_workers")
    op.drop_index(
        "ix_conveyor_tasks_unique_key",
        table_name="conveyor_tasks",
        postgresql_where=sa.text("unique_key IS NOT NULL AND state IN ('scheduled', 'queued', 'running', 'blocked')"),
    )
    op.drop_index("ix_conveyor_tasks_state_queue", table_name="conveyor_tasks")
    op.drop_index("ix_conveyor_tasks_scheduled", table_name="conveyor_tasks")
    op.drop_index("ix_conveyor_tasks_lease", table_name="conveyor_tasks", postgresql_where=sa.text("state = 'running'"))
    op.drop_index("ix_conveyor_tasks_idempotency_key", table_name="conveyor_tasks")
    op.drop_index("ix_conveyor_tasks_created_at", table_name="conveyor_tasks")
    op.drop_index(
        "ix_conveyor_tasks_claim",
        table_name="conveyor_tasks",
        postgresql_where=sa.text("state IN ('scheduled', 'queued')"),
    )
    op.drop_table("conveyor_tasks")
    op.drop_table("conveyor_queues")
