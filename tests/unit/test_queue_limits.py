"""A worker's routing and pacing of claims over limited queues (conveyor.core.queue_limits)."""

from __future__ import annotations

from conveyor.core.queue_limits import LimitGates, QueueGate, QueueLimits

CONCURRENCY_3 = QueueLimits(concurrency_limit=3)
RATE_20 = QueueLimits(rate_limit_per_s=20.0)


def gate(queue: str, limits: QueueLimits, **state: object) -> QueueGate:
    values: dict[str, object] = {
        "paused": False,
        "at_concurrency_limit": False,
        "next_token_in_s": None,
        "waiting": False,
    }
    values.update(state)
    return QueueGate(queue=queue, limits=limits, **values)  # type: ignore[arg-type]


def test_claimable__without_limits_every_queue_takes_the_plain_claim() -> None:
    gates = LimitGates(["a", "b"])
    assert not gates.loaded
    gates.update({})
    assert gates.loaded
    assert gates.claimable(0.0) == (["a", "b"], [])
    assert gates.ready_in_s(0.0) is None and not gates.holding_back


def test_claimable__limited_queues_are_routed_apart() -> None:
    gates = LimitGates(["a", "b", "c"])
    gates.update({"b": CONCURRENCY_3, "elsewhere": RATE_20})
    assert gates.claimable(0.0) == (["a", "c"], ["b"])


def test_after_claim__at_the_concurrency_limit_waits_for_a_freed_slot_or_the_recheck() -> None:
    gates = LimitGates(["a"])
    gates.update({"a": CONCURRENCY_3})
    gates.after_claim([gate("a", CONCURRENCY_3, at_concurrency_limit=True, waiting=True)], now=10.0, recheck_s=1.0)
    assert gates.claimable(10.5) == ([], [])
    assert gates.ready_in_s(10.5) == 0.5
    assert gates.holding_back
    assert gates.claimable(11.0) == ([], ["a"])
    gates.slot_freed("a")
    assert gates.claimable(10.5) == ([], ["a"]) and not gates.holding_back


def test_after_claim__out_of_tokens_waits_until_the_next_token() -> None:
    gates = LimitGates(["a"])
    gates.update({"a": RATE_20})
    gates.after_claim([gate("a", RATE_20, next_token_in_s=0.04, waiting=True)], now=10.0, recheck_s=1.0)
    assert gates.claimable(10.03) == ([], [])
    ready_in = gates.ready_in_s(10.0)
    assert ready_in is not None and 0.04 <= ready_in < 0.05
    gates.slot_freed("a")  # a finished task does not make tokens
    assert gates.claimable(10.03) == ([], [])
    assert gates.claimable(10.05) == ([], ["a"])


def test_after_claim__nothing_left_waiting_holds_nothing_back() -> None:
    gates = LimitGates(["a"])
    gates.update({"a": RATE_20})
    drained = gate("a", RATE_20, at_concurrency_limit=True, next_token_in_s=0.5, waiting=False)
    gates.after_claim([drained], now=0.0, recheck_s=1.0)
    assert gates.claimable(0.0) == ([], ["a"]) and not gates.holding_back


def test_after_claim__paused_or_zero_concurrency_is_polled_not_held() -> None:
    zero = QueueLimits(concurrency_limit=0)
    gates = LimitGates(["a", "b"])
    gates.update({"a": CONCURRENCY_3, "b": zero})
    gates.after_claim(
        [
            gate("a", CONCURRENCY_3, paused=True, at_concurrency_limit=True, waiting=True),
            gate("b", zero, at_concurrency_limit=True, waiting=True),
        ],
        now=0.0,
        recheck_s=1.0,
    )
    assert gates.claimable(0.0) == ([], ["a", "b"]) and not gates.holding_back


def test_limits_removed__the_queue_goes_back_to_the_plain_claim() -> None:
    gates = LimitGates(["a"])
    gates.update({"a": RATE_20})
    gates.after_claim([gate("a", QueueLimits(), next_token_in_s=None, waiting=True)], now=0.0, recheck_s=1.0)
    assert gates.claimable(0.0) == (["a"], [])
    gates.update({"a": RATE_20})
    gates.update({})
    assert gates.claimable(0.0) == (["a"], [])


def test_limits_changed__a_held_back_queue_is_claimed_at_once() -> None:
    gates = LimitGates(["a"])
    gates.update({"a": RATE_20})
    gates.after_claim([gate("a", RATE_20, next_token_in_s=30.0, waiting=True)], now=0.0, recheck_s=1.0)
    gates.update({"a": RATE_20})  # the same limits read again: still waiting for the token
    assert gates.claimable(1.0) == ([], [])
    faster = QueueLimits(rate_limit_per_s=1000.0)
    gates.update({"a": faster})
    assert gates.claimable(1.0) == ([], ["a"])
