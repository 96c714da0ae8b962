"""Operations: debug requests to workers, the maintenance switch, the task statistics rollup

Revision ID: 0005
Revises: 0004
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

_PENDING = "answered_at IS NULL"
_ERRORED = "last_error IS NOT NULL"


def upgrade() -> None:
    op.create_table(
        "conveyor_debug_requests",
        sa.Column("id", sa.BigInteger(), sa.Identity(always=False), nullable=False),
        sa.Column("worker_id", postgresql.UUID(as_uuid=False), nullable=False),
        sa.Column("kind", sa.Text(), nullable=False),
        sa.Column("requested_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("answered_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("result", postgresql.JSONB(astext_type=sa.Text()), nullable=True),
        sa.CheckConstraint("kind IN ('stacks')", name=op.f("ck_conveyor_debug_requests_kind_known")),
        sa.ForeignKeyConstraint(
            ["worker_id"],
            ["conveyor_workers.id"],
            name=op.f("fk_conveyor_debug_requests_worker_id_conveyor_workers"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_conveyor_debug_requests")),
    )
    op.create_index(
        "ix_conveyor_debug_requests_pending",
        "conveyor_debug_requests",
        ["worker_id"],
        unique=False,
        postgresql_where=sa.text(_PENDING),
    )
    op.create_index(
        "ix_conveyor_tasks_errored", "conveyor_tasks", ["id"], unique=False, postgresql_where=sa.text(_ERRORED)
    )
    op.create_table(
        "conveyor_maintenance",
        sa.Column("id", sa.SmallInteger(), autoincrement=False, nullable=False),
        sa.Column("active", sa.Boolean(), server_default=sa.text("false"), nullable=False),
        sa.Column("reason", sa.Text(), nullable=True),
        sa.Column("paused_queues", postgresql.ARRAY(sa.Text()), server_default=sa.text("'{}'::text[]"), nullable=False),
        sa.Column("changed_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.CheckConstraint("id = 1", name=op.f("ck_conveyor_maintenance_singleton")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_conveyor_maintenance")),
    )
    op.create_table(
        "conveyor_task_stats",
        sa.Column("queue", sa.Text(), nullable=False),
        sa.Column("name", sa.Text(), nullable=False),
        sa.Column("minute", sa.DateTime(timezone=True), nullable=False),
        sa.Column("enqueued", sa.BigInteger(), server_default=sa.text("0"), nullable=False),
        sa.Column("succeeded", sa.BigInteger(), server_default=sa.text("0"), nullable=False),
        sa.Column("dead", sa.BigInteger(), server_default=sa.text("0"), nullable=False),
        sa.Column("cancelled", sa.BigInteger(), server_default=sa.text("0"), nullable=False),
        sa.Column("run_count", sa.BigInteger(), server_default=sa.text("0"), nullable=False),
        sa.Column("run_s_sum", sa.Double(), server_default=sa.text("0"), nullable=False),
        sa.Column("wait_s_sum", sa.Double(), server_default=sa.text("0"), nullable=False),
        sa.PrimaryKeyConstraint("queue", "name", "minute", name=op.f("pk_conveyor_task_stats")),
    )
    op.create_index("ix_conveyor_task_stats_minute", "conveyor_task_stats", ["minute"], unique=False)
    op.create_table(
        "conveyor_task_stats_progress",
        sa.Column("id", sa.SmallInteger(), autoincrement=False, nullable=False),
        sa.Column("rolled_from", sa.DateTime(timezone=True), nullable=False),
        sa.Column("rolled_until", sa.DateTime(timezone=True), nullable=False),
        sa.CheckConstraint("id = 1", name=op.f("ck_conveyor_task_stats_progress_singleton")),
        sa.CheckConstraint("rolled_from <= rolled_until", name=op.f("ck_conveyor_task_stats_progress_range_valid")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_conveyor_task_stats_progress")),
    )


def downgrade() -> None:
    op.drop_table("conveyor_task_stats_progress")
    op.drop_index("ix_conveyor_task_stats_minute", table_name="conveyor_task_stats")
    op.drop_table("conveyor_task_stats")
    op.drop_table("conveyor_maintenance")
    op.drop_index("ix_conveyor_tasks_errored", table_name="conveyor_tasks", postgresql_where=sa.text(_ERRORED))
    op.drop_index(
        "ix_conveyor_debug_requests_pending", table_name="conveyor_debug_requests", postgresql_where=sa.text(_PENDING)
    )
    op.drop_table("conveyor_debug_requests")
