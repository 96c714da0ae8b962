"""Queue limits: the rate limit's token bucket, kept on the queue's row

Revision ID: 0007
Revises: 0006
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Both NULL until a rate-limited claim first fills the bucket; a plain ADD COLUMN of nullable
    # columns without a default rewrites nothing, so this is instant on a busy table.
    op.add_column("conveyor_queues", sa.Column("rate_tokens", sa.Double(), nullable=True))
    op.add_column("conveyor_queues", sa.Column("rate_tokens_at", sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    op.drop_column("conveyor_queues", "rate_tokens_at")
    op.drop_column("conveyor_queues", "rate_tokens")
