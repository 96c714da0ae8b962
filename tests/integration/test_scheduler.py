"""The scheduler in-process against a real PostgreSQL: leader election, fencing, misfires, sync, operator actions.

Time travel: a test moves a schedule's cursor (``next_fire_at``) or a lease's expiry into the past and
runs one explicit pass, instead of sleeping through the downtime it stands for.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import pytest

from conveyor.app import App
from conveyor.core.schedule import ScheduleDefinition, Timing, due_fire_times, run_key
from conveyor.core.schedule_records import ScheduleConflict, ScheduleNotFound
from conveyor.db.schedule_store import FENCE, LIMIT_TRANSACTION, ScheduleStore
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
            await wait_for(lambda: _true(len(runs_of(database_url, record.id)) >= 4), timeout_s=30)
        lateness = sorted(
            (enqueued - fire_at).total_seconds() for fire_at, _, enqueued in runs_of(database_url, record.id)
        )
        assert lateness[len(lateness) // 2] < 0.5, lateness
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
