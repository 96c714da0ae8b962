"""The ``executor="process"`` backend: long-lived child processes that can be killed mid-task.

A task stuck in C code (``time.sleep(1000)``, a hung driver call) cannot be interrupted from a
thread; killing its process can. Each child (:mod:`conveyor.worker.process_child`) imports the app
once and runs one task at a time, and talks to the worker over its own pipe pair carrying
newline-delimited JSON. Nothing is pickled, so ``multiprocessing`` and ``ProcessPoolExecutor`` are
not used.

A child is SIGKILLed and replaced in the background when its run times out or is cancelled, and
replaced when it dies on its own. Arguments are never logged: they may hold secrets.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import os
import signal
import subprocess
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from typing import IO, Any

from conveyor.errors import PayloadError
from conveyor.worker.process_child import encode_message, error_payload

logger = logging.getLogger("conveyor.worker.process_pool")

_CHILD_MODULE = "conveyor.worker.process_child"
_MAX_REPLY_BYTES = 512 * 1024 * 1024  # one reply line; anything bigger is a broken child, not a result
_REAP_TIMEOUT_S = 10.0  # after EOF, how long a child may take to exit before it is SIGKILLed
_IDLE_EXIT_GRACE_S = 2.0  # at close, how long an idle child gets to exit on EOF before SIGKILL
_MIN_TRACEBACK_LIMIT_BYTES = 256
_CONTEXT_KEYS = ("id", "name", "queue", "attempt", "max_attempts")


class ProcessPoolError(RuntimeError):
    """The pool could not provide a child: the app failed to import, a child would not start, or the pool is closed."""


class ChildDied(Exception):
    """A child process exited, was killed or broke the protocol before it replied."""


@dataclass(frozen=True)
class ProcessOutcome:
    """How one run ended.

    ``error`` has the keys ``type``, ``types``, ``message``, ``traceback``, ``retry_delay``,
    ``retry_requested`` and ``non_retryable`` (see :mod:`conveyor.worker.process_child`).
    """

    ok: bool
    result: Any = None
    error: dict[str, Any] | None = None
    timed_out: bool = False
    killed: bool = False  # the child died or was killed (timeout, cancel, crash)


class _PipeClosed(asyncio.BaseProtocol):
    """Write side of the request pipe: only needs to know when the transport has let go of the fd."""

    def __init__(self) -> None:
        self.closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.closed.done():
            self.closed.set_result(None)


class _ProtocolError(Exception):
    pass


class _Lines(asyncio.Protocol):
    """Read side of the reply pipe: splits the byte stream into lines; ``None`` marks end-of-file."""

    def __init__(self) -> None:
        self.closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._lines: asyncio.Queue[bytes | None] = asyncio.Queue()
        self._buffer = bytearray()
        self._finished = False
        self._overflowed = False
        self._transport: asyncio.BaseTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport

    def data_received(self, data: bytes) -> None:
        if self._finished:
            return
        scan_from = len(self._buffer)
        self._buffer += data
        newline = self._buffer.find(b"\n", scan_from)
        while newline >= 0:
            self._lines.put_nowait(bytes(self._buffer[:newline]))
            del self._buffer[: newline + 1]
            newline = self._buffer.find(b"\n")
        if len(self._buffer) > _MAX_REPLY_BYTES:
            self._overflowed = True
            self._buffer.clear()
            self._finish()
            if self._transport is not None:
                self._transport.close()

    def eof_received(self) -> None:
        self._finish()

    def connection_lost(self, exc: Exception | None) -> None:
        self._finish()
        if not self.closed.done():
            self.closed.set_result(None)

    def _finish(self) -> None:
        if not self._finished:
            self._finished = True
            self._lines.put_nowait(None)

    @property
    def at_eof(self) -> bool:
        return self._finished and self._lines.empty()

    async def read_message(self) -> dict[str, Any] | None:
        """The next message, or ``None`` once the child has closed its end (it exited)."""
        line = None if self.at_eof else await self._lines.get()
        if line is None:
            if self._overflowed:
                raise _ProtocolError(f"sent a reply over {_MAX_REPLY_BYTES} bytes")
            return None
        try:
            message = json.loads(line)
        except ValueError as exc:
            raise _ProtocolError(f"sent a line that is not JSON ({exc})") from None
        if not isinstance(message, dict):
            raise _ProtocolError("sent a JSON value that is not an object")
        return message


class _Child:
    """One child process and its two pipes. :meth:`stop` is idempotent and safe to await from many places."""

    def __init__(self, proc: asyncio.subprocess.Process, request_file: IO[bytes], reply_file: IO[bytes]) -> None:
        self.proc = proc
        self.pid = proc.pid
        self.kill_reason: str | None = None
        self.running: str | None = None  # "run N (task ...)", for log lines about this child
        self._request_file = request_file
        self._reply_file = reply_file
        self._requests: asyncio.WriteTransport | None = None
        self._request_protocol: _PipeClosed | None = None
        self._replies: asyncio.ReadTransport | None = None
        self.replies = _Lines()
        self._stop_task: asyncio.Task[int] | None = None

    async def connect(self) -> None:
        loop = asyncio.get_running_loop()
        self._request_protocol = _PipeClosed()
        request_protocol = self._request_protocol
        self._requests, _ = await loop.connect_write_pipe(lambda: request_protocol, self._request_file)
        self._replies, _ = await loop.connect_read_pipe(lambda: self.replies, self._reply_file)

    @property
    def exited(self) -> bool:
        return self.proc.returncode is not None or self.replies.at_eof

    def send(self, line: bytes) -> None:
        assert self._requests is not None, "connect() first"
        # The transport buffers what the pipe cannot take now; the loop never blocks on a write.
        self._requests.write(line)

    def kill(self, reason: str) -> None:
        if self.kill_reason is None:
            self.kill_reason = reason
        if self.proc.returncode is None:
            # os.kill rather than Process.kill: Popen.send_signal polls with waitpid, which can race
            # asyncio's child watcher for the exit status.
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)

    def stop(self, grace_s: float = 0.0) -> asyncio.Future[int]:
        """Close the request pipe (an idle child exits on EOF), SIGKILL after ``grace_s``, reap, close the pipes.

        Returns the exit code. Shielded: a cancelled caller does not leave a half-closed child behind.
        """
        if self._stop_task is None:
            self._stop_task = asyncio.create_task(self._stop(grace_s))
        return asyncio.shield(self._stop_task)

    async def _stop(self, grace_s: float) -> int:
        if self._requests is not None:
            self._requests.close()
        else:
            self._request_file.close()
        if self.proc.returncode is None:
            try:
                async with asyncio.timeout(grace_s):
                    await self.proc.wait()
            except TimeoutError:
                self.kill("it did not exit when asked")
        returncode = await self.proc.wait()
        if self._replies is not None:
            self._replies.close()
            await self.replies.closed
        else:
            self._reply_file.close()
        if self._request_protocol is not None and self._requests is not None:
            await self._request_protocol.closed
        return returncode


class _DeadSlot:
    """Stands in the idle queue for a child that could not be started, so a run fails clearly instead of waiting."""


class _Closed:
    """Put in the idle queue at close so runs still waiting for a child wake up and fail."""


_CLOSED = _Closed()


class ProcessPool:
    """A fixed number of child processes running ``executor="process"`` tasks, one task per child at a time.

    ``app_ref`` is ``"package.module:attribute"``; the attribute must have a ``.registry``
    (a :class:`conveyor.core.task.TaskRegistry`). ``env`` holds extra environment variables for the
    children, laid over the worker's own environment. ``traceback_limit_bytes`` caps the traceback
    of each error (its end is kept). ``start_timeout_s`` bounds how long a child may take to import
    the app and report ready.
    """

    def __init__(
        self,
        app_ref: str,
        size: int,
        *,
        traceback_limit_bytes: int = 16384,
        env: Mapping[str, str] | None = None,
        start_timeout_s: float = 30.0,
    ) -> None:
        if size < 1:
            raise ValueError(f"process pool size must be >= 1, got {size}")
        if traceback_limit_bytes < _MIN_TRACEBACK_LIMIT_BYTES:
            raise ValueError(f"traceback_limit_bytes must be >= {_MIN_TRACEBACK_LIMIT_BYTES}")
        if start_timeout_s <= 0:
            raise ValueError("start_timeout_s must be > 0 seconds")
        self._app_ref = app_ref
        self._size = size
        self._traceback_limit_bytes = traceback_limit_bytes
        self._env = None if env is None else {**os.environ, **env}
        self._start_timeout_s = start_timeout_s
        self._run_ids = itertools.count(1)
        self._idle: asyncio.Queue[_Child | _DeadSlot | _Closed] = asyncio.Queue()
        self._children: set[_Child] = set()  # every child not yet stopped: idle, busy or dying
        self._busy: set[_Child] = set()
        self._none_busy = asyncio.Event()
        self._none_busy.set()
        self._background: set[asyncio.Task[None]] = set()
        self._start_lock = asyncio.Lock()
        self._started = False
        self._closing = False
        self._close_task: asyncio.Task[None] | None = None

    @property
    def size(self) -> int:
        """How many children the pool keeps (and so how many tasks it runs at once)."""
        return self._size

    async def start(self) -> None:
        """Start ``size`` children and wait until each has imported the app.

        Raises :class:`ProcessPoolError` naming the cause if any child cannot start. Calling it again
        is a no-op; :meth:`run` calls it if needed.
        """
        async with self._start_lock:
            if self._closing:
                raise ProcessPoolError("the process pool is closed")
            if self._started:
                return
            results = await asyncio.gather(*(self._spawn() for _ in range(self._size)), return_exceptions=True)
            children = [r for r in results if isinstance(r, _Child)]
            failures = [r for r in results if not isinstance(r, _Child)]
            if failures:
                await asyncio.gather(*(self._forget(child) for child in children))
                raise failures[0]
            for child in children:
                self._idle.put_nowait(child)
            self._started = True

    async def run(
        self,
        task_name: str,
        args: list[Any],
        kwargs: dict[str, Any],
        *,
        context: dict[str, Any],
        timeout_s: float | None,
    ) -> ProcessOutcome:
        """Run ``task_name(*args, **kwargs)`` in a free child and return how it ended.

        ``context`` becomes ``conveyor.current_task()`` in the child: ``id``, ``name``, ``queue``,
        ``attempt``, ``max_attempts`` and optionally ``worker_id``. Past ``timeout_s`` seconds the
        child is killed and the outcome says ``timed_out``. If this coroutine is cancelled, the child
        is killed and ``CancelledError`` propagates. Raises :class:`PayloadError` for arguments that
        are not JSON and :class:`ProcessPoolError` if no child can be started.
        """
        if timeout_s is not None and timeout_s <= 0:
            raise ValueError("timeout_s must be > 0 seconds")
        missing = [key for key in _CONTEXT_KEYS if key not in context]
        if missing:
            raise ValueError(f"context is missing {', '.join(missing)}")
        run_id = next(self._run_ids)
        request = {"id": run_id, "task": task_name, "args": args, "kwargs": kwargs, "context": context}
        try:
            line = encode_message(request)
        except (TypeError, ValueError, RecursionError) as exc:
            raise PayloadError(f"arguments of task {task_name!r} must be JSON-serialisable: {exc}") from None

        if not self._started:
            await self.start()
        child = await self._acquire(task_name)
        self._busy.add(child)
        self._none_busy.clear()
        healthy = False
        try:
            outcome, healthy = await self._exchange(child, run_id, line, task_name, context, timeout_s)
        except asyncio.CancelledError:
            logger.warning(
                "killing process-pool child pid %d: run %d was cancelled (%s)",
                child.pid,
                run_id,
                _describe_task(task_name, context),
            )
            child.kill("the run was cancelled")
            raise
        finally:
            self._busy.discard(child)
            if not self._busy:
                self._none_busy.set()
            if healthy:
                self._release(child)
            else:
                child.kill("it is being replaced")
                self._retire(child)
        return outcome

    async def close(self, grace_s: float = 5.0) -> None:
        """Let running tasks finish for up to ``grace_s`` seconds, then kill what is left and reap every child.

        New runs fail with :class:`ProcessPoolError` from the moment this is called. Idempotent.
        """
        self._closing = True
        if self._close_task is None:
            self._close_task = asyncio.create_task(self._shutdown(grace_s))
        await asyncio.shield(self._close_task)

    async def _shutdown(self, grace_s: float) -> None:
        self._idle.put_nowait(_CLOSED)
        if self._busy:
            try:
                async with asyncio.timeout(grace_s):
                    await self._none_busy.wait()
            except TimeoutError:
                for child in self._busy:
                    logger.warning(
                        "killing process-pool child pid %d: the pool is closing and %s is still running",
                        child.pid,
                        child.running,
                    )
                    child.kill("the pool closed before the task finished")
        # Loop: a replacement being started or a dying child being reaped may add to either set meanwhile.
        while self._background or self._children:
            for task in list(self._background):
                task.cancel()
            await asyncio.gather(*self._background, return_exceptions=True)
            children = list(self._children)
            # Children killed above are stopped by their runs too; stop() is shared, so this just waits.
            await asyncio.gather(*(child.stop(_IDLE_EXIT_GRACE_S) for child in children))
            self._children.difference_update(children)

    async def _spawn(self) -> _Child:
        """Start one child and wait for its ready message; raises :class:`ProcessPoolError` on failure."""
        fds: list[int] = []
        try:
            fds.extend(os.pipe())
            fds.extend(os.pipe())
        except OSError as exc:  # out of file descriptors, typically
            for fd in fds:
                os.close(fd)
            raise ProcessPoolError(f"could not start a process-pool child: {exc}") from exc
        request_read, request_write, reply_read, reply_write = fds
        request_file = os.fdopen(request_write, "wb", buffering=0)
        reply_file = os.fdopen(reply_read, "rb", buffering=0)
        try:
            proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                _CHILD_MODULE,
                self._app_ref,
                "--request-fd",
                str(request_read),
                "--reply-fd",
                str(reply_write),
                "--parent-pid",
                str(os.getpid()),
                "--traceback-limit-bytes",
                str(self._traceback_limit_bytes),
                stdin=subprocess.DEVNULL,
                pass_fds=(request_read, reply_write),
                env=self._env,
            )
        except BaseException as exc:
            request_file.close()
            reply_file.close()
            if isinstance(exc, OSError):
                raise ProcessPoolError(f"could not start a process-pool child: {exc}") from exc
            raise
        finally:
            # The child's ends: while the worker holds them, EOF would never arrive when the child dies.
            os.close(request_read)
            os.close(reply_write)

        child = _Child(proc, request_file, reply_file)
        self._children.add(child)
        try:
            await child.connect()
            async with asyncio.timeout(self._start_timeout_s):
                ready = await child.replies.read_message()
        except BaseException as exc:
            child.kill("it did not start")
            await self._forget(child)
            if isinstance(exc, TimeoutError):
                raise ProcessPoolError(
                    f"process-pool child pid {child.pid} did not import {self._app_ref!r} "
                    f"within {self._start_timeout_s} s"
                ) from None
            if isinstance(exc, _ProtocolError):
                raise ProcessPoolError(f"process-pool child pid {child.pid} {exc}") from None
            raise
        if ready is None or not ready.get("ready"):
            returncode = await self._forget(child)
            raise ProcessPoolError(self._start_failure(child.pid, returncode, ready))
        if self._closing:
            # close() may already have stopped every child it knew of; this one is ours to stop.
            await self._forget(child)
            raise ProcessPoolError("the process pool is closed")
        logger.info("started process-pool child pid %d for %s", child.pid, self._app_ref)
        return child

    def _start_failure(self, pid: int, returncode: int, ready: dict[str, Any] | None) -> str:
        error = ready.get("error") if ready is not None else None
        if not isinstance(error, dict):
            return (
                f"process-pool child pid {pid} {_describe_exit(returncode)} before it was ready "
                "(its stderr is the worker's)"
            )
        return (
            f"process-pool child could not load the app {self._app_ref!r}: "
            f"{error.get('type')}: {error.get('message')}\n{error.get('traceback', '')}"
        ).rstrip()

    async def _forget(self, child: _Child) -> int:
        # Discard only once stopped: if this is cancelled, close() must still find the child and reap it.
        returncode = await child.stop()
        self._children.discard(child)
        return returncode

    async def _acquire(self, task_name: str) -> _Child:
        while True:
            item = await self._idle.get()
            if self._closing or isinstance(item, _Closed):
                self._idle.put_nowait(item)  # pass it on: every waiting run must see the pool closed
                raise ProcessPoolError("the process pool is closed")
            if isinstance(item, _DeadSlot):
                # Try once more now, so a cause that went away (a deploy, a full disk) heals the pool.
                try:
                    return await self._spawn()
                except ProcessPoolError as exc:
                    self._idle.put_nowait(item)
                    raise ProcessPoolError(
                        f"no process-pool child could be started for task {task_name!r}: {exc}"
                    ) from exc
                except BaseException:
                    self._idle.put_nowait(item)
                    raise
            if item.exited:
                # Died while idle (OOM killer, an operator): not this task's failure, so take another child.
                returncode = item.proc.returncode
                logger.warning(
                    "process-pool child pid %d died while idle (%s); replacing it",
                    item.pid,
                    "exit status not known yet" if returncode is None else _describe_exit(returncode),
                )
                self._retire(item)
                continue
            return item

    def _release(self, child: _Child) -> None:
        if not self._closing:
            self._idle.put_nowait(child)

    def _retire(self, child: _Child) -> None:
        """Reap ``child`` and start its replacement in the background, so the run that lost it returns at once."""
        task = asyncio.create_task(self._stop_and_replace(child))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _stop_and_replace(self, child: _Child) -> None:
        await self._forget(child)
        if self._closing:
            return
        try:
            replacement = await self._spawn()
        except ProcessPoolError as exc:
            if self._closing:
                return
            logger.error("could not start a replacement process-pool child: %s", exc)
            self._idle.put_nowait(_DeadSlot())
            return
        self._idle.put_nowait(replacement)

    async def _exchange(
        self,
        child: _Child,
        run_id: int,
        line: bytes,
        task_name: str,
        context: Mapping[str, Any],
        timeout_s: float | None,
    ) -> tuple[ProcessOutcome, bool]:
        """Send one request and wait for its reply; returns the outcome and whether the child can be reused."""
        described = _describe_task(task_name, context)
        child.running = f"run {run_id} ({described})"
        child.send(line)
        try:
            async with asyncio.timeout(timeout_s):
                reply = await child.replies.read_message()
        except TimeoutError:
            logger.warning(
                "killing process-pool child pid %d: run %d exceeded its timeout of %s s (%s)",
                child.pid,
                run_id,
                timeout_s,
                described,
            )
            child.kill("the task timed out")
            await child.stop()
            timed_out = TimeoutError(f"task {task_name!r} exceeded its timeout of {timeout_s} s")
            return ProcessOutcome(ok=False, error=self._error(timed_out), timed_out=True, killed=True), False
        except _ProtocolError as exc:
            logger.error(
                "killing process-pool child pid %d: it %s during run %d (%s)", child.pid, exc, run_id, described
            )
            child.kill("it broke the protocol")
            broken = ChildDied(f"the child process {exc}")
            return ProcessOutcome(ok=False, error=self._error(broken), killed=True), False

        if reply is None:
            return await self._died(child, run_id, task_name, described), False
        if reply.get("id") != run_id:
            logger.error(
                "killing process-pool child pid %d: it answered run %r during run %d (%s)",
                child.pid,
                reply.get("id"),
                run_id,
                described,
            )
            child.kill("it broke the protocol")
            mismatch = ChildDied(f"the child process answered run {reply.get('id')!r} instead of run {run_id}")
            return ProcessOutcome(ok=False, error=self._error(mismatch), killed=True), False
        child.running = None
        if reply.get("ok"):
            return ProcessOutcome(ok=True, result=reply.get("result")), True
        return ProcessOutcome(ok=False, error=reply.get("error")), True

    async def _died(self, child: _Child, run_id: int, task_name: str, described: str) -> ProcessOutcome:
        try:
            async with asyncio.timeout(_REAP_TIMEOUT_S):
                returncode = await child.proc.wait()
        except TimeoutError:
            # It closed its reply pipe but lives on: no use to anyone.
            child.kill("it closed its reply pipe")
            returncode = await child.stop()
        how = _describe_exit(returncode)
        if child.kill_reason is not None:
            message = f"the child process running task {task_name!r} was killed because {child.kill_reason}"
            logger.info("process-pool child pid %d %s during run %d (%s)", child.pid, how, run_id, described)
        else:
            message = f"the child process (pid {child.pid}) running task {task_name!r} {how} before replying"
            logger.warning(
                "process-pool child pid %d %s during run %d (%s); replacing it", child.pid, how, run_id, described
            )
        return ProcessOutcome(ok=False, error=self._error(ChildDied(message)), killed=True)

    def _error(self, exc: BaseException) -> dict[str, Any]:
        return error_payload(exc, traceback_limit_bytes=self._traceback_limit_bytes)


def _describe_exit(returncode: int) -> str:
    if returncode < 0:
        try:
            return f"was killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"was killed by signal {-returncode}"
    return f"exited with code {returncode}"


def _describe_task(task_name: str, context: Mapping[str, Any]) -> str:
    return (
        f"task {task_name!r}, id {context.get('id')}, attempt {context.get('attempt')}, queue {context.get('queue')!r}"
    )
