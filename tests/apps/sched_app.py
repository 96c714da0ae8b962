"""A Conveyor app for scheduler acceptance tests (importable as ``sched_app:app``): one task on a
1-second interval, catching up every missed fire time (``misfire="all"``), so that a failover may delay
ticks but never lose one."""

from __future__ import annotations

from conveyor import App

app = App()


@app.periodic(interval=1, name="every-second", misfire="all")
@app.task(name="tick")
def tick() -> None:
    return None
