"""The pure workflow graph: what chain, group, chord and DAGs compile to, and every graph refused."""

from __future__ import annotations

from typing import Any

import pytest

from conveyor import Signature, chain, chord, group
from conveyor.core.task import EnqueueOptions
from conveyor.core.workflow import Dag, EdgeSpec, WorkflowSpec, compile_canvas
from conveyor.core.workflow_records import InvalidWorkflow


def s(name: str, *args: Any, **options: Any) -> Signature:
    return Signature(name, args, {}, EnqueueOptions(**options))


def shape(spec: WorkflowSpec) -> tuple[list[tuple[str, str]], list[tuple[str, str, int, bool]]]:
    steps: list[tuple[str, str]] = [(step.name, step.result_mode) for step in spec.steps]
    edges = [(e.parent, e.child, e.position, e.needs_result) for e in spec.edges]
    return steps, edges


# -- chain, group, chord ------------------------------------------------------------------------------


def test_chain__each_link_receives_the_previous_result() -> None:
    spec = chain(s("a", 1), s("b"), s("c")).spec()
    assert shape(spec) == (
        [("0:a", "none"), ("1:b", "single"), ("2:c", "single")],
        [("0:a", "1:b", 0, True), ("1:b", "2:c", 0, True)],
    )
    assert (spec.kind, spec.output, spec.output_mode, spec.on_failure) == ("chain", ("2:c",), "single", "stop")
    assert spec.steps[0].args == (1,)


def test_chain__nested_chains_are_flattened() -> None:
    assert chain(s("a"), chain(s("b"), s("c"))).spec() == chain(s("a"), s("b"), s("c")).spec()


def test_chain__a_group_inside_fans_out_then_the_next_link_gets_the_list_in_order() -> None:
    spec = chain(s("a"), group(s("x"), s("y")), s("z")).spec()
    assert shape(spec) == (
        [("0:a", "none"), ("1.0:x", "single"), ("1.1:y", "single"), ("2:z", "list")],
        [("0:a", "1.0:x", 0, True), ("0:a", "1.1:y", 0, True), ("1.0:x", "2:z", 0, True), ("1.1:y", "2:z", 1, True)],
    )


def test_chain__ending_with_a_group_returns_the_list() -> None:
    spec = chain(s("a"), group(s("x"), s("y"))).spec()
    assert (spec.output, spec.output_mode) == (("1.0:x", "1.1:y"), "list")


def test_group__parallel_steps_with_the_list_as_result() -> None:
    spec = group(s("x", i) for i in range(3)).spec(name="fan")
    assert shape(spec) == ([("0.0:x", "none"), ("0.1:x", "none"), ("0.2:x", "none")], [])
    assert (spec.name, spec.kind, spec.output_mode, spec.output) == (
        "fan",
        "group",
        "list",
        ("0.0:x", "0.1:x", "0.2:x"),
    )


def test_group__of_groups_is_one_group() -> None:
    assert len(group(group(s("a"), s("b")), s("c")).members) == 3


def test_chord__callback_receives_the_list() -> None:
    spec = chord([s("x"), s("y")], s("total", 100)).spec(on_failure="continue")
    assert shape(spec) == (
        [("0.0:x", "none"), ("0.1:y", "none"), ("1:total", "list")],
        [("0.0:x", "1:total", 0, True), ("0.1:y", "1:total", 1, True)],
    )
    assert (spec.kind, spec.output, spec.output_mode, spec.on_failure) == ("chord", ("1:total",), "single", "continue")


def test_chord__inside_a_chain() -> None:
    spec = chain(s("a"), chord(group(s("x"), s("y")), s("cb")), s("z")).spec()
    assert [step.name for step in spec.steps] == ["0:a", "1.0:x", "1.1:y", "2:cb", "3:z"]
    assert spec.steps[3].result_mode == "list" and spec.steps[4].result_mode == "single"


def untyped(value: object) -> Any:
    """Shapes a type checker refuses too, passed as a caller without one could."""
    return value


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: chain(), "at least one link"),
        (lambda: group(), "at least one signature"),
        (lambda: group(s("a"), untyped(chain(s("b")))), "a group holds signatures only"),
        (lambda: group(s("a"), untyped(chord([s("b")], s("c")))), "a group holds signatures only"),
        (lambda: chain(s("a"), untyped("b")), "chain link 1 is a str"),
        (lambda: chord([], s("c")), "at least one signature"),
        (lambda: chord([s("a")], untyped(group(s("b")))), "callback must be a signature"),
    ],
)
def test_canvases__refused_shapes(make: Any, message: str) -> None:
    with pytest.raises(InvalidWorkflow, match=message):
        make()


def test_canvas__a_step_cannot_carry_keys_that_could_return_another_task() -> None:
    with pytest.raises(InvalidWorkflow, match="idempotency_key or unique_key") as refused:
        chain(s("a"), s("b", unique_key="k")).spec()
    assert (refused.value.step, refused.value.field) == ("1:b", "options")
    with pytest.raises(InvalidWorkflow, match="idempotency_key or unique_key"):
        group(s("a", idempotency_key="k")).spec()


def test_canvas__only_steps_without_dependencies_may_be_delayed() -> None:
    assert chain(s("a", delay=5), s("b")).spec().steps[0].options.delay == 5
    with pytest.raises(InvalidWorkflow, match="only steps without dependencies can have a delay"):
        chain(s("a"), s("b", delay=5)).spec()


def test_canvas__on_failure_must_be_known() -> None:
    with pytest.raises(InvalidWorkflow, match="on_failure must be 'stop' or 'continue'"):
        compile_canvas(chain(s("a")), on_failure="panic")  # type: ignore[arg-type]


# -- DAGs ---------------------------------------------------------------------------------------------


def test_dag__diamond() -> None:
    dag = Dag("diamond", on_failure="continue")
    dag.add(s("a"))
    dag.add(s("b"), depends_on=["a"])
    dag.add(s("c"), depends_on=["a"], pass_results=False)
    dag.add(s("d"), depends_on=["b", "c"])
    spec = dag.build()
    assert shape(spec) == (
        [("a", "none"), ("b", "single"), ("c", "none"), ("d", "list")],
        [("a", "b", 0, True), ("a", "c", 0, False), ("b", "d", 0, True), ("c", "d", 1, True)],
    )
    assert (spec.kind, spec.output_mode, spec.output) == ("dag", "dict", ("a", "b", "c", "d"))


def test_dag__steps_may_be_declared_before_their_dependencies() -> None:
    dag = Dag()
    dag.add(s("report"), depends_on=["load", "fetch"], name="report")
    dag.add(s("load"), depends_on=["fetch"])
    dag.add(s("fetch"))
    dag.add(s("other"))
    # Dependencies first; otherwise the order steps were added in.
    assert [step.name for step in dag.build().steps] == ["fetch", "load", "report", "other"]


def test_dag__cycles_are_refused_naming_them() -> None:
    dag = Dag()
    dag.add(s("a"), depends_on=["c"])
    dag.add(s("b"), depends_on=["a"])
    dag.add(s("c"), depends_on=["b"])
    dag.add(s("free"))
    with pytest.raises(InvalidWorkflow, match="cycle: a -> b -> c -> a") as refused:
        dag.build()
    assert (refused.value.step, refused.value.field) == ("a", "depends_on")


@pytest.mark.parametrize(
    ("steps", "message", "step", "field"),
    [
        ([("a", [])], None, None, None),
        ([("a", ["nope"])], "depends on 'nope', which is not a step", "a", "depends_on"),
        ([("a", []), ("a", [])], "used twice", "a", "name"),
        ([("a", ["a"])], "depends on itself", "a", "depends_on"),
        ([("a", []), ("b", ["a", "a"])], "lists a dependency twice", "b", "depends_on"),
        ([("a", []), ("b", "a")], "must be a list of step names", "b", "depends_on"),
        ([("", [])], "1-200 printable characters", "", "name"),
    ],
)
def test_dag__refused_steps(steps: list[tuple[str, Any]], message: str | None, step: str, field: str) -> None:
    dag = Dag()

    def build() -> None:
        for name, deps in steps:
            dag.add(s("t"), name=name, depends_on=deps)
        dag.build()

    if message is None:
        build()
        return
    with pytest.raises(InvalidWorkflow, match=message) as refused:
        build()
    assert (refused.value.step, refused.value.field) == (step, field)


def test_dag__empty_and_bad_names_and_policies() -> None:
    with pytest.raises(InvalidWorkflow, match="at least one step"):
        Dag().build()
    with pytest.raises(InvalidWorkflow, match="on_failure"):
        Dag(on_failure="sometimes")  # type: ignore[arg-type]
    with pytest.raises(InvalidWorkflow, match="workflow name"):
        Dag(name="")
    with pytest.raises(InvalidWorkflow, match="must be a signature"):
        Dag().add("task_name")  # type: ignore[arg-type]


def test_dag__default_step_name_is_the_task_name() -> None:
    dag = Dag()
    assert dag.add(s("fetch")) == "fetch"
    with pytest.raises(InvalidWorkflow, match="give each step its own name="):
        dag.add(s("fetch"))


def test_dag__a_wide_fan_in_builds_in_linear_time() -> None:
    dag = Dag()
    for i in range(5000):
        dag.add(s("leaf", i), name=f"leaf-{i}")
    dag.add(s("sink"), depends_on=[f"leaf-{i}" for i in range(5000)])
    spec = dag.build()
    assert spec.steps[-1].name == "sink" and len(spec.edges) == 5000
    assert spec.edges[4999] == EdgeSpec("leaf-4999", "sink", 4999, True)


def test_spec__validation_catches_hand_made_specs() -> None:
    good = chain(s("a"), s("b")).spec()
    backwards = WorkflowSpec(**{**vars(good), "steps": tuple(reversed(good.steps))})
    with pytest.raises(InvalidWorkflow, match="not in dependency order"):
        compile_check(backwards)
    wrong_mode = WorkflowSpec(
        **{
            **vars(good),
            "steps": (good.steps[0], good.steps[0].__class__(**{**vars(good.steps[1]), "result_mode": "none"})),
        }
    )
    with pytest.raises(InvalidWorkflow, match="needs results but receives none"):
        compile_check(wrong_mode)


def compile_check(spec: WorkflowSpec) -> None:
    from conveyor.core.workflow import validate

    validate(spec)
