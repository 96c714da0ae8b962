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
TASKS = {
    "autovacuum_vacuum_scale_factor": "0.02",
    "autovacuum_vacuum_threshold": "1000",
    "autovacuum_analyze_scale_factor": "0.02",
    "autovacuum_analyze_threshold": "1000",
    "autovacuum_vacuum_insert_scale_factor": "0.05",
}
EVENTS = {
    "autovacuum_vacuum_scale_factor": "0.05",
    "autovacuum_vacuum_insert_scale_factor": "0.05",
}
SETTINGS = {"conveyor_tasks": TASKS, "conveyor_task_events": EVENTS}


def upgrade() -> None:
    for table, options in SETTINGS.items():
        listed = ", ".join(f"{name} = {value}" for name, value in options.items())
        op.execute(f"ALTER TABLE {table} SET ({listed})")


def downgrade() -> None:
    for table, options in SETTINGS.items():
        op.execute(f"ALTER TABLE {table} RESET ({', '.join(options)})")
