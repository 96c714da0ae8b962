from __future__ import annotations

from conveyor.app import App
from conveyor.core.states import TaskState
from conveyor.worker.worker import Worker


async def test_enqueue_run_result(aapp: App) -> None:
    @aapp.task(name="add")
    def add(a: int, b: int) -> int:
        return a + b

    @aapp.task(name="aadd")
    async def aadd(a: int, b: int) -> int:
        return a + b

    handles = [await add.enqueue_async(1, 2), await aadd.enqueue_async(3, 4)]
    worker = Worker(aapp, burst=True)
    await worker.run()
    assert [await h.result_async(timeout=5) for h in handles] == [3, 7]
    assert [await h.status_async() for h in handles] == [TaskState.SUCCEEDED] * 2
    kinds = [e.kind for e in await handles[0].events_async()]
    assert kinds == ["enqueued", "claimed", "succeeded"]
