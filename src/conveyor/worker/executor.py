"""Runs one claimed attempt and says how it ended: async on the loop, sync on a thread, or in a child
process. Timeouts, cancellation and the task context live here, not in the worker loop."""

from __future__ import annotations

import asyncio
import contextvars
import functools
import logging
import random
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from conveyor.core.context import TaskContext, reset_current_task, set_current_task
from conveyor.core.outcomes import ErrorInfo, next_after_failure
from conveyor.core.payload import encode
from conveyor.core.records import ClaimedTask, Outcome
from conveyor.core.retry import RetryPolicy
from conveyor.core.states import TaskState
from conveyor.core.task import TaskDefinition, TaskRegistry
from conveyor.errors import PayloadError, UnknownTask
from conveyor.worker.process_pool import ProcessPool, ProcessPoolError

log = logging.getLogger("conveyor.worker")

#: For attempts of a task this worker does not know: another worker (a newer deploy) may know it.
_UNKNOWN_TASK_POLICY = RetryPolicy()


class LeaseLost(Exception):
    """The worker no longer owns the attempt (rescued, or the lease could not be renewed)."""


@dataclass
class Execution:
    """One attempt in flight, as the worker tracks it."""

    claimed: ClaimedTask
    context: TaskContext
    future: asyncio.Task[Outcome | None] | None = None
    cancel_reason: str | None = None  # "cancel_requested" | "lease_lost" | "shutdown"


class Executor:
    def __init__(
        self,
        registry: TaskRegistry,
        *,
        concurrency: int,
        payload_limit_bytes: int,
        traceback_limit_bytes: int,
        process_pool: ProcessPool | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.registry = registry
        self.payload_limit_bytes = payload_limit_bytes
        self.traceback_limit_bytes = traceback_limit_bytes
        self.process_pool = process_pool
        self.rng = rng or random.Random()
        self.threads = ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="conveyor-task")
        #: Thread tasks that outlived their timeout: Python cannot stop a thread, so they run on.
        self.abandoned_threads = 0
        #: Threads running task code right now (abandoned ones included).
        self.busy_threads = 0

    async def run(self, execution: Execution) -> Outcome | None:
        """The attempt's outcome, or None when the lease was lost (nothing may be written then)."""
        claimed = execution.claimed
        try:
            definition = self.registry.get(claimed.name)
        except UnknownTask as exc:
            return self._failure(claimed, ErrorInfo.synthetic("conveyor.errors.UnknownTask", str(exc)), None)
        try:
            if definition.executor == "process":
                return await self._run_in_process(definition, execution)
            value = await self._run_here(definition, execution)
        except asyncio.CancelledError:
            # Cancelled by the worker: an operator's cancel, a lost lease, or shutdown past its grace.
            return self._after_cancel(execution)
        except TimeoutError:
            message = f"task exceeded its timeout of {claimed.timeout_s or definition.options.timeout_s} s"
            if execution.context.cancel_requested and execution.cancel_reason:
                return self._after_cancel(execution)
            return self._failure(claimed, ErrorInfo.synthetic("builtins.TimeoutError", message), definition)
        except Exception as exc:
            if execution.cancel_reason is not None:
                return self._after_cancel(execution)
            return self._failure(claimed, ErrorInfo.from_exception(exc, self.traceback_limit_bytes), definition)
        if execution.cancel_reason is not None:
            return self._after_cancel(execution)
        return self._success(claimed, value)

    async def _run_here(self, definition: TaskDefinition, execution: Execution) -> Any:
        claimed = execution.claimed
        timeout_s = claimed.timeout_s if claimed.timeout_s is not None else definition.options.timeout_s
        token = set_current_task(execution.context)
        try:
            if definition.is_async:
                if timeout_s is None:
                    return await definition.func(*claimed.args, **claimed.kwargs)
                async with asyncio.timeout(timeout_s):
                    return await definition.func(*claimed.args, **claimed.kwargs)
            call = functools.partial(contextvars.copy_context().run, definition.func, *claimed.args, **claimed.kwargs)
            future = asyncio.get_running_loop().run_in_executor(self.threads, call)
            self.busy_threads += 1
            future.add_done_callback(self._thread_done)
            try:
                return await asyncio.wait_for(asyncio.shield(future), timeout_s)
            except (TimeoutError, asyncio.CancelledError):
                # The thread cannot be stopped; tell it to stop and move on without it.
                execution.context.request_cancel()
                if not future.done():
                    self.abandoned_threads += 1
                    future.add_done_callback(self._thread_finished)
                    log.warning(
                        "thread task %s[%s] attempt %s still running after cancel/timeout; "
                        "use executor='process' for tasks that must be stoppable",
                        claimed.name,
                        claimed.id,
                        claimed.attempt,
                    )
                raise
        finally:
            reset_current_task(token)

    def _thread_finished(self, _: asyncio.Future[Any]) -> None:
        self.abandoned_threads -= 1

    def _thread_done(self, _: asyncio.Future[Any]) -> None:
        self.busy_threads -= 1

    async def _run_in_process(self, definition: TaskDefinition, execution: Execution) -> Outcome | None:
        claimed = execution.claimed
        if self.process_pool is None:
            error = ErrorInfo.synthetic(
                "conveyor.errors.ConfigError",
                "this worker has no process pool (start it with --app so children can import the tasks)",
            )
            return self._failure(claimed, error, definition)
        timeout_s = claimed.timeout_s if claimed.timeout_s is not None else definition.options.timeout_s
        context = {
            "id": claimed.id,
            "name": claimed.name,
            "queue": claimed.queue,
            "attempt": claimed.attempt,
            "max_attempts": claimed.max_attempts,
            "worker_id": execution.context.worker_id,
        }
        try:
            outcome = await self.process_pool.run(
                claimed.name, claimed.args, claimed.kwargs, context=context, timeout_s=timeout_s
            )
        except ProcessPoolError as exc:
            # No child could be started (the app no longer imports, say): a failed attempt, retried
            # with backoff, rather than a crashed worker.
            return self._failure(claimed, ErrorInfo.synthetic("conveyor.ProcessPoolError", str(exc)), definition)
        if outcome.ok:
            return self._success(claimed, outcome.result)
        if execution.cancel_reason is not None:
            return self._after_cancel(execution)
        error = ErrorInfo.from_dict(outcome.error or {"type": "conveyor.ProcessDied", "message": "child died"})
        return self._failure(claimed, error, definition)

    def _success(self, claimed: ClaimedTask, value: Any) -> Outcome:
        try:
            result_json = (
                "null" if value is None else encode(value, what="result", limit_bytes=self.payload_limit_bytes)
            )
        except PayloadError as exc:
            error = ErrorInfo.synthetic("conveyor.errors.PayloadError", str(exc), retryable=False)
            return self._failure(claimed, error, None)
        return Outcome(claimed.id, claimed.lease_token, TaskState.SUCCEEDED, result_json=result_json)

    def _failure(self, claimed: ClaimedTask, error: ErrorInfo, definition: TaskDefinition | None) -> Outcome:
        policy = definition.options.retry if definition is not None else _UNKNOWN_TASK_POLICY
        state, delay = next_after_failure(error, claimed.attempt, claimed.max_attempts, policy, self.rng)
        log.info(
            "task %s[%s] attempt %s/%s failed (%s: %s) -> %s%s",
            claimed.name,
            claimed.id,
            claimed.attempt,
            claimed.max_attempts,
            error.type,
            error.message[:200],
            state,
            f" in {delay:.3f} s" if delay is not None else "",
        )
        return Outcome(claimed.id, claimed.lease_token, state, error=error.to_json(claimed.attempt), delay_s=delay)

    def _after_cancel(self, execution: Execution) -> Outcome | None:
        claimed = execution.claimed
        if execution.cancel_reason == "cancel_requested":
            error = {"type": "conveyor.Cancelled", "message": "cancelled by request", "attempt": claimed.attempt}
            return Outcome(claimed.id, claimed.lease_token, TaskState.CANCELLED, error=error)
        # Lost lease: someone else owns the task now. Shutdown: the worker releases it itself.
        return None

    def close(self) -> None:
        self.threads.shutdown(wait=False, cancel_futures=True)
