"""Scheduler health: one row per running scheduler process (leadership, clock skew, last seen)

Revision ID: 0006
Revises: 0005
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "conveyor_scheduler_processes",
        sa.Column("id", sa.Text(), nullable=False),
        sa.Column("host", sa.Text(), nullable=False),
        sa.Column("pid", sa.Integer(), nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.Column("last_seen_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.Column("stale_after_s", sa.Double(), nullable=False),
        sa.Column("is_leader", sa.Boolean(), server_default=sa.text("false"), nullable=False),
        sa.Column("fencing_token", sa.BigInteger(), nullable=True),
        sa.Column("clock_skew_s", sa.Double(), nullable=True),
        sa.Column("warning", sa.Text(), nullable=True),
        sa.CheckConstraint(
            "NOT is_leader OR fencing_token IS NOT NULL",
            name=op.f("ck_conveyor_scheduler_processes_leader_has_token"),
        ),
        sa.CheckConstraint("stale_after_s > 0", name=op.f("ck_conveyor_scheduler_processes_stale_after_valid")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_conveyor_scheduler_processes")),
    )


def downgrade() -> None:
    op.drop_table("conveyor_scheduler_processes")
