"""The worker: claims tasks in batches under leases, runs them, keeps the leases alive, rescues what
dead workers left behind, and shuts down without losing anything.

Side loops (listener, heartbeat, rescuer, acks, limits) each log and carry on after an error; if one of
them dies anyway the supervisor in :meth:`Worker.run` stops the worker rather than run on half-blind.

Queues with a concurrency or rate limit are claimed apart, by a claim that enforces the limit across
all workers (:mod:`conveyor.db.limit_sql`); :mod:`conveyor.core.queue_limits` keeps which queues those
are and when each is worth asking again.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import signal
import socket
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass

from conveyor.app import App
from conveyor.config import WorkerSettings
from conveyor.core.context import TaskContext
from conveyor.core.queue_limits import LimitGates
from conveyor.core.records import ClaimedTask
from conveyor.core.states import TaskState
from conveyor.errors import DatabaseError
from conveyor.worker.acks import AckBuffer
from conveyor.worker.debug import answer_debug_requests
from conveyor.worker.executor import Execution, Executor
from conveyor.worker.listener import Listener
from conveyor.worker.process_pool import ProcessPool

log = logging.getLogger("conveyor.worker")

#: Longest time between re-reads of which queues have limits: a limit set over the API (or removed)
#: reaches every worker within about this long.
LIMITS_REFRESH_S = 1.0


@dataclass
class _Lease:
    token: str
    renewed_at: float  # monotonic time the last successful renewal was *sent*
    queue: str


class Worker:
    def __init__(
        self,
        app: App,
        *,
        queues: Sequence[str] | None = None,
        concurrency: int | None = None,
        name: str | None = None,
        settings: WorkerSettings | None = None,
        burst: bool = False,
        app_ref: str | None = None,
    ) -> None:
        self.app = app
        self.settings = settings or app.settings.worker
        self.queues = list(queues or self.settings.queues)
        self.concurrency = concurrency or self.settings.concurrency
        # Never claim more than there are free slots: a claimed task waiting locally holds a lease
        # another worker could have used.
        self.batch_size = min(self.settings.claim_batch_size, self.concurrency)
        self.id = str(uuid.uuid4())
        self.name = name or self.settings.name or f"{socket.gethostname()}:{os.getpid()}"
        self.burst = burst
        self.app_ref = app_ref or self.settings.app
        self.lease_s = self.settings.lease_timeout_s
        self.gates = LimitGates(self.queues)

        self.executions: dict[int, Execution] = {}
        self.leases: dict[int, _Lease] = {}
        self.stopping = False
        self.paused = False
        self.executed = 0
        self.failure: BaseException | None = None
        self._wakeup = asyncio.Event()
        self._slot_freed = asyncio.Event()
        self._stop = asyncio.Event()
        self._abort = asyncio.Event()

    # -- control ---------------------------------------------------------------------------------

    def wake(self) -> None:
        self._wakeup.set()

    def request_stop(self, *, abort: bool = False) -> None:
        """Stop claiming now; finish in-flight tasks within the grace period (``abort``: don't wait)."""
        if self._stop.is_set() and not abort:
            abort = True  # a second signal means "now"
        self.stopping = True
        self._stop.set()
        self._wakeup.set()
        if abort:
            self._abort.set()

    def install_signal_handlers(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._on_signal, sig)

    def _on_signal(self, sig: int) -> None:
        log.info(
            "worker %s received %s: %s",
            self.name,
            signal.Signals(sig).name,
            "aborting in-flight tasks" if self._stop.is_set() else "stopping gracefully",
        )
        self.request_stop()

    # -- main ------------------------------------------------------------------------------------

    async def run(self) -> None:
        runtime = self.app.runtime()
        self.store = runtime.tasks
        self.acks = AckBuffer(runtime.tasks)
        pool = await self._start_process_pool()
        self.executor = Executor(
            self.app.registry,
            concurrency=self.concurrency,
            payload_limit_bytes=self.app.settings.payload_limit_bytes,
            traceback_limit_bytes=self.app.settings.traceback_limit_bytes,
            process_pool=pool,
        )
        await runtime.workers.register(
            worker_id=self.id,
            name=self.name,
            host=socket.gethostname(),
            pid=os.getpid(),
            queues=self.queues,
            concurrency=self.concurrency,
            task_names=self.app.registry.names(),
            metadata={"burst": self.burst},
        )
        self.listener = Listener(self.app.database_url, self.queues, self.wake)
        side = {
            asyncio.create_task(self.listener.run(), name="listener"),
            asyncio.create_task(self._heartbeat_loop(), name="heartbeat"),
            asyncio.create_task(self._rescue_loop(), name="rescuer"),
            asyncio.create_task(self.acks.run(), name="acks"),
            asyncio.create_task(self._limits_loop(), name="limits"),
        }
        log.info(
            "worker %s (%s) started on queues %s, concurrency %d", self.name, self.id, self.queues, self.concurrency
        )
        main = asyncio.create_task(self._claim_loop(), name="claimer")
        try:
            done, _ = await asyncio.wait({main, *side}, return_when=asyncio.FIRST_COMPLETED)
            for finished in done:
                if finished is not main and not finished.cancelled() and finished.exception() is not None:
                    log.error("worker side loop %s died: %r; stopping", finished.get_name(), finished.exception())
                    self.failure = finished.exception()
                    self.request_stop(abort=True)
            if main not in done:
                await main
            else:
                main.result()
        finally:
            await self._shutdown(side, pool)
        if self.failure is not None:
            # Exit non-zero so a supervisor restarts this worker instead of taking it as finished.
            raise RuntimeError("a worker side loop died") from self.failure

    async def _start_process_pool(self) -> ProcessPool | None:
        if not any(d.executor == "process" for d in self.app.registry):
            return None
        if self.app_ref is None:
            log.warning("tasks with executor='process' need the worker started with --app; they will fail")
            return None
        pool = ProcessPool(
            self.app_ref,
            self.settings.pool_size,
            traceback_limit_bytes=self.app.settings.traceback_limit_bytes,
        )
        await pool.start()
        return pool

    async def _claim_loop(self) -> None:
        poll_s = self.settings.poll_interval_s
        # With a backlog, claiming each time one slot frees would cost a round trip per task; refill in
        # chunks instead. Without one (the last claim came back short), claim at once: that is latency.
        refill = max(1, self.batch_size // 4)
        backlog = False
        while not self.stopping:
            free = self.concurrency - len(self.executions)
            if free <= 0 or self.paused or (backlog and free < refill):
                self._slot_freed.clear()
                await _wait_any(self._slot_freed, self._stop, timeout_s=poll_s)
                if self.concurrency - len(self.executions) == free:
                    backlog = False  # nothing finished for a whole poll interval: take what we can
                continue
            self._wakeup.clear()
            want = min(free, self.batch_size)
            try:
                claimed = await self._claim(want)
            except DatabaseError as exc:
                log.warning("claim failed (%s); retrying in %.2f s", exc, poll_s)
                await _wait_any(self._stop, timeout_s=poll_s)
                continue
            if claimed is None:
                # Every queue is held back by its limits: nothing to ask the database until the first
                # is due again (or one of our own tasks frees a concurrency slot, which wakes us).
                await _wait_any(self._wakeup, self._stop, timeout_s=self._limits_wait_s(poll_s))
                continue
            for task in claimed:
                self._start(task)
            backlog = len(claimed) == want
            if backlog:
                continue  # there may be more waiting
            if self.burst and not claimed and not self.executions and not self.leases and not self.gates.holding_back:
                # (`leases` also holds outcomes still being written: one may release workflow steps.)
                due_in = await self.store.next_due_in_s(self.queues)
                if due_in is None or due_in > poll_s:
                    log.info("burst worker %s: queues drained, exiting", self.name)
                    return
            if self._wakeup.is_set():
                continue  # notified while claiming: what woke us may have committed after that claim began
            wait_s = self._limits_wait_s(poll_s)
            if not claimed:
                due_in = await self.store.next_due_in_s(self.queues)
                if due_in is not None:
                    wait_s = min(wait_s, due_in + 0.001)
            await _wait_any(self._wakeup, self._stop, timeout_s=wait_s)
        # Stopping: nothing more is claimed; _shutdown handles what is in flight.

    async def _claim(self, want: int) -> list[ClaimedTask] | None:
        """Claim up to ``want`` tasks: queues with limits through the serialised claim that enforces
        them, the others through the plain one. None if every queue is held back by its limits."""
        if not self.gates.loaded:
            # Until the limits are known, any queue might have one: claiming it as unlimited could
            # break it.
            self.gates.update(await self.store.queue_limits(self.queues))
        unlimited, limited = self.gates.claimable(time.monotonic())
        if not limited and not unlimited:
            return None
        if not self._may_claim():
            return []
        if not limited:
            return await self.store.claim(self.id, unlimited, want, self.lease_s)
        # Limited queues first: what they may take is bounded by their limits, so they cannot starve
        # the others, while the others' backlog could starve them.
        result = await self.store.claim_limited(self.id, limited, want, self.lease_s)
        # Timed from the answer, not the question: "next token in" was measured on the database
        # during the round trip, and counting from before it would come back early for nothing.
        self.gates.after_claim(result.gates, time.monotonic(), recheck_s=self.settings.poll_interval_s)
        claimed = result.tasks
        if unlimited and len(claimed) < want and self._may_claim():
            try:
                claimed = claimed + await self.store.claim(self.id, unlimited, want - len(claimed), self.lease_s)
            except DatabaseError as exc:
                if not claimed:
                    raise
                # The limited claim is committed: those tasks are ours and must run, not wait out
                # their leases (that would count as a lost worker). The rest is claimed next round.
                log.warning("claim failed (%s) after claiming %d limited tasks; running those", exc, len(claimed))
        return claimed

    def _may_claim(self) -> bool:
        """Checked again right before each claim statement: a pause or stop that arrived while this
        claim was under way (reading limits, or between its two statements) holds from that moment,
        so no task enqueued after the worker saw it is claimed."""
        return not self.paused and not self.stopping

    def _limits_wait_s(self, poll_s: float) -> float:
        ready_in = self.gates.ready_in_s(time.monotonic())
        return poll_s if ready_in is None else min(poll_s, ready_in)

    async def _limits_loop(self) -> None:
        interval = min(LIMITS_REFRESH_S, self.settings.poll_interval_s)
        while True:
            await asyncio.sleep(interval)
            await self.refresh_limits()

    async def refresh_limits(self) -> None:
        """Re-read which of our queues have limits (a claim on a limited queue also reports them)."""
        try:
            limits = await self.store.queue_limits(self.queues)
        except DatabaseError as exc:
            log.warning("could not read queue limits (%s); keeping the last known", exc)
            return
        self.gates.update(limits)

    def _start(self, claimed: ClaimedTask) -> None:
        context = TaskContext(
            id=claimed.id,
            name=claimed.name,
            queue=claimed.queue,
            attempt=claimed.attempt,
            max_attempts=claimed.max_attempts,
            worker_id=self.id,
        )
        execution = Execution(claimed, context)
        self.executions[claimed.id] = execution
        self.leases[claimed.id] = _Lease(claimed.lease_token, time.monotonic(), claimed.queue)
        execution.future = asyncio.create_task(self._execute(execution), name=f"task-{claimed.id}")

    async def _execute(self, execution: Execution) -> None:
        claimed = execution.claimed
        submitted = False
        try:
            outcome = await self.executor.run(execution)
            if outcome is not None:
                # The slot frees now; the lease stays held (and renewed) until the outcome is written.
                retry_later = outcome.state is TaskState.SCHEDULED
                self.acks.submit(outcome).add_done_callback(functools.partial(self._acked, claimed.id, retry_later))
                submitted = True
        except Exception:
            log.exception("internal error running task %s[%s]; its lease will expire", claimed.name, claimed.id)
        finally:
            self.executed += 1
            self.executions.pop(claimed.id, None)
            if not submitted and execution.cancel_reason != "shutdown":
                self.leases.pop(claimed.id, None)
            self._slot_freed.set()
            if self.burst:
                self._wakeup.set()  # it exits once nothing is left in flight

    def _acked(self, task_id: int, retry_later: bool, _: asyncio.Future[bool]) -> None:
        lease = self.leases.pop(task_id, None)
        # A finished task makes no new work appear by itself: what its written outcome releases (an
        # immediate retry, a workflow step) is announced by NOTIFY. Waking the claim loop for every
        # outcome cost an empty claim per task, and a notification that arrived during that claim waited
        # for it: that was the latency tail. The loop is woken for what no NOTIFY announces: a retry due
        # later (the loop must learn its due time, now that it is written), a free slot of a limited
        # queue (the database counts the task as not running only now), and a burst worker's last outcome.
        freed_limited_slot = lease is not None and self.gates.slot_freed(lease.queue)
        if retry_later or freed_limited_slot or self.burst:
            self._wakeup.set()

    # -- leases ----------------------------------------------------------------------------------

    async def _heartbeat_loop(self) -> None:
        interval = self.settings.heartbeat_interval_s
        while True:
            await asyncio.sleep(interval)
            await self.heartbeat()

    async def heartbeat(self) -> None:
        # Leases of finished attempts whose outcome is still being written are renewed too.
        held = {task_id: lease.token for task_id, lease in self.leases.items()}
        sent_at = time.monotonic()
        try:
            # A stalled database must not stall the lease check: give up well before leases run out.
            async with asyncio.timeout(self.lease_s / 2):
                renewal = await self.store.renew(
                    self.id, held, self.lease_s, "draining" if self.stopping else "running"
                )
        except (DatabaseError, TimeoutError) as exc:
            log.warning("heartbeat failed (%s)", exc)
            self._expire_overdue_leases()
            return
        for task_id in held:
            if task_id in renewal.renewed:
                lease = self.leases.get(task_id)
                if lease is not None:
                    lease.renewed_at = sent_at
            elif task_id not in renewal.held:
                self._cancel(task_id, "lease_lost")
        for task_id in renewal.cancel_requested:
            self._cancel(task_id, "cancel_requested")
        self.paused = renewal.worker_paused
        if renewal.drain_requested and not self.stopping:
            log.info("worker %s asked to drain: stopping after in-flight tasks", self.name)
            self.request_stop()
        # Stack dumps the API asked for (conveyor.worker.debug): bounded in time, never raises.
        await answer_debug_requests(self.store.hot, self.id, timeout_s=min(0.5, self.lease_s / 4))

    def _expire_overdue_leases(self) -> None:
        """Stop executions whose lease we could not renew in time: someone else may own them now."""
        now = time.monotonic()
        for task_id, lease in list(self.leases.items()):
            if now - lease.renewed_at >= self.lease_s and task_id in self.executions:
                log.warning("lease of task %s not renewed within %.1f s: stopping it", task_id, self.lease_s)
                self._cancel(task_id, "lease_lost")

    def _cancel(self, task_id: int, reason: str) -> None:
        execution = self.executions.get(task_id)
        if execution is None or execution.cancel_reason is not None:
            return
        claimed = execution.claimed
        log.info("stopping task %s[%s] attempt %s: %s", claimed.name, claimed.id, claimed.attempt, reason)
        execution.cancel_reason = reason
        execution.context.request_cancel()
        if execution.future is not None:
            execution.future.cancel()

    # -- recovery --------------------------------------------------------------------------------

    async def _rescue_loop(self) -> None:
        while True:
            await self.rescue_once()
            await asyncio.sleep(self.settings.rescue_interval_s)

    async def rescue_once(self) -> None:
        try:
            report = await self.store.rescue(self.settings.max_worker_losses)
            await self.store.promote_due()
        except DatabaseError as exc:
            log.warning("rescue pass failed (%s)", exc)
            return
        if report.requeued or report.dead or report.cancelled:
            log.warning(
                "rescued tasks from lost workers: requeued %s, dead %s, cancelled %s",
                report.requeued,
                report.dead,
                report.cancelled,
            )
            self.wake()

    # -- shutdown --------------------------------------------------------------------------------

    async def _shutdown(self, side: set[asyncio.Task[None]], pool: ProcessPool | None) -> None:
        self.stopping = True
        grace_s = self.settings.shutdown_grace_s
        pending = [e.future for e in self.executions.values() if e.future is not None]
        if pending:
            log.info("waiting up to %.1f s for %d in-flight tasks", grace_s, len(pending))
            loop = asyncio.get_running_loop()
            deadline = loop.time() + grace_s
            abort_wait = asyncio.create_task(self._abort.wait())
            while pending and not self._abort.is_set() and loop.time() < deadline:
                await asyncio.wait(
                    [*pending, abort_wait], timeout=deadline - loop.time(), return_when=asyncio.FIRST_COMPLETED
                )
                pending = [f for f in pending if not f.done()]
            abort_wait.cancel()
        leftovers = dict(self.executions)
        if leftovers:
            for task_id in leftovers:
                self._cancel(task_id, "shutdown")
            await asyncio.wait([e.future for e in leftovers.values() if e.future is not None], timeout=5)
            held = {tid: self.leases[tid].token for tid in leftovers if tid in self.leases}
            try:
                released = await self.store.release(held)
                log.info("released %d unfinished tasks back to their queues", len(released))
            except DatabaseError as exc:
                log.warning("could not release %d tasks (%s); their leases will expire", len(held), exc)
        try:
            await self.acks.flush()
        except DatabaseError as exc:
            log.warning("could not flush outcomes (%s); those tasks will be rescued", exc)
        # A cancellation can be lost inside a library's own wait_for (Python 3.11); never let that
        # hang the exit: cancel again for a bounded time, then leave whatever still runs behind.
        for _ in range(10):
            pending_side = [task for task in side if not task.done()]
            if not pending_side:
                break
            for task in pending_side:
                task.cancel()
            await asyncio.wait(pending_side, timeout=0.5)
        else:
            log.warning("side loops %s did not stop; exiting anyway", [t.get_name() for t in side if not t.done()])
        if pool is not None:
            await pool.close()
        self.executor.close()
        with contextlib.suppress(DatabaseError):
            await self.app.runtime().workers.mark_stopped(self.id)
        log.info("worker %s stopped after %d tasks", self.name, self.executed)


async def _wait_any(*events: asyncio.Event, timeout_s: float) -> None:
    waiters = [asyncio.create_task(e.wait()) for e in events]
    try:
        await asyncio.wait(waiters, timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in waiters:
            waiter.cancel()
