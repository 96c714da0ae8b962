"""Plain values about stored workflows, as the store returns them, and the errors about workflows."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from typing import Any

from conveyor.core.states import TaskState
from conveyor.errors import TaskError


class WorkflowState(StrEnum):
    RUNNING = "running"  # some step is not finished yet
    SUCCEEDED = "succeeded"  # every step succeeded
    FAILED = "failed"  # every step finished, and some did not succeed
    CANCELLED = "cancelled"  # cancelled by request (every step finished or was cancelled)


WORKFLOW_FINISHED: frozenset[WorkflowState] = frozenset(
    {WorkflowState.SUCCEEDED, WorkflowState.FAILED, WorkflowState.CANCELLED}
)


@dataclass(frozen=True)
class WorkflowRecord:
    id: int
    name: str
    kind: str
    state: WorkflowState
    on_failure: str
    steps_total: int
    steps_remaining: int  # steps not yet succeeded, dead or cancelled
    cancel_requested: bool
    stop_reason: str | None  # why it stopped scheduling steps: a failure under "stop", or a cancel
    created_at: datetime
    finished_at: datetime | None
    output: tuple[str, ...]
    output_mode: str


@dataclass(frozen=True)
class WorkflowStep:
    task_id: int
    name: str
    task: str
    queue: str
    state: TaskState
    result_mode: str
    deps_pending: int  # dependencies not yet resolved (see conveyor.db.workflow_store)
    attempt: int
    max_attempts: int
    cancel_requested: bool
    result: Any
    last_error: dict[str, Any] | None
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None


@dataclass(frozen=True)
class WorkflowEdge:
    parent: str
    child: str
    parent_task_id: int
    child_task_id: int
    position: int
    needs_result: bool


@dataclass(frozen=True)
class WorkflowGraph:
    workflow: WorkflowRecord
    steps: list[WorkflowStep]  # in submission order (parents before children)
    edges: list[WorkflowEdge]


@dataclass(frozen=True)
class WorkflowSubmitted:
    id: int
    step_ids: dict[str, int]  # step name -> task id


@dataclass(frozen=True)
class WorkflowPage:
    items: list[WorkflowRecord]
    next_before: int | None  # the id to continue below; None: this was the last page


# -- errors -------------------------------------------------------------------------------------------


class WorkflowError(TaskError):
    """A request about a workflow that cannot be carried out."""


class InvalidWorkflow(WorkflowError, ValueError):
    """The graph is not valid. ``step`` names the offending step and ``field`` its attribute
    (``"name"``, ``"depends_on"``, ``"options"``, ...), when there is one."""

    def __init__(self, message: str, *, step: str | None = None, field: str | None = None) -> None:
        super().__init__(message)
        self.step = step
        self.field = field


class WorkflowNotFound(WorkflowError):
    def __init__(self, workflow_id: int) -> None:
        super().__init__(f"workflow {workflow_id} does not exist")
        self.workflow_id = workflow_id


class WorkflowStateError(WorkflowError):
    """The workflow's state does not allow what was asked (cancel a finished one, retry a running one)."""

    def __init__(self, workflow_id: int, state: str, action: str) -> None:
        super().__init__(f"cannot {action} workflow {workflow_id}: it is {state}")
        self.workflow_id = workflow_id
        self.state = state
        self.action = action


class WorkflowFailed(WorkflowError):
    """The workflow ended failed; ``errors`` maps each step that did not succeed to its last error
    (``None`` for a step cancelled before it ran)."""

    def __init__(self, workflow_id: int, errors: Mapping[str, Mapping[str, Any] | None]) -> None:
        dead = [(name, error) for name, error in errors.items() if error is not None]
        first = f": step {dead[0][0]!r} {dead[0][1].get('type')}: {dead[0][1].get('message')}" if dead else ""
        super().__init__(f"workflow {workflow_id} failed{first}")
        self.workflow_id = workflow_id
        self.errors = dict(errors)


class WorkflowCancelled(WorkflowError):
    def __init__(self, workflow_id: int) -> None:
        super().__init__(f"workflow {workflow_id} was cancelled")
        self.workflow_id = workflow_id
