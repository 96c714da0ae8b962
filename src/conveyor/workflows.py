"""Workflows: tasks that wait for each other, stored in the database so they survive any restart.

    from conveyor import chain, group, chord

    handle = chain(fetch.s(url), parse.s(), store.s()).enqueue(app)   # each gets the previous result
    handle = group(resize.s(p) for p in paths).enqueue(app)           # result: the list, in order
    handle = chord(group(count.s(f) for f in files), total.s()).enqueue(app)

    wf = app.workflow("etl", on_failure="continue")                    # any DAG
    wf.add(extract.s(), name="extract")
    wf.add(clean.s(), name="clean", depends_on=["extract"])
    wf.add(audit.s(), name="audit", depends_on=["extract"], pass_results=False)
    handle = wf.enqueue()
    handle.result(timeout=60)                                          # {"extract": ..., "clean": ...}

A signature does not know its app, so a canvas is given one: ``.enqueue(app)``, ``chain(..., app=app)``
or ``app.submit_workflow(canvas)``. Results are prepended to a step's own arguments (see
:mod:`conveyor.core.workflow`). ``on_failure="stop"`` (the default): a failed step cancels its
dependents and stops the rest of the workflow (waiting steps are cancelled, running ones asked to stop);
``"continue"``: only the dependents that need the failed step's result are cancelled, everything else
runs. Retries of a step happen before its dependents are judged.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from conveyor.core import workflow as graph
from conveyor.core.states import TaskState
from conveyor.core.workflow import FailurePolicy, WorkflowSpec
from conveyor.core.workflow_records import (
    WORKFLOW_FINISHED,
    InvalidWorkflow,
    WorkflowCancelled,
    WorkflowError,
    WorkflowFailed,
    WorkflowGraph,
    WorkflowNotFound,
    WorkflowRecord,
    WorkflowState,
    WorkflowStateError,
    WorkflowStep,
)
from conveyor.errors import ResultTimeout
from conveyor.handles import Signature, TaskHandle

if TYPE_CHECKING:
    from conveyor.app import App

__all__ = [
    "Chain",
    "Chord",
    "Group",
    "InvalidWorkflow",
    "Workflow",
    "WorkflowCancelled",
    "WorkflowError",
    "WorkflowFailed",
    "WorkflowHandle",
    "WorkflowNotFound",
    "WorkflowState",
    "WorkflowStateError",
    "chain",
    "chord",
    "group",
]


class _Submit:
    """``enqueue``/``enqueue_async`` for canvases."""

    app: App | None

    def spec(self, *, name: str | None = None, on_failure: FailurePolicy = "stop") -> WorkflowSpec:
        """The validated graph this canvas runs as (what is stored)."""
        assert isinstance(self, graph.Chain | graph.Group | graph.Chord)
        return graph.compile_canvas(self, name=name, on_failure=on_failure)

    def enqueue(
        self, app: App | None = None, *, name: str | None = None, on_failure: FailurePolicy = "stop"
    ) -> WorkflowHandle:
        """Store the workflow and start it; all of it is stored, or nothing."""
        target = self._app(app)
        return target.run_sync(target.submit_workflow_async(self.spec(name=name, on_failure=on_failure)))

    async def enqueue_async(
        self, app: App | None = None, *, name: str | None = None, on_failure: FailurePolicy = "stop"
    ) -> WorkflowHandle:
        return await self._app(app).submit_workflow_async(self.spec(name=name, on_failure=on_failure))

    def _app(self, app: App | None) -> App:
        chosen = app or self.app
        if chosen is not None:
            return chosen
        assert isinstance(self, graph.Chain | graph.Group | graph.Chord)
        # Signatures made by task.s() know their app; ones built by name do not.
        apps = {id(a): a for a in _signature_apps(self)}
        if len(apps) == 1:
            return next(iter(apps.values()))
        if not apps:
            raise WorkflowError(
                "this workflow has no app: its signatures were built by name, so pass it "
                "(.enqueue(app), chain(..., app=app) or app.submit_workflow(...))"
            )
        raise WorkflowError(
            f"this workflow's signatures come from {len(apps)} different apps: pass the one to store it in "
            "(.enqueue(app) or chain(..., app=app))"
        )


def _signature_apps(canvas: graph.Canvas) -> Iterable[App]:
    """The apps of the signatures in ``canvas``, nested canvases included, where they know theirs."""
    if isinstance(canvas, graph.Chain):
        parts: Iterable[object] = canvas.links
    elif isinstance(canvas, graph.Group):
        parts = canvas.members
    else:
        parts = (canvas.header, canvas.callback)
    for part in parts:
        if isinstance(part, graph.Chain | graph.Group | graph.Chord):
            yield from _signature_apps(part)
        elif isinstance(part, Signature) and part.app is not None:
            yield part.app


@dataclass(frozen=True)
class Chain(graph.Chain, _Submit):
    app: App | None = field(default=None, compare=False, repr=False)


@dataclass(frozen=True)
class Group(graph.Group, _Submit):
    app: App | None = field(default=None, compare=False, repr=False)


@dataclass(frozen=True)
class Chord(graph.Chord, _Submit):
    app: App | None = field(default=None, compare=False, repr=False)


def chain(*links: Signature | graph.Group | graph.Chord | graph.Chain, app: App | None = None) -> Chain:
    """Run ``links`` one after another; each receives the previous one's result as its first argument
    (the list of results after a group). Nested chains are flattened. The result: the last link's."""
    return Chain(graph.make_chain(links).links, app=app)


def group(*members: Signature | graph.Group | Iterable[Signature], app: App | None = None) -> Group:
    """Run signatures in parallel (``group(a, b)`` or ``group(generator)``); the result is the list of
    their results, in the order given."""
    items: list[Any] = []
    for member in members:
        if isinstance(member, Signature | graph.Group):
            items.append(member)
        elif isinstance(member, Iterable) and not isinstance(member, str | bytes | Mapping):
            items.extend(member)
        else:
            items.append(member)  # refused by Group with a message naming it
    return Group(graph.make_group(items).members, app=app)


def chord(header: graph.Group | Iterable[Signature], callback: Signature, *, app: App | None = None) -> Chord:
    """Run ``header`` (a group) in parallel, then ``callback`` with the list of its results."""
    members = header if isinstance(header, graph.Group) else graph.make_group(header)
    return Chord(graph.Group(members.members), callback, app=app)


class Workflow(graph.Dag):
    """A DAG bound to an app (made by :meth:`conveyor.App.workflow`); see :class:`conveyor.core.workflow.Dag`."""

    def __init__(self, app: App, name: str = "workflow", on_failure: FailurePolicy = "stop") -> None:
        super().__init__(name=name, on_failure=on_failure)
        self.app = app

    def enqueue(self) -> WorkflowHandle:
        return self.app.run_sync(self.app.submit_workflow_async(self.build()))

    async def enqueue_async(self) -> WorkflowHandle:
        return await self.app.submit_workflow_async(self.build())


class WorkflowHandle:
    """A submitted workflow: its state, steps, result; cancel and retry. Every method has an ``_async``
    twin for use on an event loop."""

    def __init__(self, app: App, workflow_id: int, step_ids: Mapping[str, int] | None = None) -> None:
        self.app = app
        self.id = workflow_id
        self._step_ids = dict(step_ids) if step_ids is not None else None

    def __repr__(self) -> str:
        return f"<WorkflowHandle {self.id}>"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, WorkflowHandle) and other.id == self.id

    def __hash__(self) -> int:
        return hash(("workflow", self.id))

    # -- async -----------------------------------------------------------------------------------

    async def get_async(self) -> WorkflowRecord:
        return await self.app.workflow_store().get(self.id)

    async def graph_async(self) -> WorkflowGraph:
        """The workflow with every step and edge."""
        return await self.app.workflow_store().graph(self.id)

    async def status_async(self) -> WorkflowState:
        return (await self.get_async()).state

    async def steps_async(self) -> list[WorkflowStep]:
        return (await self.graph_async()).steps

    async def step_async(self, name: str) -> TaskHandle:
        """The task of step ``name``."""
        if self._step_ids is None:
            self._step_ids = {s.name: s.task_id for s in await self.steps_async()}
        try:
            return TaskHandle(self.app, self._step_ids[name])
        except KeyError:
            raise WorkflowError(f"workflow {self.id} has no step named {name!r}") from None

    async def cancel_async(self) -> WorkflowRecord:
        """Cancel the waiting steps and ask the running ones to stop. A finished workflow raises
        :class:`WorkflowStateError` and is left as it was."""
        return await self.app.workflow_store().cancel(self.id)

    async def retry_async(self) -> WorkflowRecord:
        """Run the steps that did not succeed again (the failed ones and those they stopped), each with
        at least one more attempt. Only a failed or cancelled workflow can be retried."""
        return await self.app.workflow_store().retry(self.id)

    async def result_async(self, timeout: float | None = None) -> Any:
        """Wait for the workflow to finish and return its result: a chain's last step's (a list if the
        chain ends with a group), a group's list, a chord's callback's, a DAG's dict of step name to
        result. Raises :class:`WorkflowFailed`, :class:`WorkflowCancelled`, or :class:`ResultTimeout`
        after ``timeout`` seconds."""
        deadline = None if timeout is None else time.monotonic() + timeout
        pause = 0.005
        store = self.app.workflow_store()
        while True:
            record = await store.get(self.id)
            if record.state in WORKFLOW_FINISHED:
                return await self._outcome(record)
            if deadline is not None and time.monotonic() >= deadline:
                raise ResultTimeout(
                    f"workflow {self.id} is still running after {timeout} s "
                    f"({record.steps_remaining} of {record.steps_total} steps unfinished)"
                )
            wait = pause if deadline is None else min(pause, max(0.0, deadline - time.monotonic()))
            await asyncio.sleep(wait)
            pause = min(pause * 2, 0.2)

    async def _outcome(self, record: WorkflowRecord) -> Any:
        if record.state == WorkflowState.CANCELLED:
            raise WorkflowCancelled(self.id)
        names = None if record.output_mode == "dict" else list(record.output)
        rows = await self.app.workflow_store().outcomes(self.id, names)
        if record.state == WorkflowState.FAILED:
            raise WorkflowFailed(
                self.id,
                {
                    r["name"]: r["last_error"] if r["state"] == TaskState.DEAD else None
                    for r in rows
                    if r["state"] != TaskState.SUCCEEDED
                },
            )
        results = {r["name"]: r["result"] for r in rows}
        if record.output_mode == "dict":
            return results
        if record.output_mode == "list":
            return [results[name] for name in record.output]
        return results[record.output[0]]

    # -- sync ------------------------------------------------------------------------------------

    def get(self) -> WorkflowRecord:
        return self.app.run_sync(self.get_async())

    def graph(self) -> WorkflowGraph:
        return self.app.run_sync(self.graph_async())

    def status(self) -> WorkflowState:
        return self.app.run_sync(self.status_async())

    def steps(self) -> list[WorkflowStep]:
        return self.app.run_sync(self.steps_async())

    def step(self, name: str) -> TaskHandle:
        return self.app.run_sync(self.step_async(name))

    def cancel(self) -> WorkflowRecord:
        return self.app.run_sync(self.cancel_async())

    def retry(self) -> WorkflowRecord:
        return self.app.run_sync(self.retry_async())

    def result(self, timeout: float | None = None) -> Any:
        return self.app.run_sync(self.result_async(timeout))
