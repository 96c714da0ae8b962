"""Workflows: workflows, their steps and edges, and the trigger that advances them

Revision ID: 0004
Revises: 0003

The trigger's SQL is written out here, not imported: a migration must create the same thing forever,
whatever later code looks like. A later change to the function is a later migration
(``CREATE OR REPLACE FUNCTION``).
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

_HAS_WORKFLOW = "workflow_id IS NOT NULL"

# How a workflow advances, in the transaction that changes one of its steps' state, whatever changed
# it: a worker's FINISH batch, the rescuer's RESCUE, an operator's cancel or retry. There is no
# scheduler process to crash between "the step finished" and "its dependents may run".
#
# Words used below. An outcome *resolves* an edge parent -> child when the child may still run after
# it: the parent succeeded, or it failed under on_failure = 'continue' and the child does not need its
# result. ``deps_pending`` counts a step's unresolved edges; ``steps_remaining`` a workflow's unfinished
# steps. Both are counters so that no completion rescans the workflow (a 1,000-step fan-in costs O(1)
# per step, and O(n) once, to gather the inputs of the step that waits for all of them).
#
# Never RAISE here, and keep constraints this function writes to unbreakable (no CHECK on counters):
# an error would roll back the worker's whole FINISH batch, plain tasks included, again and again.
# No EXCEPTION block either: each would open a subtransaction per step finished.
_FUNCTION = r"""
CREATE FUNCTION conveyor_workflow_step_changed() RETURNS trigger
LANGUAGE plpgsql AS $fn$
DECLARE
    was_done constant boolean := OLD.state IN ('succeeded', 'dead', 'cancelled');
    is_done constant boolean := NEW.state IN ('succeeded', 'dead', 'cancelled');
    wf record;
    own record;
    woken text[];
BEGIN
    -- Lock the workflow row first, always: every advance of one workflow is serialised behind it, so
    -- two parents finishing at once cannot both see "one dependency left" (nor neither of them see 0),
    -- and everything read below stays true until commit. The lock order everywhere is therefore
    -- "the step's own task row (locked by the statement that fired us), then the workflow, then other
    -- steps"; conveyor.db.workflow_store takes its locks in the same order.
    UPDATE conveyor_workflows w
    SET steps_remaining = w.steps_remaining + was_done::int - is_done::int,
        state = CASE WHEN is_done THEN w.state ELSE 'running' END,
        finished_at = CASE WHEN is_done THEN w.finished_at END
    WHERE w.id = NEW.workflow_id
    RETURNING w.id, w.on_failure, w.stop_reason INTO wf;
    IF NOT FOUND THEN
        RETURN NULL;  -- the workflow row is gone: nothing to advance
    END IF;

    IF was_done THEN
        -- The step left a finished state (a retry of it). Edges its old outcome had resolved are
        -- pending again, and a child released by it that has not started waits again: it must get
        -- the new result, not the old one.
        WITH pending_again AS (
            UPDATE conveyor_workflow_steps s SET deps_pending = s.deps_pending + 1
            FROM conveyor_workflow_edges e
            WHERE e.parent_task_id = NEW.id AND s.task_id = e.child_task_id
              AND (OLD.state = 'succeeded' OR (wf.on_failure = 'continue' AND NOT e.needs_result))
            RETURNING s.task_id
        ),
        blocked_again AS (
            UPDATE conveyor_tasks t SET state = 'blocked'
            FROM pending_again p
            WHERE t.id = p.task_id AND t.state IN ('queued', 'scheduled')
            RETURNING t.id, t.attempt
        )
        INSERT INTO conveyor_task_events (task_id, kind, attempt, detail)
        SELECT id, 'updated', attempt,
               jsonb_build_object('blocked', true, 'reason', format('workflow: dependency %s started again', NEW.id))
        FROM blocked_again;
    END IF;

    IF NOT is_done THEN
        -- The step itself runs again: only once its dependencies allow it, and with inputs rebuilt
        -- from its own arguments (base_args), so results are never prepended twice.
        SELECT s.deps_pending, s.result_mode, s.base_args INTO own
        FROM conveyor_workflow_steps s WHERE s.task_id = NEW.id;
        IF own.deps_pending > 0 THEN
            UPDATE conveyor_tasks SET state = 'blocked' WHERE id = NEW.id AND state IN ('queued', 'scheduled');
            IF FOUND THEN
                INSERT INTO conveyor_task_events (task_id, kind, attempt, detail)
                VALUES (NEW.id, 'updated', NEW.attempt,
                        jsonb_build_object('blocked', true, 'reason', 'workflow: waiting for its dependencies'));
            END IF;
        ELSIF own.result_mode <> 'none' THEN
            UPDATE conveyor_tasks t
            SET args = (
                SELECT CASE own.result_mode
                    WHEN 'single' THEN jsonb_build_array((array_agg(COALESCE(p.result, 'null'::jsonb)
                                                                    ORDER BY e.position))[1])
                    ELSE jsonb_build_array(COALESCE(jsonb_agg(COALESCE(p.result, 'null'::jsonb)
                                                              ORDER BY e.position), '[]'::jsonb))
                END
                FROM conveyor_workflow_edges e JOIN conveyor_tasks p ON p.id = e.parent_task_id
                WHERE e.child_task_id = NEW.id AND e.needs_result
            ) || COALESCE(own.base_args, '[]'::jsonb)
            WHERE t.id = NEW.id;
        END IF;
        RETURN NULL;
    END IF;

    -- From here on the step has just finished (succeeded, dead or cancelled).

    IF NEW.state <> 'succeeded' AND wf.on_failure = 'stop' AND wf.stop_reason IS NULL THEN
        -- Record the first failure that stopped part of the workflow (before the cancellations below
        -- fire this trigger again, so nested runs see it is already recorded). Under `stop` exactly the
        -- dependents of the failed step are cancelled, transitively; branches that do not depend on it
        -- run on, and the workflow ends failed once they are done.
        UPDATE conveyor_workflows SET stop_reason = format('step %s %s', NEW.id, NEW.state) WHERE id = wf.id;
    END IF;

    IF NEW.state = 'succeeded' OR wf.on_failure = 'continue' THEN
        -- Children this outcome lets go of lose one pending dependency; those left with none that are
        -- still blocked are released now, with their inputs prepended, and their queue woken (NOTIFY
        -- is delivered at commit, so no worker looks before the release exists).
        WITH resolved AS (
            UPDATE conveyor_workflow_steps s SET deps_pending = s.deps_pending - 1
            FROM conveyor_workflow_edges e
            WHERE e.parent_task_id = NEW.id AND s.task_id = e.child_task_id
              AND (NEW.state = 'succeeded' OR NOT e.needs_result)
            RETURNING s.task_id, s.deps_pending, s.result_mode, s.base_args
        ),
        released AS (
            UPDATE conveyor_tasks t
            SET state = 'queued', run_at = now(),
                args = CASE r.result_mode
                    WHEN 'none' THEN t.args
                    ELSE (
                        SELECT CASE r.result_mode
                            WHEN 'single' THEN jsonb_build_array((array_agg(COALESCE(p.result, 'null'::jsonb)
                                                                            ORDER BY e.position))[1])
                            ELSE jsonb_build_array(COALESCE(jsonb_agg(COALESCE(p.result, 'null'::jsonb)
                                                                      ORDER BY e.position), '[]'::jsonb))
                        END
                        FROM conveyor_workflow_edges e JOIN conveyor_tasks p ON p.id = e.parent_task_id
                        WHERE e.child_task_id = t.id AND e.needs_result
                    ) || COALESCE(r.base_args, '[]'::jsonb)
                END
            FROM resolved r
            WHERE t.id = r.task_id AND r.deps_pending = 0 AND t.state = 'blocked'
            RETURNING t.id, t.queue, t.attempt
        ),
        noted AS (
            INSERT INTO conveyor_task_events (task_id, kind, attempt, detail)
            SELECT id, 'updated', attempt, jsonb_build_object('released', true, 'after', NEW.id) FROM released
        )
        SELECT array_agg(DISTINCT queue) INTO woken FROM released;
        IF woken IS NOT NULL THEN
            PERFORM pg_notify('conveyor_wakeup', q) FROM unnest(woken) AS q;
        END IF;
    END IF;

    IF NEW.state <> 'succeeded' THEN
        -- Dependents that can no longer run: children that need this result (every child, under
        -- 'stop'), and transitively theirs, as long as they are waiting. One statement for the whole
        -- subgraph: cancelling child by child through nested triggers would recurse once per link of
        -- a long chain and run out of stack. The nested runs this UPDATE fires find their own
        -- dependents already cancelled, so nesting stays two deep. Each event names the dependency
        -- that doomed the step.
        WITH RECURSIVE doomed(id, cause, cause_state) AS (
            SELECT e.child_task_id, NEW.id, NEW.state
            FROM conveyor_workflow_edges e
            JOIN conveyor_tasks t ON t.id = e.child_task_id AND t.state IN ('blocked', 'queued', 'scheduled')
            WHERE e.parent_task_id = NEW.id AND (wf.on_failure = 'stop' OR e.needs_result)
          UNION
            SELECT e.child_task_id, d.id, 'cancelled'::text
            FROM doomed d
            JOIN conveyor_workflow_edges e ON e.parent_task_id = d.id
            JOIN conveyor_tasks t ON t.id = e.child_task_id AND t.state IN ('blocked', 'queued', 'scheduled')
            WHERE wf.on_failure = 'stop' OR e.needs_result
        ),
        first_cause AS (
            SELECT DISTINCT ON (id) id, cause, cause_state FROM doomed ORDER BY id, (cause = NEW.id) DESC, cause
        ),
        cancelled AS (
            UPDATE conveyor_tasks t SET state = 'cancelled', finished_at = now()
            FROM first_cause d
            WHERE t.id = d.id AND t.state IN ('blocked', 'queued', 'scheduled')
            RETURNING t.id, t.attempt, d.cause, d.cause_state
        )
        INSERT INTO conveyor_task_events (task_id, kind, attempt, detail)
        SELECT id, 'cancelled', attempt,
               jsonb_build_object('reason', format('workflow: dependency %s %s', cause, cause_state))
        FROM cancelled;

    END IF;

    -- The last step to finish settles the workflow. Nested runs above may have got there first (the
    -- state guard makes that harmless). The scan for a step that did not succeed runs once per
    -- workflow, on the partial index of workflow steps.
    UPDATE conveyor_workflows w
    SET finished_at = now(),
        state = CASE WHEN w.cancel_requested THEN 'cancelled'
                     WHEN EXISTS (SELECT 1 FROM conveyor_tasks t
                                  WHERE t.workflow_id = w.id AND t.state <> 'succeeded') THEN 'failed'
                     ELSE 'succeeded' END
    WHERE w.id = wf.id AND w.steps_remaining = 0 AND w.state = 'running';
    RETURN NULL;
END
$fn$
"""

# Row-level, with a WHEN clause PostgreSQL evaluates before queueing anything: for a task that is not
# a workflow step (workflow_id IS NULL) the cost is one NULL test per updated row, and the function
# never runs. Only changes into or out of a finished state matter: a failed attempt that will be
# retried goes to scheduled/queued, so dependents are judged after a step's last attempt only.
_TRIGGER = """
CREATE TRIGGER conveyor_workflow_step_changed
AFTER UPDATE OF state ON conveyor_tasks
FOR EACH ROW
WHEN (NEW.workflow_id IS NOT NULL AND NEW.state IS DISTINCT FROM OLD.state
      AND (NEW.state IN ('succeeded', 'dead', 'cancelled') OR OLD.state IN ('succeeded', 'dead', 'cancelled')))
EXECUTE FUNCTION conveyor_workflow_step_changed()
"""


def upgrade() -> None:
    op.create_table(
        "conveyor_workflows",
        sa.Column("id", sa.BigInteger(), sa.Identity(always=False), nullable=False),
        sa.Column("name", sa.Text(), nullable=False),
        sa.Column("kind", sa.Text(), nullable=False),
        sa.Column("state", sa.Text(), server_default=sa.text("'running'"), nullable=False),
        sa.Column("on_failure", sa.Text(), nullable=False),
        sa.Column("steps_total", sa.Integer(), nullable=False),
        sa.Column("steps_remaining", sa.Integer(), nullable=False),
        sa.Column("cancel_requested", sa.Boolean(), server_default=sa.text("false"), nullable=False),
        sa.Column("stop_reason", sa.Text(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column(
            "metadata", postgresql.JSONB(astext_type=sa.Text()), server_default=sa.text("'{}'::jsonb"), nullable=False
        ),
        sa.CheckConstraint(
            "state IN ('running', 'succeeded', 'failed', 'cancelled')", name=op.f("ck_conveyor_workflows_state_known")
        ),
        sa.CheckConstraint("on_failure IN ('stop', 'continue')", name=op.f("ck_conveyor_workflows_on_failure_known")),
        sa.CheckConstraint("kind IN ('chain', 'group', 'chord', 'dag')", name=op.f("ck_conveyor_workflows_kind_known")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_conveyor_workflows")),
    )
    op.create_index("ix_conveyor_workflows_state_id", "conveyor_workflows", ["state", "id"], unique=False)
    op.create_index("ix_conveyor_workflows_name_id", "conveyor_workflows", ["name", "id"], unique=False)
    op.create_table(
        "conveyor_workflow_steps",
        sa.Column("task_id", sa.BigInteger(), nullable=False),
        sa.Column("workflow_id", sa.BigInteger(), nullable=False),
        sa.Column("name", sa.Text(), nullable=False),
        sa.Column("result_mode", sa.Text(), server_default=sa.text("'none'"), nullable=False),
        sa.Column("deps_pending", sa.Integer(), server_default=sa.text("0"), nullable=False),
        sa.Column("base_args", postgresql.JSONB(astext_type=sa.Text()), nullable=True),
        sa.CheckConstraint(
            "result_mode IN ('none', 'single', 'list')", name=op.f("ck_conveyor_workflow_steps_result_mode_known")
        ),
        sa.ForeignKeyConstraint(
            ["task_id"],
            ["conveyor_tasks.id"],
            name=op.f("fk_conveyor_workflow_steps_task_id_conveyor_tasks"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["workflow_id"],
            ["conveyor_workflows.id"],
            name=op.f("fk_conveyor_workflow_steps_workflow_id_conveyor_workflows"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("task_id", name=op.f("pk_conveyor_workflow_steps")),
        sa.UniqueConstraint("workflow_id", "name", name=op.f("uq_conveyor_workflow_steps_workflow_id_name")),
    )
    op.create_table(
        "conveyor_workflow_edges",
        sa.Column("workflow_id", sa.BigInteger(), nullable=False),
        sa.Column("parent_task_id", sa.BigInteger(), nullable=False),
        sa.Column("child_task_id", sa.BigInteger(), nullable=False),
        sa.Column("position", sa.Integer(), nullable=False),
        sa.Column("needs_result", sa.Boolean(), nullable=False),
        sa.CheckConstraint("parent_task_id <> child_task_id", name=op.f("ck_conveyor_workflow_edges_not_self")),
        sa.ForeignKeyConstraint(
            ["child_task_id"],
            ["conveyor_workflow_steps.task_id"],
            name="fk_conveyor_workflow_edges_child",
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["parent_task_id"],
            ["conveyor_workflow_steps.task_id"],
            name="fk_conveyor_workflow_edges_parent",
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["workflow_id"],
            ["conveyor_workflows.id"],
            name="fk_conveyor_workflow_edges_workflow",
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("parent_task_id", "child_task_id", name=op.f("pk_conveyor_workflow_edges")),
    )
    op.create_index(
        "ix_conveyor_workflow_edges_child_task_id", "conveyor_workflow_edges", ["child_task_id"], unique=False
    )
    op.create_index("ix_conveyor_workflow_edges_workflow_id", "conveyor_workflow_edges", ["workflow_id"], unique=False)
    # Nullable with no default: adding it rewrites nothing, however many tasks exist.
    op.add_column("conveyor_tasks", sa.Column("workflow_id", sa.BigInteger(), nullable=True))
    op.create_index(
        "ix_conveyor_tasks_workflow_id",
        "conveyor_tasks",
        ["workflow_id"],
        unique=False,
        postgresql_where=sa.text(_HAS_WORKFLOW),
    )
    op.execute(_FUNCTION)
    op.execute(_TRIGGER)


def downgrade() -> None:
    op.execute("DROP TRIGGER IF EXISTS conveyor_workflow_step_changed ON conveyor_tasks")
    op.execute("DROP FUNCTION IF EXISTS conveyor_workflow_step_changed()")
    op.drop_index("ix_conveyor_tasks_workflow_id", table_name="conveyor_tasks", postgresql_where=sa.text(_HAS_WORKFLOW))
    op.drop_column("conveyor_tasks", "workflow_id")
    op.drop_index("ix_conveyor_workflow_edges_workflow_id", table_name="conveyor_workflow_edges")
    op.drop_index("ix_conveyor_workflow_edges_child_task_id", table_name="conveyor_workflow_edges")
    op.drop_table("conveyor_workflow_edges")
    op.drop_table("conveyor_workflow_steps")
    op.drop_index("ix_conveyor_workflows_name_id", table_name="conveyor_workflows")
    op.drop_index("ix_conveyor_workflows_state_id", table_name="conveyor_workflows")
    op.drop_table("conveyor_workflows")
