"""Conveyor: a distributed task queue for Python on PostgreSQL."""

from conveyor.app import App, load_app
from conveyor.core.context import TaskContext, current_task
from conveyor.core.retry import RetryPolicy
from conveyor.core.states import TaskState
from conveyor.errors import (
    ConveyorError,
    IdempotencyConflict,
    InvalidTransition,
    NonRetryable,
    PayloadError,
    ResultTimeout,
    Retry,
    TaskCancelled,
    TaskFailed,
    TaskNotFound,
    UnknownTask,
)
from conveyor.handles import Signature, Task, TaskHandle
from conveyor.workflows import (
    InvalidWorkflow,
    WorkflowCancelled,
    WorkflowFailed,
    WorkflowHandle,
    WorkflowState,
    chain,
    chord,
    group,
)

__all__ = [
    "App",
    "ConveyorError",
    "IdempotencyConflict",
    "InvalidTransition",
    "InvalidWorkflow",
    "NonRetryable",
    "PayloadError",
    "ResultTimeout",
    "Retry",
    "RetryPolicy",
    "Signature",
    "Task",
    "TaskCancelled",
    "TaskContext",
    "TaskFailed",
    "TaskHandle",
    "TaskNotFound",
    "TaskState",
    "UnknownTask",
    "WorkflowCancelled",
    "WorkflowFailed",
    "WorkflowHandle",
    "WorkflowState",
    "chain",
    "chord",
    "current_task",
    "group",
    "load_app",
]
