"""API: keys and the indexes list and search endpoints need

Revision ID: 0002
Revises: 0001
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

_FINISHED = "finished_at IS NOT NULL"
_WAITING = "state IN ('scheduled', 'queued')"


def upgrade() -> None:
    op.create_table(
        "conveyor_api_keys",
        sa.Column("id", sa.BigInteger(), sa.Identity(always=False), nullable=False),
        sa.Column("name", sa.Text(), nullable=False),
        sa.Column("prefix", sa.Text(), nullable=False),
        sa.Column("key_hash", sa.Text(), nullable=False),
        sa.Column("scopes", postgresql.ARRAY(sa.Text()), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.Column("last_used_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("revoked_at", sa.DateTime(timezone=True), nullable=True),
        sa.CheckConstraint(
            "cardinality(scopes) > 0 AND scopes <@ ARRAY['tasks:read', 'tasks:write', 'admin']::text[]",
            name=op.f("ck_conveyor_api_keys_scopes_known"),
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_conveyor_api_keys")),
    )
    op.create_index("ix_conveyor_api_keys_key_hash", "conveyor_api_keys", ["key_hash"], unique=True)
    op.create_index("ix_conveyor_tasks_state_id", "conveyor_tasks", ["state", "id"], unique=False)
    op.create_index("ix_conveyor_tasks_queue_id", "conveyor_tasks", ["queue", "id"], unique=False)
    op.create_index("ix_conveyor_tasks_name_id", "conveyor_tasks", ["name", "id"], unique=False)
    op.create_index(
        "ix_conveyor_tasks_finished_at",
        "conveyor_tasks",
        ["finished_at", "id"],
        unique=False,
        postgresql_where=sa.text(_FINISHED),
    )
    op.create_index(
        "ix_conveyor_tasks_waiting_run_at",
        "conveyor_tasks",
        ["run_at", "id"],
        unique=False,
        postgresql_where=sa.text(_WAITING),
    )


def downgrade() -> None:
    op.drop_index("ix_conveyor_tasks_waiting_run_at", table_name="conveyor_tasks", postgresql_where=sa.text(_WAITING))
    op.drop_index("ix_conveyor_tasks_finished_at", table_name="conveyor_tasks", postgresql_where=sa.text(_FINISHED))
    op.drop_index("ix_conveyor_tasks_name_id", table_name="conveyor_tasks")
    op.drop_index("ix_conveyor_tasks_queue_id", table_name="conveyor_tasks")
    op.drop_index("ix_conveyor_tasks_state_id", table_name="conveyor_tasks")
    op.drop_index("ix_conveyor_api_keys_key_hash", table_name="conveyor_api_keys")
    op.drop_table("conveyor_api_keys")
