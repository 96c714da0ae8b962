"""Fixtures shared by the acceptance tests (real `conveyor` processes)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from conveyor.app import App
from tests.conftest import make_settings


@pytest.fixture
def producer(database_url: str) -> Iterator[App]:
    """Enqueues set-up tasks in-process (each CLI run costs an interpreter start); enqueues by name,
    since the task code lives in the worker processes' app."""
    app = App(settings=make_settings(database_url), strict_names=False)
    try:
        yield app
    finally:
        app.close()
