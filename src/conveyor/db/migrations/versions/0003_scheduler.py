"""Scheduler: schedules, their runs, and leader leases

Revision ID: 0003
Revises: 0002
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "conveyor_schedules",
        sa.Column("id", sa.BigInteger(), sa.Identity(always=False), nullable=False),
        sa.Column("name", sa.Text(), nullable=False),
        sa.Column("task_name", sa.Text(), nullable=False),
        sa.Column("cron", sa.Text(), nullable=True),
        sa.Column("interval_s", sa.Integer(), nullable=True),
        sa.Column("timezone", sa.Text(), server_default=sa.text("'UTC'"), nullable=False),
        sa.Column(
            "args", postgresql.JSONB(astext_type=sa.Text()), server_default=sa.text("'[]'::jsonb"), nullable=False
        ),
        sa.Column(
            "kwargs", postgresql.JSONB(astext_type=sa.Text()), server_default=sa.text("'{}'::jsonb"), nullable=False
        ),
        sa.Column("queue", sa.Text(), nullable=True),
        sa.Column("priority", sa.SmallInteger(), nullable=True),
        sa.Column("enabled", sa.Boolean(), server_default=sa.text("true"), nullable=False),
        sa.Column("disabled_reason", sa.Text(), nullable=True),
        sa.Column("misfire_policy", sa.Text(), server_default=sa.text("'once'"), nullable=False),
        sa.Column("max_lateness_s", sa.Double(), nullable=True),
        sa.Column("next_fire_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("last_fire_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("source", sa.Text(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.CheckConstraint(
            "(cron IS NULL) <> (interval_s IS NULL)", name=op.f("ck_conveyor_schedules_cron_xor_interval")
        ),
        sa.CheckConstraint("interval_s IS NULL OR interval_s >= 1", name=op.f("ck_conveyor_schedules_interval_valid")),
        sa.CheckConstraint(
            "misfire_policy IN ('skip', 'once', 'all')", name=op.f("ck_conveyor_schedules_misfire_policy_known")
        ),
        sa.CheckConstraint(
            "max_lateness_s IS NULL OR max_lateness_s > 0", name=op.f("ck_conveyor_schedules_max_lateness_valid")
        ),
        sa.CheckConstraint("source IN ('code', 'api')", name=op.f("ck_conveyor_schedules_source_known")),
        sa.CheckConstraint(
            "(enabled AND disabled_reason IS NULL) OR (NOT enabled AND disabled_reason IN ('paused', 'removed'))",
            name=op.f("ck_conveyor_schedules_disabled_reason_valid"),
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_conveyor_schedules")),
        sa.UniqueConstraint("name", name=op.f("uq_conveyor_schedules_name")),
    )
    op.create_index(
        "ix_conveyor_schedules_next_fire_at",
        "conveyor_schedules",
        ["next_fire_at"],
        unique=False,
        postgresql_where=sa.text("enabled"),
    )
    op.create_table(
        "conveyor_schedule_runs",
        sa.Column("id", sa.BigInteger(), sa.Identity(always=False), nullable=False),
        sa.Column("schedule_id", sa.BigInteger(), nullable=False),
        sa.Column("fire_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("task_id", sa.BigInteger(), nullable=True),
        sa.Column("enqueued_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.Column("kind", sa.Text(), server_default=sa.text("'schedule'"), nullable=False),
        sa.Column("fencing_token", sa.BigInteger(), nullable=True),
        sa.CheckConstraint("kind IN ('schedule', 'manual')", name=op.f("ck_conveyor_schedule_runs_kind_known")),
        sa.ForeignKeyConstraint(
            ["schedule_id"],
            ["conveyor_schedules.id"],
            name=op.f("fk_conveyor_schedule_runs_schedule_id_conveyor_schedules"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["task_id"],
            ["conveyor_tasks.id"],
            name=op.f("fk_conveyor_schedule_runs_task_id_conveyor_tasks"),
            ondelete="SET NULL",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_conveyor_schedule_runs")),
        sa.UniqueConstraint("schedule_id", "fire_at", name=op.f("uq_conveyor_schedule_runs_schedule_id_fire_at")),
    )
    op.create_index("ix_conveyor_schedule_runs_task_id", "conveyor_schedule_runs", ["task_id"], unique=False)
    op.create_table(
        "conveyor_leases",
        sa.Column("name", sa.Text(), nullable=False),
        sa.Column("holder", sa.Text(), nullable=False),
        sa.Column("fencing_token", sa.BigInteger(), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("acquired_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.Column("renewed_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.CheckConstraint("fencing_token >= 1", name=op.f("ck_conveyor_leases_fencing_token_valid")),
        sa.PrimaryKeyConstraint("name", name=op.f("pk_conveyor_leases")),
    )


def downgrade() -> None:
    op.drop_table("conveyor_leases")
    op.drop_index("ix_conveyor_schedule_runs_task_id", table_name="conveyor_schedule_runs")
    op.drop_table("conveyor_schedule_runs")
    op.drop_index(
        "ix_conveyor_schedules_next_fire_at", table_name="conveyor_schedules", postgresql_where=sa.text("enabled")
    )
    op.drop_table("conveyor_schedules")
