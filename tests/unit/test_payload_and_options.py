from __future__ import annotations

from datetime import datetime

import pytest

from conveyor.core.payload import encode_arguments, payload_fingerprint
from conveyor.core.task import EnqueueOptions, TaskOptions, check_queue_name
from conveyor.errors import PayloadError
from conveyor.handles import make_options


def test_arguments__must_be_json() -> None:
    with pytest.raises(PayloadError, match="JSON-serialisable"):
        encode_arguments([object()], {}, limit_bytes=1000)
    with pytest.raises(PayloadError, match="JSON-serialisable"):
        encode_arguments([float("nan")], {}, limit_bytes=1000)


def test_arguments__size_limit_counts_args_and_kwargs_together() -> None:
    encode_arguments(["x" * 400], {"k": "y" * 400}, limit_bytes=1000)
    with pytest.raises(PayloadError, match="over the limit of 1000 bytes"):
        encode_arguments(["x" * 600], {"k": "y" * 600}, limit_bytes=1000)


def test_arguments__shapes() -> None:
    with pytest.raises(PayloadError, match="args must be a list"):
        encode_arguments("abc", {}, limit_bytes=1000)  # type: ignore[arg-type]
    with pytest.raises(PayloadError, match="kwargs"):
        encode_arguments([], {1: 2}, limit_bytes=1000)  # type: ignore[dict-item]


def test_fingerprint__ignores_key_order_but_not_values() -> None:
    a = payload_fingerprint("t", "q", "[1]", '{"a":1,"b":2}')
    assert a == payload_fingerprint("t", "q", "[1]", '{"b":2,"a":1}')
    assert a != payload_fingerprint("t", "q", "[2]", '{"a":1,"b":2}')


def test_options__unknown_option_is_a_type_error() -> None:
    with pytest.raises(TypeError, match="prority"):
        make_options(prority=3)


def test_options__validation() -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        EnqueueOptions(eta=datetime(2030, 1, 1))
    with pytest.raises(ValueError, match="either delay or eta"):
        EnqueueOptions(delay=1, eta=datetime(2030, 1, 1).astimezone())
    with pytest.raises(ValueError, match="priority"):
        EnqueueOptions(priority=10**6)
    with pytest.raises(ValueError, match="queue name"):
        check_queue_name("bad queue!")
    with pytest.raises(ValueError, match="max_attempts"):
        TaskOptions(max_attempts=0)


def test_options__merge_later_wins_and_delay_replaces_eta() -> None:
    base = EnqueueOptions(queue="a", eta=datetime(2030, 1, 1).astimezone())
    merged = base.merged(EnqueueOptions(delay=5, priority=2))
    assert (merged.queue, merged.priority, merged.delay, merged.eta) == ("a", 2, 5, None)


def test_arguments__nul_characters_are_refused_but_escaped_lookalikes_are_not() -> None:
    with pytest.raises(PayloadError, match="NUL"):
        encode_arguments(["a\x00b"], {}, limit_bytes=1000)
    encode_arguments(["\\u0000"], {"k": "\\\\u0000"}, limit_bytes=1000)
