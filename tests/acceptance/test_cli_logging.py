"""What the commands' log output looks like (``configure_logging``), checked in-process on a buffer."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator

import pytest
import structlog

from conveyor.monitoring.logging import configure_logging

SECRET_URL = "postgresql://bob:hunter2@db.internal:5432/jobs"


@pytest.fixture
def output() -> Iterator[io.StringIO]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    buffer = io.StringIO()
    try:
        yield buffer
    finally:
        for handler in [h for h in root.handlers if h not in handlers]:
            root.removeHandler(handler)
        root.setLevel(level)
        structlog.reset_defaults()


def log_samples() -> None:
    log = logging.getLogger("conveyor.sample")
    log.info("connecting to %s", SECRET_URL)
    log.debug("below the level")
    password = "hunter2"  # noqa: F841 - a local variable a traceback must not show
    try:
        raise ConnectionError(f"cannot reach {SECRET_URL}")
    except ConnectionError:
        log.exception("task %s failed", 7)
    structlog.get_logger("conveyor.native").info("structured", url=SECRET_URL, task_id=7)


def test_json_logs__one_object_per_line_with_the_standard_keys(output: io.StringIO) -> None:
    configure_logging("info", "json", stream=output)

    log_samples()

    records = [json.loads(line) for line in output.getvalue().splitlines()]
    assert [r["event"] for r in records] == [
        "connecting to postgresql://bob:***@db.internal:5432/jobs",
        "task 7 failed",
        "structured",
    ]
    assert all({"timestamp", "level", "logger", "event"} <= r.keys() for r in records)
    assert [r["logger"] for r in records] == ["conveyor.sample", "conveyor.sample", "conveyor.native"]
    assert records[1]["level"] == "error" and records[1]["exception"][0]["exc_type"] == "ConnectionError"
    assert records[2]["task_id"] == 7
    assert "hunter2" not in output.getvalue()


def test_console_logs__readable_and_redacted(output: io.StringIO) -> None:
    configure_logging("info", "console", stream=output)

    log_samples()

    text = output.getvalue()
    assert "connecting to postgresql://bob:***@db.internal:5432/jobs" in text
    assert "Traceback (most recent call last)" in text and "ConnectionError" in text
    assert "task_id=7" in text
    assert "below the level" not in text
    assert "hunter2" not in text


def test_configure_logging__twice_does_not_double_lines(output: io.StringIO) -> None:
    configure_logging("info", "console", stream=output)
    configure_logging("warning", "console", stream=output)

    logging.getLogger("conveyor.sample").warning("once")
    logging.getLogger("conveyor.sample").info("filtered")

    assert output.getvalue().count("once") == 1
    assert "filtered" not in output.getvalue()
