"""Autovacuum tuned for the task tables' churn

Revision ID: 0008
Revises: 0007
"""

from __future__ import annotations

from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None

# Every task leaves dead row versions behind as it moves (claimed, finished; retried, rescued), and the
# claim walks a partial index whose dead entries it must step over until a vacuum removes them: claim
# times grow with the dead tuples between vacuums (LESSONS 29). PostgreSQL's defaults wait for 20 % of
# a table to be dead, 200,000 row versions at 1,000,000 tasks and ten times that at ten million, so the
# task table is vacuumed after 2 % (plus 1,000) instead, and analysed as often, since the planner's
# picture of which states are rare is what keeps it on the partial indexes. The history table is
# insert-mostly: vacuuming it after 5 % new rows keeps its visibility map current for index-only reads.
# SET (...) takes a SHARE UPDATE EXCLUSIVE lock: reads and writes go on while it runs.


def upgrade() -> None:
    op.execute(
        "ALTER TABLE conveyor_tasks SET (autovacuum_vacuum_scale_factor = 0.02, autovacuum_vacuum_threshold = 1000, "
        "autovacuum_analyze_scale_factor = 0.02, autovacuum_analyze_threshold = 1000, "
        "autovacuum_vacuum_insert_scale_factor = 0.05)"
    )
    op.execute(
        "ALTER TABLE conveyor_task_events "
        "SET (autovacuum_vacuum_scale_factor = 0.05, autovacuum_vacuum_insert_scale_factor = 0.05)"
    )


def downgrade() -> None:
    op.execute(
        "ALTER TABLE conveyor_tasks RESET (autovacuum_vacuum_scale_factor, autovacuum_vacuum_threshold, "
        "autovacuum_analyze_scale_factor, autovacuum_analyze_threshold, autovacuum_vacuum_insert_scale_factor)"
    )
    op.execute(
        "ALTER TABLE conveyor_task_events RESET (autovacuum_vacuum_scale_factor, autovacuum_vacuum_insert_scale_factor)"
    )
