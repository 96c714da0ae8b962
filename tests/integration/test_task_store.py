"""The store's guarantees, against a real PostgreSQL: claiming, fencing, recovery, uniqueness."""

from __future__ import annotations

import asyncio
import json
import uuid

import psycopg
import pytest
from sqlalchemy import create_engine, text

from conveyor.app import App
from conveyor.core.records import ClaimedTask, Outcome
from conveyor.core.states import TaskState
from conveyor.db.task_store import TaskStore
from conveyor.errors import IdempotencyConflict, InvalidTransition, PayloadError, TaskNotFound

WORKER = str(uuid.uuid4())


@pytest.fixture
async def store(aapp: App) -> TaskStore:
    @aapp.task(name="t")
    def t(*args: object, **kwargs: object) -> None:
        return None

    return aapp.store()


async def sql(app: App, statement: str, **params: object) -> list[dict[str, object]]:
    async with app.store().engine.begin() as conn:
        result = await conn.execute(text(statement), params)
        return [dict(r) for r in result.mappings()] if result.returns_rows else []


async def expire_leases(app: App) -> None:
    """Time travel: make every running lease look expired on the database clock."""
    await sql(app, "UPDATE conveyor_tasks SET lease_expires_at = now() - interval '1 second' WHERE state='running'")


async def test_enqueue__queued_with_history(aapp: App, store: TaskStore) -> None:
    handle = await aapp.enqueue_async("t", [1, "x"], {"k": [1, 2]}, priority=4)
    record = await store.get(handle.id)
    assert (record.state, record.args, record.kwargs, record.priority, record.attempt) == (
        TaskState.QUEUED,
        [1, "x"],
        {"k": [1, 2]},
        4,
        0,
    )
    assert [e.kind for e in await store.events(handle.id)] == ["enqueued"]


async def test_enqueue__delay_makes_it_scheduled_and_unclaimable_until_due(aapp: App, store: TaskStore) -> None:
    handle = await aapp.enqueue_async("t", delay=3600)
    assert (await store.get(handle.id)).state == TaskState.SCHEDULED
    assert await store.claim(WORKER, ["default"], 10, 30) == []
    await sql(aapp, "UPDATE conveyor_tasks SET run_at = now() - interval '1 second'")
    assert [c.id for c in await store.claim(WORKER, ["default"], 10, 30)] == [handle.id]


async def test_claim__highest_priority_then_oldest(aapp: App, store: TaskStore) -> None:
    low = await aapp.enqueue_async("t", priority=0)
    high_old = await aapp.enqueue_async("t", priority=5)
    high_new = await aapp.enqueue_async("t", priority=5)
    claimed = await store.claim(WORKER, ["default"], 3, 30)
    assert [c.id for c in claimed] == [high_old.id, high_new.id, low.id]
    assert all(c.attempt == 1 and c.lease_token for c in claimed)


async def test_claim__only_listed_queues_and_never_paused_ones(aapp: App, store: TaskStore) -> None:
    a = await aapp.enqueue_async("t", queue="a")
    b = await aapp.enqueue_async("t", queue="b")
    await sql(aapp, "INSERT INTO conveyor_queues (name, paused) VALUES ('b', true)")
    assert [c.id for c in await store.claim(WORKER, ["a", "b"], 10, 30)] == [a.id]
    await sql(aapp, "UPDATE conveyor_queues SET paused = false")
    assert [c.id for c in await store.claim(WORKER, ["b"], 10, 30)] == [b.id]


async def test_claim__concurrent_claimers_never_share_a_task(aapp: App, store: TaskStore) -> None:
    await aapp.enqueue_many_async([{"name": "t", "args": [i]} for i in range(300)])
    batches = await asyncio.gather(*(store.claim(str(uuid.uuid4()), ["default"], 25, 30) for _ in range(16)))
    ids = [c.id for batch in batches for c in batch]
    assert len(ids) == len(set(ids))
    assert len(ids) == 300


async def test_fencing__stale_attempt_cannot_complete_or_renew(aapp: App, store: TaskStore) -> None:
    handle = await aapp.enqueue_async("t")
    [first] = await store.claim(WORKER, ["default"], 1, 30)
    await expire_leases(aapp)
    report = await store.rescue(max_worker_losses=3)
    assert report.requeued == [handle.id]
    [second] = await store.claim(str(uuid.uuid4()), ["default"], 1, 30)
    assert (second.attempt, second.id) == (2, handle.id) and second.lease_token != first.lease_token

    stale = Outcome(handle.id, first.lease_token, TaskState.SUCCEEDED, result_json='"stale"')
    assert await store.finish([stale]) == set()
    renewal = await store.renew(WORKER, {handle.id: first.lease_token}, 30)
    assert handle.id not in renewal.renewed
    record = await store.get(handle.id)
    assert (record.state, record.result, record.attempt) == (TaskState.RUNNING, None, 2)

    fresh = Outcome(handle.id, second.lease_token, TaskState.SUCCEEDED, result_json='"fresh"')
    assert await store.finish([fresh]) == {handle.id}
    assert (await store.get(handle.id)).result == "fresh"
    # and a duplicate of the accepted outcome changes nothing either
    assert await store.finish([fresh]) == set()
    kinds = [e.kind for e in await store.events(handle.id)]
    assert kinds == ["enqueued", "claimed", "rescued", "claimed", "succeeded"]


async def test_rescue__exhausted_attempts_go_dead_and_poison_pills_stop(aapp: App, store: TaskStore) -> None:
    once = await aapp.enqueue_async("t", max_attempts=1)
    poison = await aapp.enqueue_async("t", max_attempts=100)
    for round_ in range(3):
        claimed = await store.claim(WORKER, ["default"], 10, 30)
        assert {c.id for c in claimed} == ({once.id, poison.id} if round_ == 0 else {poison.id})
        await expire_leases(aapp)
        await store.rescue(max_worker_losses=3)
    dead_once, dead_poison = await store.get(once.id), await store.get(poison.id)
    assert dead_once.state == TaskState.DEAD and dead_once.worker_losses == 1
    assert dead_poison.state == TaskState.DEAD and dead_poison.worker_losses == 3
    assert dead_poison.last_error is not None and "worker lost 3 times" in dead_poison.last_error["message"]


async def test_rescue__leaves_live_leases_alone_and_is_idempotent(aapp: App, store: TaskStore) -> None:
    await aapp.enqueue_many_async([{"name": "t"} for _ in range(5)])
    await store.claim(WORKER, ["default"], 5, 30)
    assert await store.rescue(3) == type(await store.rescue(3))()
    await expire_leases(aapp)
    reports = await asyncio.gather(store.rescue(3), store.rescue(3), store.rescue(3))
    assert sorted(i for r in reports for i in r.requeued) == sorted(
        r["id"] for r in await sql(aapp, "SELECT id FROM conveyor_tasks")
    )


async def test_cancel__at_rest_running_and_finished(aapp: App, store: TaskStore) -> None:
    waiting = await aapp.enqueue_async("t")
    assert (await store.cancel(waiting.id)).state == TaskState.CANCELLED

    running = await aapp.enqueue_async("t")
    [claimed] = await store.claim(WORKER, ["default"], 1, 30)
    record = await store.cancel(running.id)
    assert (record.state, record.cancel_requested) == (TaskState.RUNNING, True)
    renewal = await store.renew(WORKER, {claimed.id: claimed.lease_token}, 30)
    assert renewal.cancel_requested == {claimed.id}

    done = Outcome(claimed.id, claimed.lease_token, TaskState.SUCCEEDED, result_json="1")
    await store.finish([done])
    with pytest.raises(InvalidTransition, match="it is succeeded"):
        await store.cancel(running.id)
    assert (await store.get(running.id)).state == TaskState.SUCCEEDED
    with pytest.raises(TaskNotFound):
        await store.cancel(10**9)


async def test_retry__only_from_finished_states_and_adds_an_attempt(aapp: App, store: TaskStore) -> None:
    handle = await aapp.enqueue_async("t", max_attempts=1)
    with pytest.raises(InvalidTransition):
        await store.retry(handle.id)
    [claimed] = await store.claim(WORKER, ["default"], 1, 30)
    await store.finish([Outcome(claimed.id, claimed.lease_token, TaskState.DEAD, error={"type": "E"})])
    record = await store.retry(handle.id)
    assert (record.state, record.max_attempts) == (TaskState.QUEUED, 2)
    [again] = await store.claim(WORKER, ["default"], 1, 30)
    assert again.attempt == 2


async def test_idempotency__same_payload_same_task_other_payload_conflict(aapp: App, store: TaskStore) -> None:
    first = await aapp.enqueue_async("t", [1], idempotency_key="k1")
    again = await aapp.enqueue_async("t", [1], idempotency_key="k1")
    assert (again.id, first.created, again.created) == (first.id, True, False)
    with pytest.raises(IdempotencyConflict, match="k1"):
        await aapp.enqueue_async("t", [2], idempotency_key="k1")
    assert len(await sql(aapp, "SELECT id FROM conveyor_tasks")) == 1


async def test_unique__fifty_concurrent_enqueues_make_one_task(aapp: App, store: TaskStore) -> None:
    handles = await asyncio.gather(*(aapp.enqueue_async("t", [i], unique_key="report") for i in range(50)))
    assert len({h.id for h in handles}) == 1
    assert sum(h.created for h in handles) == 1
    # The key is free again once the holder finishes.
    [claimed] = await store.claim(WORKER, ["default"], 1, 30)
    await store.finish([Outcome(claimed.id, claimed.lease_token, TaskState.SUCCEEDED, result_json="null")])
    later = await aapp.enqueue_async("t", unique_key="report")
    assert later.created and later.id != handles[0].id


async def test_unique__holds_through_retry_wait(aapp: App, store: TaskStore) -> None:
    first = await aapp.enqueue_async("t", unique_key="u")
    [claimed] = await store.claim(WORKER, ["default"], 1, 30)
    await store.finish([Outcome(claimed.id, claimed.lease_token, TaskState.SCHEDULED, error={"type": "E"}, delay_s=60)])
    assert (await aapp.enqueue_async("t", unique_key="u")).id == first.id


async def test_payload_limit__rejected_before_anything_is_stored(database_url: str) -> None:
    from tests.conftest import make_settings

    app = App(settings=make_settings(database_url, payload_limit_bytes=1000), strict_names=False)
    try:
        with pytest.raises(PayloadError, match="over the limit of 1000 bytes"):
            await app.enqueue_async("t", ["x" * 2000])
        assert await sql(app, "SELECT id FROM conveyor_tasks") == []
    finally:
        await app.aclose()
        app.close()


def test_transactional_enqueue__sqlalchemy_rollback_leaves_nothing(app: App, database_url: str) -> None:
    @app.task(name="t")
    def t() -> None: ...

    engine = create_engine(database_url.replace("postgresql://", "postgresql+psycopg://"))
    try:
        with engine.connect() as conn:
            conn.begin()
            handle = t.enqueue(connection=conn)
            assert conn.execute(text("SELECT count(*) FROM conveyor_tasks")).scalar() == 1
            conn.rollback()
        with engine.connect() as conn:
            assert conn.execute(text("SELECT count(*) FROM conveyor_tasks")).scalar() == 0
        assert handle.id > 0
    finally:
        engine.dispose()


def test_transactional_enqueue__psycopg_invisible_until_commit_then_wakes(app: App, database_url: str) -> None:
    @app.task(name="t")
    def t() -> None: ...

    async def claim() -> list[ClaimedTask]:
        return await app.store().claim(WORKER, ["default"], 10, 30)

    with psycopg.connect(database_url, autocommit=True) as listener:
        listener.execute("LISTEN conveyor_wakeup")
        with psycopg.connect(database_url) as conn:
            handle = t.enqueue(connection=conn)
            claimed_early = app.run_sync(claim())
            assert claimed_early == []
            assert list(listener.notifies(timeout=0.3)) == []
            conn.commit()
        notes = list(listener.notifies(timeout=5, stop_after=1))
        assert [n.payload for n in notes] == ["default"]
    assert [c.id for c in app.run_sync(claim())] == [handle.id]


async def test_claim_plan__uses_the_partial_claim_index(aapp: App, store: TaskStore) -> None:
    await aapp.enqueue_many_async([{"name": "t", "queue": f"q{i % 10}"} for i in range(20_000)])
    await sql(aapp, "ANALYZE conveyor_tasks")
    async with store.engine.connect() as conn:
        from conveyor.db import task_sql

        result = await conn.exec_driver_sql(
            "EXPLAIN (FORMAT JSON) " + task_sql.CLAIM,
            {"queues": ["q1", "q2"], "limit": 10, "lease_s": 30.0, "worker_id": WORKER},
        )
        plan = json.dumps(result.scalar())
        await conn.rollback()
    assert "ix_conveyor_tasks_claim" in plan
    assert '"Node Type": "Seq Scan", "Parent Relationship": "Inner"' not in plan


async def test_bulk_enqueue__copy_path_round_trips_awkward_json(aapp: App, store: TaskStore) -> None:
    awkward = ["tab\there", "new\nline", "back\\slash \\N", 'quote"s', "ünïcødé ☃", "\\u0000 is fine"]
    awkward.append({"k\t": [1.5, None]})  # type: ignore[arg-type]
    handles = await aapp.enqueue_many_async(
        [{"name": "t", "args": [i, awkward], "kwargs": {"x\\y": "\\\\"}} for i in range(200)]
    )
    assert len({h.id for h in handles}) == 200
    for i in (0, 199):
        record = await store.get(handles[i].id)
        assert record.args == [i, awkward] and record.kwargs == {"x\\y": "\\\\"}
        assert record.state == TaskState.QUEUED


def test_bulk_enqueue__an_invalid_item_stores_nothing(app: App) -> None:
    @app.task(name="t")
    def t(*args: object) -> None: ...

    items: list[dict[str, object]] = [{"name": "t", "args": [i]} for i in range(12_000)]
    items.append({"name": "t", "args": [object()]})
    with pytest.raises(PayloadError):
        app.enqueue_many(items)
    assert app.enqueue_many([]) == []

    async def count() -> int:
        return len(await app.store().list(limit=100))

    assert app.run_sync(count()) == 0


def test_bulk_enqueue__keyed_items_among_copied_ones_keep_input_order(app: App) -> None:
    @app.task(name="t")
    def t(*args: object) -> None: ...

    existing = app.enqueue("t", [-1], idempotency_key="known")
    items: list[dict[str, object]] = [{"name": "t", "args": [i]} for i in range(6_000)]
    items[10] = {"name": "t", "args": [-1], "idempotency_key": "known"}  # same payload: the existing task
    items[5_500] = {"name": "t", "args": ["new"], "idempotency_key": "fresh"}
    handles = app.enqueue_many(items)

    assert len(handles) == 6_000
    assert handles[10].id == existing.id and not handles[10].created
    assert handles[5_500].created

    async def stored() -> dict[int, object]:
        records = await app.store().list(limit=10_000)
        return {r.id: r.args for r in records}

    args_by_id = app.run_sync(stored())
    assert len(args_by_id) == 6_000  # the existing task, 5,998 copied ones and "fresh"
    for i, handle in enumerate(handles):
        assert args_by_id[handle.id] == items[i]["args"]


def test_bulk_enqueue__a_refused_batch_raises_its_error_and_stores_nothing(app: App) -> None:
    @app.task(name="t")
    def t(*args: object) -> None: ...

    app.enqueue("t", ["first"], idempotency_key="taken")
    items: list[dict[str, object]] = [{"name": "t", "args": [i]} for i in range(12_000)]
    items[7_000] = {"name": "t", "args": ["other"], "idempotency_key": "taken"}  # refused by the writer
    with pytest.raises(IdempotencyConflict):
        app.enqueue_many(items)

    async def count() -> int:
        return len(await app.store().list(limit=100))

    assert app.run_sync(count()) == 1
