"""Workflow graphs, pure: ``chain``, ``group``, ``chord`` and general DAGs, compiled into one validated
:class:`WorkflowSpec` (steps, edges, how each step receives its inputs, what the workflow returns).

No I/O here: the store writes a spec as rows and the database trigger runs it (see
``conveyor.db.workflow_store``). Everything that can be wrong with a graph is caught here, before
anything is written: empty groups, unknown or duplicate step names, cycles, steps whose enqueue could
return an existing task (idempotency and unique keys), delays on steps that wait for others.

Inputs. A step that receives the results of the steps it depends on gets them *prepended* to its own
positional arguments when it is released: ``single`` prepends one value, ``list`` one list of values in
the order of its dependencies. In a chain each link receives the previous one (a group's list when the
previous link is a group); in a DAG a step with ``pass_results=True`` receives its one dependency's
result, or the list of its dependencies' results in ``depends_on`` order when it has several.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, get_args

from conveyor.core.task import EnqueueOptions
from conveyor.core.workflow_records import InvalidWorkflow

ResultMode = Literal["none", "single", "list"]
FailurePolicy = Literal["stop", "continue"]
WorkflowKind = Literal["chain", "group", "chord", "dag"]
OutputMode = Literal["single", "list", "dict"]

FAILURE_POLICIES: tuple[str, ...] = get_args(FailurePolicy)

#: More steps than this in one workflow is almost certainly a mistake (and one transaction to submit).
MAX_STEPS = 100_000


# -- the compiled form ------------------------------------------------------------------------------


class SignatureLike(Protocol):
    """What a step is made from (``conveyor.Signature`` is one): a task name, arguments, options."""

    @property
    def name(self) -> str: ...
    @property
    def args(self) -> Sequence[Any]: ...
    @property
    def kwargs(self) -> Mapping[str, Any]: ...
    @property
    def options(self) -> EnqueueOptions: ...


@dataclass(frozen=True)
class StepSpec:
    name: str  # unique in its workflow
    task: str
    args: tuple[Any, ...]
    kwargs: Mapping[str, Any]
    options: EnqueueOptions
    result_mode: ResultMode = "none"


@dataclass(frozen=True)
class EdgeSpec:
    parent: str
    child: str
    position: int  # where the parent's result goes among the child's inputs
    needs_result: bool  # the child receives this result (so it cannot run without it)


@dataclass(frozen=True)
class WorkflowSpec:
    """A validated workflow: steps in a topological order (parents before children)."""

    name: str
    kind: WorkflowKind
    on_failure: FailurePolicy
    steps: tuple[StepSpec, ...]
    edges: tuple[EdgeSpec, ...]
    output: tuple[str, ...]  # the steps whose results make the workflow's result
    output_mode: OutputMode  # single: output[0]'s result; list: in order; dict: step name -> result

    def parents_of(self) -> dict[str, list[EdgeSpec]]:
        found: dict[str, list[EdgeSpec]] = {s.name: [] for s in self.steps}
        for edge in self.edges:
            found[edge.child].append(edge)
        return found


# -- canvases ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Group:
    """Steps that run in parallel; their results are collected in the order given."""

    members: tuple[SignatureLike, ...]

    def __post_init__(self) -> None:
        if not self.members:
            raise InvalidWorkflow("a group needs at least one signature")
        for index, member in enumerate(self.members):
            if not _is_signature(member):
                raise InvalidWorkflow(
                    f"group member {index} is a {type(member).__name__}: a group holds signatures only "
                    "(put a chain or chord after the group instead)"
                )


@dataclass(frozen=True)
class Chord:
    """A group, then a callback that receives the list of the group's results."""

    header: Group
    callback: SignatureLike

    def __post_init__(self) -> None:
        if not isinstance(self.header, Group):
            raise InvalidWorkflow("a chord's header must be a group")
        if not _is_signature(self.callback):
            raise InvalidWorkflow(f"a chord's callback must be a signature, not a {type(self.callback).__name__}")


Link = SignatureLike | Group | Chord


@dataclass(frozen=True)
class Chain:
    """Links that run one after another, each receiving the previous one's result (a list after a group)."""

    links: tuple[Link, ...]

    def __post_init__(self) -> None:
        if not self.links:
            raise InvalidWorkflow("a chain needs at least one link")


Canvas = Chain | Group | Chord


def make_chain(items: Iterable[Link | Chain]) -> Chain:
    """A chain of signatures, groups and chords; nested chains are flattened into it."""
    links: list[Link] = []
    for index, item in enumerate(items):
        if isinstance(item, Chain):
            links.extend(item.links)
        elif isinstance(item, Group | Chord) or _is_signature(item):
            links.append(item)
        else:
            raise InvalidWorkflow(f"chain link {index} is a {type(item).__name__}, not a signature, group or chord")
    return Chain(tuple(links))


def make_group(items: Iterable[SignatureLike | Group]) -> Group:
    """A group of signatures (``group(*sigs)`` or ``group(generator)``)."""
    members: list[SignatureLike] = []
    for item in items:
        if isinstance(item, Group):
            members.extend(item.members)  # a group of groups is one group
        else:
            members.append(item)
    return Group(tuple(members))


def compile_canvas(canvas: Canvas, *, name: str | None = None, on_failure: FailurePolicy = "stop") -> WorkflowSpec:
    """The spec of a chain, group or chord (links become layers; each layer receives the previous one)."""
    if isinstance(canvas, Chain):
        layers = _layers(canvas.links)
        kind: WorkflowKind = "chain"
    elif isinstance(canvas, Group):
        layers = [_Layer(canvas.members, grouped=True)]
        kind = "group"
    elif isinstance(canvas, Chord):
        layers = _layers([canvas])
        kind = "chord"
    else:
        raise InvalidWorkflow(f"cannot run a {type(canvas).__name__} as a workflow")
    steps: list[StepSpec] = []
    edges: list[EdgeSpec] = []
    previous: _Layer | None = None
    previous_names: list[str] = []
    for number, layer in enumerate(layers):
        names = []
        for index, signature in enumerate(layer.members):
            step_name = f"{number}.{index}:{signature.name}" if layer.grouped else f"{number}:{signature.name}"
            mode: ResultMode = "none" if previous is None else ("list" if previous.grouped else "single")
            steps.append(_step(step_name, signature, mode))
            names.append(step_name)
            edges.extend(
                EdgeSpec(parent, step_name, position, needs_result=True)
                for position, parent in enumerate(previous_names)
            )
        previous, previous_names = layer, names
    assert previous is not None
    output_mode: OutputMode = "list" if previous.grouped else "single"
    spec = WorkflowSpec(
        name=name or kind,
        kind=kind,
        on_failure=on_failure,
        steps=tuple(steps),
        edges=tuple(edges),
        output=tuple(previous_names),
        output_mode=output_mode,
    )
    validate(spec)
    return spec


@dataclass(frozen=True)
class _Layer:
    members: tuple[SignatureLike, ...]
    grouped: bool


def _layers(links: Iterable[Link]) -> list[_Layer]:
    layers: list[_Layer] = []
    for link in links:
        if isinstance(link, Group):
            layers.append(_Layer(link.members, grouped=True))
        elif isinstance(link, Chord):
            layers.append(_Layer(link.header.members, grouped=True))
            layers.append(_Layer((link.callback,), grouped=False))
        else:
            layers.append(_Layer((link,), grouped=False))
    return layers


# -- general DAGs -----------------------------------------------------------------------------------


@dataclass
class _DagStep:
    signature: SignatureLike
    depends_on: tuple[str, ...]
    pass_results: bool


@dataclass
class Dag:
    """A general workflow: steps by name, each depending on any others (declared in any order).

    ``build()`` checks the whole graph: unknown dependencies and cycles are reported there, naming the step."""

    name: str = "workflow"
    on_failure: FailurePolicy = "stop"
    _steps: dict[str, _DagStep] = field(default_factory=dict)

    def __post_init__(self) -> None:
        check_policy(self.on_failure)
        if not isinstance(self.name, str) or not self.name.strip() or len(self.name) > 200:
            raise InvalidWorkflow("a workflow name must be 1-200 characters", field="name")

    def add(
        self,
        signature: SignatureLike,
        *,
        name: str | None = None,
        depends_on: Sequence[str] = (),
        pass_results: bool = True,
    ) -> str:
        """Add a step (default name: the task's name) and return its name. With ``pass_results`` the
        step receives its dependencies' results as its first argument (see the module docstring)."""
        if not _is_signature(signature):
            raise InvalidWorkflow(f"a step must be a signature (task.s(...)), not a {type(signature).__name__}")
        step_name = signature.name if name is None else name
        check_step_name(step_name)
        if step_name in self._steps:
            raise InvalidWorkflow(
                f"step name {step_name!r} is used twice; give each step its own name=", step=step_name, field="name"
            )
        if isinstance(depends_on, str):
            raise InvalidWorkflow(
                f"depends_on of step {step_name!r} must be a list of step names, not a string",
                step=step_name,
                field="depends_on",
            )
        deps = tuple(depends_on)
        if len(set(deps)) != len(deps):
            raise InvalidWorkflow(f"step {step_name!r} lists a dependency twice", step=step_name, field="depends_on")
        if step_name in deps:
            raise InvalidWorkflow(f"step {step_name!r} depends on itself", step=step_name, field="depends_on")
        self._steps[step_name] = _DagStep(signature, deps, bool(pass_results))
        return step_name

    def __len__(self) -> int:
        return len(self._steps)

    def build(self) -> WorkflowSpec:
        if not self._steps:
            raise InvalidWorkflow("a workflow needs at least one step", field="steps")
        for step_name, step in self._steps.items():
            for dep in step.depends_on:
                if dep not in self._steps:
                    raise InvalidWorkflow(
                        f"step {step_name!r} depends on {dep!r}, which is not a step of this workflow",
                        step=step_name,
                        field="depends_on",
                    )
        order = _topological(self._steps)
        steps: list[StepSpec] = []
        edges: list[EdgeSpec] = []
        for step_name in order:
            step = self._steps[step_name]
            mode: ResultMode = "none"
            if step.pass_results and step.depends_on:
                mode = "single" if len(step.depends_on) == 1 else "list"
            steps.append(_step(step_name, step.signature, mode))
            edges.extend(
                EdgeSpec(dep, step_name, position, needs_result=step.pass_results)
                for position, dep in enumerate(step.depends_on)
            )
        spec = WorkflowSpec(
            name=self.name,
            kind="dag",
            on_failure=self.on_failure,
            steps=tuple(steps),
            edges=tuple(edges),
            output=tuple(order),
            output_mode="dict",
        )
        validate(spec)
        return spec


def _topological(steps: Mapping[str, _DagStep]) -> list[str]:
    """Kahn's algorithm, stable: among ready steps, the one added first goes first. O(n log n + edges)."""
    pending = {name: len(step.depends_on) for name, step in steps.items()}
    children: dict[str, list[str]] = {name: [] for name in steps}
    for name, step in steps.items():
        for dep in step.depends_on:
            children[dep].append(name)
    rank = {name: i for i, name in enumerate(steps)}
    ready = [(rank[n], n) for n, count in pending.items() if count == 0]
    heapq.heapify(ready)
    order: list[str] = []
    while ready:
        _, current = heapq.heappop(ready)
        order.append(current)
        for child in children[current]:
            pending[child] -= 1
            if pending[child] == 0:
                heapq.heappush(ready, (rank[child], child))
    if len(order) < len(steps):
        stuck = [name for name in steps if pending[name] > 0]
        cycle = _find_cycle(steps, set(stuck))
        first = min(cycle, key=rank.__getitem__)  # blame (and start the message at) the step declared first
        loop = cycle[:-1]
        start = loop.index(first)
        cycle = [*loop[start:], *loop[:start], first]
        raise InvalidWorkflow(f"the steps form a cycle: {' -> '.join(cycle)}", step=first, field="depends_on")
    return order


def _find_cycle(steps: Mapping[str, _DagStep], candidates: set[str]) -> list[str]:
    """One cycle among ``candidates`` (steps Kahn's algorithm could not order), for the error message."""
    start = min(candidates, key=list(steps).index)
    seen: list[str] = []
    current = start
    while current not in seen:
        seen.append(current)
        current = next(dep for dep in steps[current].depends_on if dep in candidates)
    cycle = seen[seen.index(current) :]
    # Report it in the direction of execution (dependency first).
    cycle.reverse()
    return [*cycle, cycle[0]]


# -- checks -----------------------------------------------------------------------------------------


def check_policy(policy: str) -> FailurePolicy:
    if policy not in FAILURE_POLICIES:
        raise InvalidWorkflow(f"on_failure must be 'stop' or 'continue', got {policy!r}", field="on_failure")
    return policy  # type: ignore[return-value]


def check_step_name(name: str) -> str:
    if not isinstance(name, str) or not name or len(name) > 200 or not name.isprintable():
        raise InvalidWorkflow(f"step name {name!r} must be 1-200 printable characters", step=str(name), field="name")
    return name


def validate(spec: WorkflowSpec) -> None:
    """What every spec must satisfy, however it was built (the store relies on it)."""
    if not spec.steps:
        raise InvalidWorkflow("a workflow needs at least one step", field="steps")
    if len(spec.steps) > MAX_STEPS:
        raise InvalidWorkflow(f"a workflow may have at most {MAX_STEPS} steps", field="steps")
    check_policy(spec.on_failure)
    seen: dict[str, int] = {}
    for index, step in enumerate(spec.steps):
        check_step_name(step.name)
        if step.name in seen:
            raise InvalidWorkflow(f"step name {step.name!r} is used twice", step=step.name, field="name")
        seen[step.name] = index
    parents = spec.parents_of() if len(seen) == len(spec.steps) else {}
    for edge in spec.edges:
        if edge.parent not in seen or edge.child not in seen:
            raise InvalidWorkflow(f"edge {edge.parent!r} -> {edge.child!r} names an unknown step", field="depends_on")
        if seen[edge.parent] >= seen[edge.child]:
            raise InvalidWorkflow(
                f"steps are not in dependency order ({edge.parent!r} must come before {edge.child!r})",
                step=edge.child,
                field="depends_on",
            )
    for step in spec.steps:
        incoming = parents[step.name]
        if len({e.parent for e in incoming}) != len(incoming):
            raise InvalidWorkflow(f"step {step.name!r} lists a dependency twice", step=step.name, field="depends_on")
        _check_step(step, incoming)
    unknown = [name for name in spec.output if name not in seen]
    if unknown or (spec.output_mode == "single" and len(spec.output) != 1):
        raise InvalidWorkflow("the workflow's output names unknown steps", field="output")


def _check_step(step: StepSpec, incoming: Sequence[EdgeSpec]) -> None:
    options = step.options
    if options.idempotency_key is not None or options.unique_key is not None:
        # Either key can make enqueue return a task that already exists: a step must be a task of its own.
        raise InvalidWorkflow(
            f"step {step.name!r}: workflow steps cannot have an idempotency_key or unique_key",
            step=step.name,
            field="options",
        )
    if incoming and (options.delay is not None or options.eta is not None):
        raise InvalidWorkflow(
            f"step {step.name!r}: only steps without dependencies can have a delay or eta "
            "(a step runs when its dependencies are done)",
            step=step.name,
            field="options",
        )
    needs = [e for e in incoming if e.needs_result]
    if step.result_mode == "none" and needs:
        raise InvalidWorkflow(f"step {step.name!r} needs results but receives none", step=step.name)
    if step.result_mode == "single" and len(needs) != 1:
        raise InvalidWorkflow(f"step {step.name!r} receives one result but needs {len(needs)}", step=step.name)
    if step.result_mode == "list" and not needs:
        raise InvalidWorkflow(f"step {step.name!r} receives a list of results but needs none", step=step.name)
    if sorted(e.position for e in needs) != list(range(len(needs))):
        raise InvalidWorkflow(f"step {step.name!r}: result positions must be 0..n-1", step=step.name)


def _step(name: str, signature: SignatureLike, mode: ResultMode) -> StepSpec:
    args = signature.args
    if isinstance(args, str | bytes) or not isinstance(args, Sequence):
        raise InvalidWorkflow(f"step {name!r}: args must be a list", step=name, field="args")
    return StepSpec(
        name=name,
        task=signature.name,
        args=tuple(args),
        kwargs=dict(signature.kwargs),
        options=signature.options,
        result_mode=mode,
    )


def _is_signature(value: object) -> bool:
    return (
        isinstance(getattr(value, "name", None), str)
        and hasattr(value, "args")
        and hasattr(value, "kwargs")
        and isinstance(getattr(value, "options", None), EnqueueOptions)
    )
