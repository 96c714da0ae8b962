"""The scheduler in-process against a real PostgreSQL: leader election, fencing, misfires, sync, operator actions.

Time travel: a test moves a schedule's cursor (``next_fire_at``) or a lease's expiry into the past and
runs one explicit pass, instead of sleeping through the downtime it stands for.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import socket
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import pytest

from conveyor.app import App
from conveyor.config import SchedulerSettings
from conveyor.core.records import EnqueueRequest
from conveyor.core.schedule import ScheduleDefinition, Timing, due_fire_times, run_key
from conveyor.core.schedule_records import ScheduleConflict, ScheduleNotFound, ScheduleRecord
from conveyor.db import schedule_store
from conveyor.db.schedule_run_retention import CURSOR_MARGIN_S, ScheduleRunRetention
from conveyor.db.schedule_sql import FENCE, LIMIT_TRANSACTION
from conveyor.db.schedule_store import Firing, ScheduleStore
from conveyor.db.scheduler_process_store import SchedulerProcessStore
from conveyor.scheduler import Scheduler
from conveyor.scheduler.runs import build_run_request
from tests.conftest import make_settings

FAST = {"scheduler__tick_interval_s": 0.1, "scheduler__leader_lease_s": 1.0}


@pytest.fixture
async def sapp(database_url: str) -> AsyncIterator[App]:
    """An app with fast scheduler timers that knows the task ``beat``."""
    app = App(settings=make_settings(database_url, **FAST))

    @app.task(name="beat")
    def beat(n: int = 0) -> int:
        return n

    try:
        yield app
    finally:
        await app.aclose()
        app.close()


@pytest.fixture
async def store(sapp: App) -> ScheduleStore:
    return ScheduleStore(sapp.runtime().engine)


def scheduler(app: App, **kwargs: Any) -> Scheduler:
    kwargs.setdefault("misfire_grace_s", 1.0)
    kwargs.setdefault("sync", False)
    return Scheduler(app, **kwargs)


@asynccontextmanager
async def running(*schedulers: Scheduler) -> AsyncIterator[None]:
    tasks = [asyncio.create_task(s.run()) for s in schedulers]
    try:
        yield
    finally:
        for s in schedulers:
            s.request_stop()
        await asyncio.wait_for(asyncio.gather(*tasks), 20)


async def wait_for(predicate: Callable[[], Any], timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not await predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.02)


def sql(url: str, statement: str, *params: object) -> list[tuple[Any, ...]]:
    with psycopg.connect(url, autocommit=True) as conn:
        cursor = conn.execute(statement, params)
        return cursor.fetchall() if cursor.description else []


def every_second(name: str = "tick", misfire: str = "all", **kwargs: Any) -> ScheduleDefinition:
    return ScheduleDefinition(name, "beat", Timing(interval_s=1), misfire=misfire, **kwargs)  # type: ignore[arg-type]


def back_date(url: str, schedule_id: int, seconds: int) -> datetime:
    """Time travel: the schedule was last dealt with ``seconds`` ago (its cursor on a whole second)."""
    rows = sql(
        url,
        "UPDATE conveyor_schedules SET next_fire_at = date_trunc('second', now()) - make_interval(secs => %s) "
        "WHERE id = %s RETURNING next_fire_at",
        seconds,
        schedule_id,
    )
    return rows[0][0]  # type: ignore[no-any-return]


def expire_lease(url: str) -> None:
    sql(url, "UPDATE conveyor_leases SET expires_at = now() - interval '1 second'")


def runs_of(url: str, schedule_id: int) -> list[tuple[datetime, int, datetime]]:
    return sql(
        url,
        "SELECT fire_at, task_id, enqueued_at FROM conveyor_schedule_runs WHERE schedule_id = %s ORDER BY fire_at",
        schedule_id,
    )


def task_count(url: str) -> int:
    return int(sql(url, "SELECT count(*) FROM conveyor_tasks")[0][0])


# -- leadership ------------------------------------------------------------------------------------


async def test_lease__one_leader_among_two_and_takeover_bumps_the_token(sapp: App, database_url: str) -> None:
    first, second = scheduler(sapp), scheduler(sapp)
    assert await first.renew_once() and first.fencing_token == 1
    assert not await second.renew_once() and not second.leading
    assert await first.renew_once() and first.fencing_token == 1  # a renewal keeps the term
    expire_lease(database_url)  # the first one stopped renewing (time travel past its lease)
    assert await second.renew_once() and second.fencing_token == 2
    assert not await first.renew_once()
    assert not first.leading and first.fencing_token is None


async def test_lease__reacquiring_after_stepping_down_starts_a_new_term(sapp: App) -> None:
    leader = scheduler(sapp)
    assert await leader.renew_once() and leader.fencing_token == 1
    leader._step_down()
    assert await leader.renew_once() and leader.fencing_token == 2


async def test_fence__a_stale_leader_writes_nothing(sapp: App, store: ScheduleStore, database_url: str) -> None:
    record = await store.create(every_second())
    back_date(database_url, record.id, 5)
    stale, fresh = scheduler(sapp), scheduler(sapp)
    assert await stale.renew_once()
    expire_lease(database_url)
    assert await fresh.renew_once() and fresh.fencing_token == 2
    assert stale.leading  # it has not noticed: its own estimate of the term has not run out
    await stale.tick_once()
    assert task_count(database_url) == 0 and runs_of(database_url, record.id) == []
    assert not stale.leading  # refused by the fence, it stepped down
    await fresh.tick_once()
    assert len(runs_of(database_url, record.id)) >= 5
    tokens = sql(database_url, "SELECT DISTINCT fencing_token FROM conveyor_schedule_runs")
    assert tokens == [(2,)]  # every run was written by the new term


async def test_fence__a_takeover_waits_for_the_tick_in_flight(sapp: App, database_url: str) -> None:
    leader, standby = scheduler(sapp), scheduler(sapp)
    assert await leader.renew_once()
    with psycopg.connect(database_url) as tick:  # the leader's tick transaction, held open
        fenced = tick.execute(FENCE, {"lease": "scheduler", "holder": leader.holder, "token": 1}).fetchall()
        assert fenced == [(1,)]
        await asyncio.sleep(leader.lease_s + 0.1)  # the lease runs out while the tick has not committed
        assert not await standby.renew_once()  # its takeover waited on the tick's share lock, and gave up
        tick.commit()
    assert await standby.renew_once() and standby.fencing_token == 2


async def test_fence__a_frozen_leaders_open_tick_is_ended_by_the_server(sapp: App, database_url: str) -> None:
    # A leader frozen (SIGSTOP) inside its tick transaction holds the fence's share lock; the server ends
    # that transaction by itself, so the standby is held up by at most the idle timeout, not forever.
    leader, standby = scheduler(sapp), scheduler(sapp)
    assert await leader.renew_once()
    frozen = psycopg.connect(database_url)
    try:
        frozen.execute(LIMIT_TRANSACTION, {"lock": "250ms", "statement": "500ms", "idle": "1500ms"})
        assert frozen.execute(FENCE, {"lease": "scheduler", "holder": leader.holder, "token": 1}).fetchall()
        await asyncio.sleep(leader.lease_s + 0.1)  # the lease runs out while the frozen tick holds its lock
        assert not await standby.renew_once()  # held up by the lock...
        started = time.monotonic()
        while not await standby.renew_once():
            assert time.monotonic() - started < 5, "the standby never got the lease"
            await asyncio.sleep(0.05)
        assert standby.fencing_token == 2  # ...until the server ended the frozen transaction
        with pytest.raises(psycopg.Error, match="idle-in-transaction"):
            frozen.execute("SELECT 1")  # and the woken leader can write nothing on it
    finally:
        frozen.close()


async def test_leader__frozen_past_its_lease_steps_down_before_writing(
    sapp: App, store: ScheduleStore, database_url: str
) -> None:
    record = await store.create(every_second())
    leader = scheduler(sapp)
    assert await leader.renew_once()
    await asyncio.sleep(leader.lease_s)  # no renewals, as if frozen by SIGSTOP
    back_date(database_url, record.id, 3)
    assert not leader.leading
    assert await leader.tick_once() == (0.0, 0)
    assert runs_of(database_url, record.id) == []


async def test_stop__releases_the_lease_so_a_standby_takes_over_at_once(sapp: App, database_url: str) -> None:
    first = scheduler(sapp)
    task = asyncio.create_task(first.run())
    await wait_for(lambda: _true(first.leading))
    second = scheduler(sapp)
    first.request_stop()
    await asyncio.wait_for(task, 10)
    # At once: the lease was renewed moments ago and would otherwise be held for most of a second more.
    assert await second.renew_once() and second.fencing_token == 2


async def _true(value: object) -> bool:
    return bool(value)


# -- ticks -----------------------------------------------------------------------------------------


async def test_tick__each_fire_time_is_one_task_with_its_run_and_key(
    sapp: App, store: ScheduleStore, database_url: str
) -> None:
    record = await store.create(every_second(args=(7,), queue="cron", priority=3))
    cursor = back_date(database_url, record.id, 3)
    leader = scheduler(sapp)
    assert await leader.renew_once()
    await leader.tick_once()
    runs = runs_of(database_url, record.id)
    assert [r[0] for r in runs][:4] == [cursor + timedelta(seconds=s) for s in range(4)]
    tasks = sql(
        database_url,
        "SELECT id, name, queue, priority, args, idempotency_key, metadata FROM conveyor_tasks ORDER BY id",
    )
    assert len(tasks) == len(runs)
    for (fire_at, task_id, _), task in zip(runs, tasks, strict=True):
        assert task[:5] == (task_id, "beat", "cron", 3, [7])
        assert task[5] == run_key(record.id, fire_at)
        assert task[6] == {"schedule": "tick", "schedule_id": record.id, "fire_at": fire_at.astimezone(UTC).isoformat()}
    after = await store.get(record.id)
    assert after.next_fire_at == runs[-1][0] + timedelta(seconds=1) and after.last_fire_at == runs[-1][0]
    await leader.tick_once()
    assert runs_of(database_url, record.id)[: len(runs)] == runs  # nothing was enqueued again (only newer)
    assert task_count(database_url) == len(runs_of(database_url, record.id))


async def test_tick__a_cursor_moved_back_cannot_double_a_fire_time(
    sapp: App, store: ScheduleStore, database_url: str
) -> None:
    # Defence in depth: even a leader acting on a wrong cursor (as two leaders at once would) meets the
    # runs table's unique (schedule, fire time) and the tasks' idempotency keys.
    record = await store.create(every_second())
    back_date(database_url, record.id, 5)
    leader = scheduler(sapp)
    assert await leader.renew_once()
    await leader.tick_once()
    runs, tasks = runs_of(database_url, record.id), task_count(database_url)
    back_date(database_url, record.id, 5)
    await leader.tick_once()
    again = runs_of(database_url, record.id)
    assert again[: len(runs)] == runs and task_count(database_url) == len(again)
    keys = sql(database_url, "SELECT idempotency_key, count(*) FROM conveyor_tasks GROUP BY 1 HAVING count(*) > 1")
    assert keys == [] and tasks <= len(again)


def back_date_hours(url: str, schedule_id: int, hours: int) -> datetime:
    """Time travel for an hourly schedule: its cursor on the fire time ``hours`` before the current one."""
    rows = sql(
        url,
        "UPDATE conveyor_schedules SET next_fire_at = to_timestamp((floor(extract(epoch FROM now()) / 3600) - %s) "
        "* 3600) WHERE id = %s RETURNING next_fire_at",
        hours,
        schedule_id,
    )
    return rows[0][0]  # type: ignore[no-any-return]


def run_rows(url: str, schedule_id: int) -> list[tuple[Any, ...]]:
    """The schedule's runs in full: (id, fire_at, task_id, enqueued_at, kind, fencing_token)."""
    return sql(
        url,
        "SELECT id, fire_at, task_id, enqueued_at, kind, fencing_token FROM conveyor_schedule_runs "
        "WHERE schedule_id = %s ORDER BY fire_at",
        schedule_id,
    )


def tasks_per_fire_time(url: str) -> dict[datetime, int]:
    rows = sql(url, "SELECT (metadata->>'fire_at')::timestamptz, count(*) FROM conveyor_tasks GROUP BY 1")
    return {fire_at: int(n) for fire_at, n in rows}


def lock_waiters(url: str) -> int:
    """Backends of this database waiting on a lock (a row lock, or another transaction's unique key)."""
    rows = sql(
        url, "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock'"
    )
    return int(rows[0][0])


def patient(app: App) -> SchedulerSettings:
    # A lease long enough, and lock timeouts (a quarter of it) lenient enough, for a test that holds a
    # tick transaction open while another one waits on it.
    return app.settings.scheduler.model_copy(update={"leader_lease_s": 30.0})


def hold_enqueues(monkeypatch: pytest.MonkeyPatch) -> tuple[asyncio.Event, asyncio.Event]:
    """Hold the first tick or trigger that reaches its enqueue (its runs claimed, its transaction open)
    until the second event is set; the first event says it got there. Later ones pass straight through."""
    inside, release = asyncio.Event(), asyncio.Event()
    enqueue = schedule_store._enqueue

    async def held(conn: Any, requests: list[EnqueueRequest]) -> list[int]:
        if not inside.is_set():
            inside.set()
            await release.wait()
        return await enqueue(conn, requests)

    monkeypatch.setattr(schedule_store, "_enqueue", held)
    return inside, release


@pytest.mark.parametrize("policy", ["once", "all"])
async def test_tick__a_fire_time_with_a_run_is_not_enqueued_again_after_its_task_was_pruned(
    policy: str, sapp: App, store: ScheduleStore, database_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    # Regression: runs used to be recorded after the enqueue, so what kept a fire time reached again
    # (a cursor put back by hand, or acted on from a stale view) from a second task was the task's
    # idempotency key alone, and the key goes when the task is pruned. The run row is claimed first now.
    record = await store.create(ScheduleDefinition("hourly", "beat", Timing(interval_s=3600), misfire=policy))  # type: ignore[arg-type]
    back_date_hours(database_url, record.id, 3)
    leader = scheduler(sapp)
    assert await leader.renew_once()
    await leader.tick_once()
    runs = run_rows(database_url, record.id)
    # Three hours caught up and the current one, or a single run for them all.
    assert len(runs) >= 4 if policy == "all" else len(runs) == 1
    pruned_fire_at, pruned_task = runs[0][1], runs[0][2]
    sql(database_url, "DELETE FROM conveyor_tasks WHERE id = %s", pruned_task)  # as the task pruning would
    runs = run_rows(database_url, record.id)
    assert runs[0][2] is None  # the run stays on record, its task gone
    sql(database_url, "UPDATE conveyor_schedules SET next_fire_at = %s WHERE id = %s", pruned_fire_at, record.id)

    with caplog.at_level(logging.WARNING, logger="conveyor.scheduler"):
        await leader.tick_once()
    assert run_rows(database_url, record.id)[: len(runs)] == runs  # untouched: each points where it did
    counts = tasks_per_fire_time(database_url)
    assert pruned_fire_at not in counts
    assert all(counts[run[1]] == 1 for run in runs[1:])
    assert all(fire_at > runs[-1][1] for fire_at in counts.keys() - {run[1] for run in runs})  # an hour that began
    assert "already had a run; not enqueued again" in caplog.text


async def test_tick__two_ticks_racing_for_the_same_fire_times_enqueue_them_once(
    sapp: App, store: ScheduleStore, database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Two tick transactions for one schedule queue up on its row lock. To bring the second one to the
    # same fire times, the first acts on a stale view and leaves the cursor where it found it (as a
    # leader that lost track of its cursor would): only the run rows then stand in the second one's way.
    record = await store.create(every_second())
    back_date(database_url, record.id, 3)
    leader = scheduler(sapp, settings=patient(sapp))
    assert await leader.renew_once()
    fence = leader._fence()
    assert fence is not None

    def stale(schedule: ScheduleRecord, now: datetime) -> Firing:
        firing = leader._decide(schedule, now)
        return Firing(replace(firing.due, next_fire_at=schedule.next_fire_at), firing.requests)

    inside, release = hold_enqueues(monkeypatch)
    first = asyncio.create_task(store.fire(record.id, fence, stale, leader.limits))
    await asyncio.wait_for(inside.wait(), 10)  # its runs are claimed, its transaction still open
    second = asyncio.create_task(store.fire(record.id, fence, leader._decide, leader.limits))
    await wait_for(lambda: _true(lock_waiters(database_url)))  # the second one waits for the first
    release.set()
    won, lost = await asyncio.wait_for(asyncio.gather(first, second), 10)

    assert won is not None and lost is not None
    assert len(won.fire_times) >= 4
    assert all(fire_at > won.fire_times[-1] for fire_at in lost.fire_times)  # only a second begun meanwhile
    assert lost.already_run == won.fire_times
    runs = runs_of(database_url, record.id)
    assert [r[0] for r in runs] == [*won.fire_times, *lost.fire_times]
    assert [r[1] for r in runs] == [*won.task_ids, *lost.task_ids]
    assert set(tasks_per_fire_time(database_url).values()) == {1} and task_count(database_url) == len(runs)


async def test_tick__a_run_claimed_elsewhere_and_rolled_back_does_not_lose_the_fire_time(
    sapp: App, store: ScheduleStore, database_url: str
) -> None:
    # LESSONS 21 (oban#1093: a guard's holder rolled back, so nothing was inserted): a tick that meets
    # another transaction's uncommitted run waits for it, and takes the fire time if it rolls back.
    record = await store.create(every_second())
    cursor = back_date(database_url, record.id, 2)
    leader = scheduler(sapp, settings=patient(sapp))
    assert await leader.renew_once()
    with psycopg.connect(database_url) as other:
        other.execute("INSERT INTO conveyor_schedule_runs (schedule_id, fire_at) VALUES (%s, %s)", (record.id, cursor))
        tick = asyncio.create_task(leader.tick_once())
        await wait_for(lambda: _true(lock_waiters(database_url)))
        other.rollback()
    _, failures = await asyncio.wait_for(tick, 10)
    assert failures == 0
    runs = runs_of(database_url, record.id)
    assert runs[0][0] == cursor and runs[0][1] is not None
    assert tasks_per_fire_time(database_url) == {run[0]: 1 for run in runs}


@pytest.mark.parametrize("policy", ["skip", "once", "all"])
async def test_misfire__after_sixty_seconds_without_a_scheduler(
    policy: str, sapp: App, store: ScheduleStore, database_url: str
) -> None:
    record = await store.create(every_second(misfire=policy))
    cursor = back_date(database_url, record.id, 60)
    leader = scheduler(sapp)
    assert await leader.renew_once()
    await leader.tick_once()
    runs = runs_of(database_url, record.id)
    assert runs, "the on-time tick runs under every policy"
    now = runs[0][2]  # the tick transaction's now(): the clock every decision was made on
    latest = now.replace(microsecond=0)
    fire_times = [r[0] for r in runs if r[2] == now]
    if policy == "skip":
        assert fire_times == [latest]  # the current tick only, none of the 60 missed
    elif policy == "once":
        assert fire_times == [latest]  # the backlog collapsed into one run
    else:
        assert fire_times == [cursor + timedelta(seconds=s) for s in range(int((latest - cursor).total_seconds()) + 1)]
        assert len(fire_times) >= 61  # the 60 missed, the current one, and any second the test took meanwhile
    assert fire_times[-1] == latest
    expected = due_fire_times(Timing(interval_s=1), cursor, now, policy, grace_s=1.0)  # type: ignore[arg-type]
    assert tuple(fire_times) == expected.fire_times
    assert (await store.get(record.id)).next_fire_at > now


async def test_misfire_all__respects_the_maximum_lateness(sapp: App, store: ScheduleStore, database_url: str) -> None:
    record = await store.create(every_second(misfire="all", max_lateness_s=10))
    back_date(database_url, record.id, 60)
    leader = scheduler(sapp)
    assert await leader.renew_once()
    await leader.tick_once()
    runs = runs_of(database_url, record.id)
    now = runs[0][2]
    assert all(now - fire_at <= timedelta(seconds=10) for fire_at, _, _ in runs)
    assert len([r for r in runs if r[2] == now]) in (10, 11)


async def test_tick__a_broken_schedule_does_not_stop_the_others(
    sapp: App, store: ScheduleStore, database_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    broken = await store.create(ScheduleDefinition("broken", "not_registered", Timing(interval_s=1)))
    healthy = await store.create(every_second("healthy"))
    back_date(database_url, broken.id, 2)
    back_date(database_url, healthy.id, 1)
    leader = scheduler(sapp)
    assert await leader.renew_once()
    with caplog.at_level(logging.ERROR, "conveyor.scheduler"):
        _, failures = await leader.tick_once()
        await leader.tick_once()
    assert failures == 1 and runs_of(database_url, broken.id) == [] and runs_of(database_url, healthy.id)
    logged = [r for r in caplog.records if "could not fire" in r.getMessage()]
    assert len(logged) == 1 and "not_registered" in logged[0].getMessage()  # once, not every tick
    assert (await store.get(broken.id)).next_fire_at < datetime.now(UTC)  # still due, retried later


# -- the service end to end ------------------------------------------------------------------------


async def test_service__survives_its_connections_dying(sapp: App, store: ScheduleStore, database_url: str) -> None:
    record = await store.create(every_second())
    leader = scheduler(sapp)
    async with running(leader):
        await wait_for(lambda: _true(len(runs_of(database_url, record.id)) >= 2), timeout_s=30)
        for _ in range(20):  # over a second, so that some kills land inside a tick or a renewal
            sql(
                database_url,
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE datname = current_database() AND pid <> pg_backend_pid()",
            )
            await asyncio.sleep(0.05)
        count = len(runs_of(database_url, record.id))
        await wait_for(lambda: _true(len(runs_of(database_url, record.id)) >= count + 2), timeout_s=30)
    fire_times = [r[0] for r in runs_of(database_url, record.id)]
    assert fire_times == [fire_times[0] + timedelta(seconds=s) for s in range(len(fire_times))]  # no gap, no double
    assert sql(database_url, "SELECT expires_at <= now() FROM conveyor_leases")[0][0]  # released on stop


async def test_service__sleeps_until_the_next_fire_time_not_a_whole_tick(database_url: str) -> None:
    # With a 2-second tick, waking on the tick alone would start runs a second late on average.
    app = App(settings=make_settings(database_url, scheduler__tick_interval_s=2.0, scheduler__leader_lease_s=6.0))
    app.task(name="beat")(lambda: None)
    try:
        record = await ScheduleStore(app.runtime().engine).create(every_second())
        async with running(scheduler(app)):
            await wait_for(lambda: _true(len(runs_of(database_url, record.id)) >= 6), timeout_s=30)
        lateness = sorted(
            (enqueued - fire_at).total_seconds() for fire_at, _, enqueued in runs_of(database_url, record.id)
        )
        # Waking on the tick after each fire (the only schedule's next time was not counted) made every
        # other run a second late; one late run is allowed for a loaded machine.
        assert sum(late >= 0.5 for late in lateness) <= 1, lateness
    finally:
        await app.aclose()
        app.close()


async def test_service__two_schedulers_one_leader_no_double(sapp: App, store: ScheduleStore, database_url: str) -> None:
    record = await store.create(every_second())
    first, second = scheduler(sapp), scheduler(sapp)
    async with running(first, second):
        await wait_for(lambda: _true(len(runs_of(database_url, record.id)) >= 3))
        assert not (first.leading and second.leading)
    fire_times = [r[0] for r in runs_of(database_url, record.id)]
    assert fire_times == [fire_times[0] + timedelta(seconds=s) for s in range(len(fire_times))]
    assert task_count(database_url) == len(fire_times)


async def test_health__reports_clock_skew_and_logs_it(sapp: App, caplog: pytest.LogCaptureFixture) -> None:
    skewed = scheduler(sapp, wall_clock=lambda: time.time() + 30)
    with caplog.at_level(logging.WARNING, "conveyor.scheduler"):
        await skewed.renew_once()
        await skewed.renew_once()
    health = skewed.health()
    assert not health.skew_ok and health.skew_s is not None and -31 < health.skew_s < -29
    assert health.leading and health.database_ok and health.fencing_token == 1
    warnings = [r for r in caplog.records if "clock skew" in r.getMessage()]
    assert len(warnings) == 1  # said once, not on every renewal
    honest = scheduler(sapp)
    await honest.renew_once()
    assert honest.health().skew_ok and abs(honest.health().skew_s or 0) < 1


def process_rows(url: str) -> dict[str, tuple[Any, ...]]:
    """Scheduler process rows by id: (host, pid, is_leader, fencing_token, clock_skew_s, warning)."""
    rows = sql(
        url,
        "SELECT id, host, pid, is_leader, fencing_token, clock_skew_s, warning FROM conveyor_scheduler_processes",
    )
    return {r[0]: r[1:] for r in rows}


def back_date_seen(url: str, holder: str, seconds: float) -> None:
    """Time travel: the process last reported ``seconds`` ago (as if it went silent then)."""
    sql(
        url,
        "UPDATE conveyor_scheduler_processes SET last_seen_at = now() - make_interval(secs => %s) WHERE id = %s",
        seconds,
        holder,
    )


async def test_health__skew_is_written_to_the_process_row_for_other_processes_to_see(
    sapp: App, database_url: str
) -> None:
    offset_s = [30.0]
    skewed = scheduler(sapp, wall_clock=lambda: time.time() + offset_s[0])
    honest = scheduler(sapp)
    for process in (skewed, honest):
        await process.renew_once()
        assert await process.report_presence()
    rows = process_rows(database_url)
    assert set(rows) == {skewed.holder, honest.holder}
    host, pid, is_leader, token, skew_s, warning = rows[skewed.holder]
    assert (host, pid, is_leader, token) == (socket.gethostname(), os.getpid(), True, 1)
    assert -31 < skew_s < -29
    assert re.fullmatch(rf"clock skew: the clock of host {re.escape(host)} is \+(29|30)\.\d{{3}} s off .*", warning)
    assert "(limit 2 s)" in warning and "fix NTP" in warning
    assert skewed.health().clock_warning == warning
    assert rows[honest.holder][2:4] == (False, None) and abs(rows[honest.holder][4]) < 1
    assert rows[honest.holder][5] is None
    overview = await SchedulerProcessStore(sapp.runtime().engine).overview()
    assert overview.status == "degraded" and overview.lease is not None and overview.lease.holder == skewed.holder
    assert [p for p in overview.problems if skewed.holder in p and "clock skew" in p]
    assert not [p for p in overview.problems if honest.holder in p]

    offset_s[0] = 0.0  # NTP fixed the host: the next cycle clears the warning
    await skewed.renew_once()
    assert await skewed.report_presence()
    assert process_rows(database_url)[skewed.holder][5] is None
    assert (await SchedulerProcessStore(sapp.runtime().engine).overview()).status == "ok"


async def test_health__a_running_scheduler_refreshes_its_row_and_deletes_it_on_stop(
    sapp: App, database_url: str
) -> None:
    process = scheduler(sapp)

    def seen() -> list[tuple[Any, ...]]:
        return sql(database_url, "SELECT last_seen_at FROM conveyor_scheduler_processes WHERE id = %s", process.holder)

    async with running(process):
        await wait_for(lambda: _true(seen()))
        first = seen()[0][0]
        await wait_for(lambda: _true(seen()[0][0] > first))  # refreshed every lease cycle
        assert process_rows(database_url)[process.holder][2:4] == (True, 1)
    assert process_rows(database_url) == {}


async def test_health__a_silent_scheduler_is_stale_and_the_leader_prunes_it_after_the_retention(
    sapp: App, database_url: str
) -> None:
    # `silent` led, then stopped reporting without stopping (as after SIGKILL): its row stays behind.
    silent, leader = scheduler(sapp), scheduler(sapp)
    assert await silent.renew_once() and await silent.report_presence()
    expire_lease(database_url)
    assert await leader.renew_once() and await leader.report_presence()
    store = SchedulerProcessStore(sapp.runtime().engine)
    fresh = await store.overview()
    assert [p.stale for p in fresh.processes] == [False, False] and fresh.status == "ok"

    back_date_seen(database_url, silent.holder, 2 * leader.lease_s + 1)  # stale after two leases
    overview = await store.overview()
    by_id = {p.id: p for p in overview.processes}
    assert by_id[silent.holder].stale and by_id[silent.holder].leading  # its last word: it believed it led
    assert not by_id[leader.holder].stale and by_id[leader.holder].leading
    assert overview.lease is not None and overview.lease.holder == leader.holder and not overview.leader_expired
    assert overview.status == "degraded"
    assert [p for p in overview.problems if silent.holder in p and "has not reported" in p]

    assert await leader.prune_once() is not None
    assert set(process_rows(database_url)) == {silent.holder, leader.holder}  # stale, but still within retention
    back_date_seen(database_url, silent.holder, sapp.settings.scheduler.stale_retention_s + 1)
    assert await leader.prune_once() is not None
    assert set(process_rows(database_url)) == {leader.holder}
    assert (await store.overview()).status == "ok"


# -- retention of runs -----------------------------------------------------------------------------


def add_runs(url: str, schedule_id: int, *ages: timedelta, relative_to: str = "now()") -> list[datetime]:
    """Runs of the schedule fired ``ages`` before ``relative_to`` (an SQL expression); their fire times."""
    rows = sql(
        url,
        f"INSERT INTO conveyor_schedule_runs (schedule_id, fire_at, kind) "
        f"SELECT %s, date_trunc('second', {relative_to}) - age, 'schedule' FROM unnest(%s::interval[]) AS age "
        "RETURNING fire_at",
        schedule_id,
        list(ages),
    )
    return sorted(r[0] for r in rows)


def fire_times_of(url: str, schedule_id: int) -> list[datetime]:
    return [r[0] for r in runs_of(url, schedule_id)]


async def test_retention__deletes_old_runs_beyond_the_newest_kept_and_none_near_the_cursor(
    sapp: App, store: ScheduleStore, database_url: str
) -> None:
    day, minute = timedelta(days=1), timedelta(minutes=1)
    busy = await store.create(every_second("busy"))
    old = add_runs(database_url, busy.id, *(10 * day + s * timedelta(seconds=1) for s in range(10)))
    recent = add_runs(database_url, busy.id, 5 * minute, 2 * minute)
    rare = await store.create(ScheduleDefinition("rare", "beat", Timing(cron="0 0 1 * *")))
    rare_runs = add_runs(database_url, rare.id, 90 * day, 60 * day, 30 * day)  # old, but only as many as kept
    # Paused ten days ago: its cursor is as old as its runs. Those within the margin of it stay, whatever
    # their age and however many they are; older ones go.
    paused = await store.pause((await store.create(every_second("paused"))).id)
    cursor = back_date(database_url, paused.id, 10 * 86400)
    near = add_runs(
        database_url, paused.id, *(m * 10 * minute for m in range(1, 6)), relative_to=f"'{cursor}'::timestamptz"
    )
    far = add_runs(database_url, paused.id, 2 * 60 * minute, 3 * 60 * minute, relative_to=f"'{cursor}'::timestamptz")
    assert all(cursor - f < timedelta(seconds=CURSOR_MARGIN_S) for f in near)
    assert all(cursor - f > timedelta(seconds=CURSOR_MARGIN_S) for f in far)

    keep_three = sapp.settings.scheduler.model_copy(update={"run_keep_newest": 3})
    standby, leader = scheduler(sapp, settings=keep_three), scheduler(sapp, settings=keep_three)
    assert await leader.renew_once() and not await standby.renew_once()
    assert await standby.prune_once() is None  # only the leader prunes
    assert len(fire_times_of(database_url, busy.id)) == 12

    report = await leader.prune_once()
    assert report is not None and (report.deleted, report.more) == (9 + 2, False)
    assert fire_times_of(database_url, busy.id) == [old[-1], *recent]  # the newest three
    assert fire_times_of(database_url, rare.id) == rare_runs
    assert fire_times_of(database_url, paused.id) == near  # the far ones went: old, not kept, out of the margin
    report = await leader.prune_once()
    assert report is not None and report.deleted == 0  # nothing more to do
    assert sql(database_url, "SELECT count(*) FROM conveyor_schedule_runs")[0][0] == 3 + 3 + 5


async def test_retention__works_in_batches_within_its_budget_and_resumes(
    sapp: App, store: ScheduleStore, database_url: str
) -> None:
    busy = await store.create(every_second("busy"))
    add_runs(database_url, busy.id, *(timedelta(days=8, seconds=s) for s in range(25)))
    retention = ScheduleRunRetention(sapp.runtime().engine)
    week = sapp.settings.scheduler.run_retention_s
    calls = [0]

    def twice() -> bool:
        calls[0] += 1
        return calls[0] <= 2

    first = await retention.prune(week, keep_newest=0, batch=10, proceed=twice)
    assert (first.deleted, first.batches, first.more) == (20, 2, True)
    rest = await retention.prune(week, keep_newest=0, batch=10)
    assert (rest.deleted, rest.batches, rest.more) == (5, 1, False)
    assert runs_of(database_url, busy.id) == []


async def test_retention__a_pruned_fire_time_is_never_enqueued_again(
    sapp: App, store: ScheduleStore, database_url: str
) -> None:
    record = await store.create(ScheduleDefinition("minutely", "beat", Timing(interval_s=60), misfire="all"))
    back_date(database_url, record.id, 3 * 3600)
    hourly = sapp.settings.scheduler.model_copy(update={"run_retention_s": 3600.0, "run_keep_newest": 0})
    leader = scheduler(sapp, settings=hourly)
    assert await leader.renew_once()
    await leader.tick_once()
    fired = fire_times_of(database_url, record.id)
    assert len(fired) >= 180
    # The tasks are pruned too (finished long ago), so their idempotency keys no longer guard anything.
    sql(database_url, "DELETE FROM conveyor_tasks")

    report = await leader.prune_once()
    assert report is not None and report.deleted > 0
    pruned = [f for f in fired if f < report.cutoff]
    assert len(pruned) == report.deleted and fire_times_of(database_url, record.id) == fired[len(pruned) :]

    # Whatever moves the cursor lawfully, no pruned fire time comes back.
    cursor = (await store.get(record.id)).next_fire_at
    await leader.tick_once()
    await store.resume((await store.pause(record.id)).id)
    await leader.tick_once()
    await store.update(record.id, ScheduleDefinition("minutely", "beat", Timing(interval_s=30), misfire="all"))
    await leader.tick_once()
    refired = sql(database_url, "SELECT metadata->>'fire_at' FROM conveyor_tasks")
    assert all(datetime.fromisoformat(f) >= cursor for (f,) in refired), refired
    later = fire_times_of(database_url, record.id)
    assert not set(later) & set(pruned) and later[: len(fired) - len(pruned)] == fired[len(pruned) :]


# -- code schedules and operator actions -----------------------------------------------------------


def _code_app(database_url: str, **schedules: dict[str, Any]) -> App:
    app = App(settings=make_settings(database_url, **FAST))
    app.task(name="beat")(lambda n=0: n)
    for name, options in schedules.items():
        app.schedule(name, "beat", **options)
    return app


async def test_sync__inserts_updates_disables_and_never_touches_api_schedules(
    sapp: App, store: ScheduleStore, database_url: str
) -> None:
    api_owned = await store.create(ScheduleDefinition("shared", "beat", Timing(interval_s=60)))
    v1 = _code_app(
        database_url,
        nightly={"cron": "0 3 * * *", "timezone": "Europe/Berlin"},
        often={"interval": 5},
        shared={"interval": 1},
    )
    report = await store.sync(list(v1.schedules))
    assert sorted(report.created) == ["nightly", "often"] and report.conflicts == ["shared"]
    assert (await store.get("shared")) == api_owned  # untouched
    often = await store.get("often")
    assert often.source == "code" and often.enabled and often.next_fire_at > datetime.now(UTC) - timedelta(seconds=5)

    await store.pause(often.id)
    v2 = _code_app(database_url, nightly={"cron": "0 4 * * *", "timezone": "Europe/Berlin", "args": [1]})
    report = await store.sync(list(v2.schedules))
    assert report.updated == ["nightly"] and report.disabled == [] and report.created == []
    nightly = await store.get("nightly")
    assert nightly.definition.timing.cron == "0 4 * * *" and nightly.definition.args == (1,)
    often = await store.get("often")
    assert not often.enabled and often.disabled_reason == "paused"  # the operator's pause holds

    v3 = _code_app(database_url, often={"interval": 5})
    report = await store.sync(list(v3.schedules))
    assert report.disabled == ["nightly"] and report.reenabled == []
    nightly = await store.get("nightly")
    assert not nightly.enabled and nightly.disabled_reason == "removed"
    assert not (await store.get("often")).enabled  # still paused

    report = await store.sync(list(v2.schedules))
    assert report.reenabled == ["nightly"] and (await store.get("nightly")).enabled
    assert (await store.sync(list(v2.schedules))).updated == []  # idempotent


async def test_scheduler_start__syncs_the_apps_code_schedules(database_url: str) -> None:
    app = _code_app(database_url, heartbeat={"interval": 1, "misfire": "skip"})
    try:
        leader = Scheduler(app)
        async with running(leader):
            await wait_for(lambda: _true(sql(database_url, "SELECT count(*) FROM conveyor_schedule_runs")[0][0] >= 1))
        assert sql(database_url, "SELECT name, source FROM conveyor_schedules") == [("heartbeat", "code")]
    finally:
        await app.aclose()
        app.close()


async def test_pause_resume__no_catch_up_for_the_paused_time(
    sapp: App, store: ScheduleStore, database_url: str
) -> None:
    record = await store.create(every_second())
    paused = await store.pause(record.id)
    assert not paused.enabled and paused.disabled_reason == "paused"
    back_date(database_url, record.id, 30)
    leader = scheduler(sapp)
    assert await leader.renew_once()
    await leader.tick_once()
    assert runs_of(database_url, record.id) == []  # a paused schedule is never due
    resumed = await store.resume(record.id)
    assert resumed.enabled and resumed.next_fire_at > datetime.now(UTC) - timedelta(seconds=1)
    assert (await store.resume(record.id)) == resumed  # resuming twice changes nothing


async def test_trigger__enqueues_one_manual_run_now_without_a_leader(
    sapp: App, store: ScheduleStore, database_url: str
) -> None:
    record = await store.create(every_second(args=(42,)))
    run = await store.trigger(record.id, lambda schedule, at: build_run_request(sapp, schedule, at))
    assert run.kind == "manual" and run.task_id is not None
    task = sql(database_url, "SELECT name, args, state, idempotency_key FROM conveyor_tasks WHERE id = %s", run.task_id)
    assert task == [("beat", [42], "queued", run_key(record.id, run.fire_at))]
    listed = await store.runs(record.id)
    assert [(r.kind, r.task_id, r.task_state) for r in listed] == [("manual", run.task_id, "queued")]


async def test_trigger__is_not_held_up_by_a_tick_in_flight(
    sapp: App, store: ScheduleStore, database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    record = await store.create(every_second())
    back_date(database_url, record.id, 2)
    leader = scheduler(sapp, settings=patient(sapp))
    assert await leader.renew_once()
    inside, release = hold_enqueues(monkeypatch)
    tick = asyncio.create_task(leader.tick_once())
    await asyncio.wait_for(inside.wait(), 10)  # the tick holds the schedule's row and its claimed runs
    try:
        run = await asyncio.wait_for(
            store.trigger(record.id, lambda schedule, at: build_run_request(sapp, schedule, at)), 5
        )
    finally:
        release.set()
        await asyncio.wait_for(tick, 10)
    runs = run_rows(database_url, record.id)
    manual = [r for r in runs if r[4] == "manual"]
    assert [(r[1], r[2]) for r in manual] == [(run.fire_at, run.task_id)]
    assert len(runs) >= 4 and all(r[2] is not None for r in runs)
    assert set(tasks_per_fire_time(database_url).values()) == {1} and task_count(database_url) == len(runs)


async def test_store__api_rules_for_code_schedules_names_and_missing_ones(
    sapp: App, store: ScheduleStore, database_url: str
) -> None:
    await store.sync(list(_code_app(database_url, coded={"interval": 5}).schedules))
    coded = await store.get("coded")
    with pytest.raises(ScheduleConflict, match="declared in code"):
        await store.update(coded.id, ScheduleDefinition("coded", "beat", Timing(interval_s=9)))
    with pytest.raises(ScheduleConflict, match="declared in code"):
        await store.delete(coded.id)
    api = await store.create(every_second("api"))
    with pytest.raises(ScheduleConflict, match="already exists"):
        await store.create(every_second("api"))
    with pytest.raises(ScheduleConflict, match="already exists"):
        await store.update(api.id, every_second("coded"))
    updated = await store.update(api.id, ScheduleDefinition("api", "beat", Timing(cron="*/5 * * * * *")))
    assert updated.definition.timing.cron == "*/5 * * * * *" and updated.next_fire_at.second % 5 == 0
    await store.delete(api.id)
    for action in (store.get, store.pause, store.resume, store.delete, store.runs):
        with pytest.raises(ScheduleNotFound):
            await action(api.id)
    await store.sync([])  # removed from the code: now it may be deleted
    await store.delete(coded.id)
    assert await store.list_all() == []
