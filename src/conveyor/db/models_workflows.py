"""Tables of workflows (chains, groups, chords, DAGs). Schema changes go with migration 0004.

A step is an ordinary task (``conveyor_tasks.workflow_id`` points back here) plus a row in
``conveyor_workflow_steps``; ``conveyor_workflow_edges`` holds the dependencies. The graph advances in the
database, in the transaction that finishes a step, by the trigger ``conveyor_workflow_step_changed``
(created in migration 0004, explained in ``conveyor.db.workflow_store``). Its counters are why no
completion ever rescans a workflow: ``steps_remaining`` here and ``deps_pending`` per step.

There is deliberately no foreign key from ``conveyor_tasks.workflow_id``: its check would be queued for
every task inserted, workflow or not, and the steps table already ties each step to its task.
"""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Boolean,
    CheckConstraint,
    Column,
    DateTime,
    ForeignKey,
    ForeignKeyConstraint,
    Identity,
    Index,
    Integer,
    PrimaryKeyConstraint,
    Table,
    Text,
    UniqueConstraint,
    func,
    text,
)
from sqlalchemy.dialects.postgresql import JSONB

from conveyor.db.models import metadata

workflows = Table(
    "conveyor_workflows",
    metadata,
    Column("id", BigInteger, Identity(always=False), primary_key=True),
    Column("name", Text, nullable=False),
    Column("kind", Text, nullable=False),
    Column("state", Text, nullable=False, server_default=text("'running'")),
    Column("on_failure", Text, nullable=False),
    Column("steps_total", Integer, nullable=False),
    # Decremented as each step reaches succeeded/dead/cancelled (incremented if one starts again):
    # the step that brings it to 0 sets the final state.
    Column("steps_remaining", Integer, nullable=False),
    Column("cancel_requested", Boolean, nullable=False, server_default=text("false")),
    # Set once, by the first failure under on_failure='stop' or by a cancel: later failures see it and
    # do not cancel the rest of the workflow again.
    Column("stop_reason", Text, nullable=True),
    Column("created_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    Column("finished_at", DateTime(timezone=True), nullable=True),
    # {"output": [step names], "output_mode": "single" | "list" | "dict"}: what the workflow returns.
    Column("metadata", JSONB, nullable=False, server_default=text("'{}'::jsonb")),
    CheckConstraint("state IN ('running', 'succeeded', 'failed', 'cancelled')", name="state_known"),
    CheckConstraint("on_failure IN ('stop', 'continue')", name="on_failure_known"),
    CheckConstraint("kind IN ('chain', 'group', 'chord', 'dag')", name="kind_known"),
    # The list endpoint: newest first, optionally by state or name.
    Index("ix_conveyor_workflows_state_id", "state", "id"),
    Index("ix_conveyor_workflows_name_id", "name", "id"),
)

workflow_steps = Table(
    "conveyor_workflow_steps",
    metadata,
    Column("task_id", BigInteger, ForeignKey("conveyor_tasks.id", ondelete="CASCADE"), primary_key=True),
    Column("workflow_id", BigInteger, ForeignKey("conveyor_workflows.id", ondelete="CASCADE"), nullable=False),
    Column("name", Text, nullable=False),
    # How the results of the dependencies that pass them are prepended to the step's arguments when it
    # is released: not at all, as one value, or as one list (in edge position order).
    Column("result_mode", Text, nullable=False, server_default=text("'none'")),
    # Dependencies whose outcome has not yet let this step go. No CHECK (>= 0) on purpose: a constraint
    # violation inside the trigger would make a worker's whole FINISH batch fail, again and again.
    Column("deps_pending", Integer, nullable=False, server_default=text("0")),
    # The step's own arguments, kept so that a release after a retry builds its inputs afresh instead
    # of prepending the results a second time (NULL when result_mode is 'none').
    Column("base_args", JSONB, nullable=True),
    # Also the index of "the steps of a workflow" (its leading column).
    UniqueConstraint("workflow_id", "name"),
    CheckConstraint("result_mode IN ('none', 'single', 'list')", name="result_mode_known"),
)

workflow_edges = Table(
    "conveyor_workflow_edges",
    metadata,
    Column("workflow_id", BigInteger, nullable=False),
    Column("parent_task_id", BigInteger, nullable=False),
    Column("child_task_id", BigInteger, nullable=False),
    # Order of this parent's result among the child's inputs.
    Column("position", Integer, nullable=False),
    # The child receives this result. Under on_failure='continue' a child that does not need a failed
    # parent's result still runs; one that needs it is cancelled.
    Column("needs_result", Boolean, nullable=False),
    # The trigger walks a finished step's children by the leading column.
    PrimaryKeyConstraint("parent_task_id", "child_task_id"),
    # Explicit names: the naming convention's would pass PostgreSQL's 63-character limit.
    ForeignKeyConstraint(
        ["parent_task_id"],
        ["conveyor_workflow_steps.task_id"],
        name="fk_conveyor_workflow_edges_parent",
        ondelete="CASCADE",
    ),
    ForeignKeyConstraint(
        ["child_task_id"],
        ["conveyor_workflow_steps.task_id"],
        name="fk_conveyor_workflow_edges_child",
        ondelete="CASCADE",
    ),
    ForeignKeyConstraint(
        ["workflow_id"],
        ["conveyor_workflows.id"],
        name="fk_conveyor_workflow_edges_workflow",
        ondelete="CASCADE",
    ),
    # A release gathers a child's parents (and their results) by this.
    Index("ix_conveyor_workflow_edges_child_task_id", "child_task_id"),
    # The graph of one workflow (and the cascade if a workflow row is ever deleted).
    Index("ix_conveyor_workflow_edges_workflow_id", "workflow_id"),
    CheckConstraint("parent_task_id <> child_task_id", name="not_self"),
)
