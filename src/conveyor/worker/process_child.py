"""A child of the process pool: imports the app once, then runs one task at a time for the worker.

Started by :class:`conveyor.worker.process_pool.ProcessPool` as::

    python -m conveyor.worker.process_child package.module:app \\
        --request-fd N --reply-fd N --parent-pid N --traceback-limit-bytes N

The worker and the child talk over a dedicated pipe pair carrying newline-delimited JSON, never
pickle. stdin/stdout/stderr are left alone so that ``print`` and logging in task code still reach
the worker's terminal without corrupting the protocol.

* child -> worker, once: ``{"ready": true, "pid": N}`` or ``{"ready": false, "error": {...}}``
* worker -> child: ``{"id": run_id, "task": name, "args": [...], "kwargs": {...}, "context": {...}}``
* child -> worker: ``{"id": run_id, "ok": true, "result": ...}`` or ``{"id": run_id, "ok": false, "error": {...}}``

The child exits when its request pipe reaches end-of-file (the worker closed it or died), when its
parent process changes, and (Linux) when the thread that started it dies (``PR_SET_PDEATHSIG``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import contextvars
import ctypes
import importlib
import inspect
import json
import os
import queue
import signal
import sys
import threading
import time
import traceback
from collections.abc import Awaitable, Sequence
from typing import Any

from conveyor.core.context import TaskContext, reset_current_task, set_current_task
from conveyor.core.retry import error_type_names, qualified_name
from conveyor.core.task import TaskRegistry
from conveyor.errors import NonRetryable, PayloadError, Retry

EXIT_APP_FAILED = 2  # the app could not be imported; the worker reads the reason from the ready message
EXIT_PARENT_GONE = 3  # the worker died or closed the pipe while a task was running

_PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>
_PARENT_POLL_S = 1.0


def load_registry(app_ref: str) -> TaskRegistry:
    """Import ``package.module:attribute`` and return the attribute's ``.registry``."""
    module_name, sep, attribute = app_ref.partition(":")
    if not sep or not module_name or not attribute:
        raise ValueError(f"app reference {app_ref!r} must look like 'package.module:attribute'")
    obj: Any = importlib.import_module(module_name)
    for part in attribute.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise AttributeError(f"module {module_name!r} has no attribute {attribute!r}") from None
    registry = getattr(obj, "registry", None)
    if not isinstance(registry, TaskRegistry):
        raise TypeError(
            f"{app_ref!r} is a {type(obj).__qualname__}, which has no .registry of type TaskRegistry; "
            "point the app reference at the Conveyor app object"
        )
    return registry


def error_payload(exc: BaseException, *, traceback_limit_bytes: int) -> dict[str, Any]:
    """The JSON description of ``exc`` sent to the worker in place of the exception itself."""
    retry_delay = exc.delay if isinstance(exc, Retry) else None
    return {
        "type": qualified_name(type(exc)),
        "types": error_type_names(exc),
        "message": _safe_str(exc),
        "traceback": cap_traceback("".join(traceback.format_exception(exc)), traceback_limit_bytes),
        "retry_delay": None if retry_delay is None else float(retry_delay),
        "retry_requested": isinstance(exc, Retry),
        "non_retryable": isinstance(exc, NonRetryable),
    }


def cap_traceback(text: str, limit_bytes: int) -> str:
    """``text`` cut to at most ``limit_bytes`` of UTF-8, keeping its end: the innermost frames and the
    exception line are what explain a failure; the outermost frames are mostly the same every time."""
    data = text.encode("utf-8", "backslashreplace")
    if len(data) <= limit_bytes:
        return text
    marker = f"[traceback truncated: only the end of its {len(data)} bytes is kept]\n"
    tail = data[len(data) - max(0, limit_bytes - len(marker.encode())) :].decode("utf-8", "ignore")
    # Start on a whole line, so the first kept line is not half a file path.
    newline = tail.find("\n")
    if 0 <= newline < len(tail) - 1:
        tail = tail[newline + 1 :]
    return marker + tail


def _safe_str(exc: BaseException) -> str:
    try:
        return str(exc)
    except Exception:  # a broken __str__ in user code must not take the child down
        return f"<{type(exc).__qualname__}: str() failed>"


class _Requests:
    """Reads requests on a thread of its own, so end-of-file is seen even while a task blocks the main thread.

    EOF means the worker is gone or shutting down. An idle child then exits normally; a busy child
    exits at once, because nobody is left to receive its result.
    """

    def __init__(self, fd: int) -> None:
        self._file = os.fdopen(fd, "rb")
        self._lines: queue.SimpleQueue[bytes | None] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._busy = False
        self._eof = False
        threading.Thread(target=self._read, name="conveyor-request-reader", daemon=True).start()

    def _read(self) -> None:
        try:
            for line in self._file:
                self._lines.put(line)
        except OSError:
            pass
        with self._lock:
            self._eof = True
            if self._busy:
                os._exit(EXIT_PARENT_GONE)
        self._lines.put(None)

    def next(self) -> bytes | None:
        """The next request line, or ``None`` once the worker has closed the pipe."""
        line = self._lines.get()
        with self._lock:
            # Checked under the lock: the reader either sees this request as busy (and exits the
            # process) or has already marked EOF (and this request is dropped, nobody awaits it).
            if line is None or self._eof:
                return None
            self._busy = True
        return line

    def done(self) -> None:
        with self._lock:
            self._busy = False


def _die_with_parent(parent_pid: int) -> None:
    """Best effort on top of the EOF watch: have Linux SIGKILL this child when its parent dies."""
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(ctypes.c_int(_PR_SET_PDEATHSIG), ctypes.c_ulong(signal.SIGKILL), 0, 0, 0)
        except (OSError, AttributeError):
            pass
    # The parent may have died before prctl took effect; the death signal would then never come.
    if os.getppid() != parent_pid:
        os._exit(EXIT_PARENT_GONE)

    def watch() -> None:
        # An orphan is re-parented (to init or a subreaper), which this notices even if someone
        # else still holds the request pipe open.
        while True:
            time.sleep(_PARENT_POLL_S)
            if os.getppid() != parent_pid:
                os._exit(EXIT_PARENT_GONE)

    threading.Thread(target=watch, name="conveyor-parent-watch", daemon=True).start()


def encode_message(message: dict[str, Any]) -> bytes:
    """One protocol line. ``allow_nan=False``: NaN is not JSON, and PostgreSQL would refuse it later."""
    return (json.dumps(message, allow_nan=False, separators=(",", ":")) + "\n").encode()


class _Replies:
    def __init__(self, fd: int) -> None:
        self._fd = fd

    def send(self, message: dict[str, Any]) -> None:
        self.send_line(encode_message(message))

    def send_line(self, data: bytes) -> None:
        view = memoryview(data)
        try:
            while view:
                view = view[os.write(self._fd, view) :]
        except BrokenPipeError:
            os._exit(EXIT_PARENT_GONE)


class _Executor:
    def __init__(self, registry: TaskRegistry, traceback_limit_bytes: int) -> None:
        self._registry = registry
        self._traceback_limit_bytes = traceback_limit_bytes
        # One loop for the child's life: async tasks may keep clients bound to it between runs.
        self._runner = asyncio.Runner()

    def close(self) -> None:
        self._runner.close()

    def handle(self, line: bytes) -> bytes:
        """Run one request line; returns the encoded reply line."""
        run_id: Any = None
        try:
            request = json.loads(line)
            run_id = request["id"]
            result = self._call(request)
        except BaseException as exc:  # SystemExit too: a task calling sys.exit() must not end the child
            return self._error_reply(run_id, exc)
        try:
            return encode_message({"id": run_id, "ok": True, "result": result})
        except (TypeError, ValueError, RecursionError) as exc:
            error = PayloadError(f"the result of task {request['task']!r} must be JSON-serialisable: {exc}")
            return self._error_reply(run_id, error)

    def _error_reply(self, run_id: Any, exc: BaseException) -> bytes:
        error = error_payload(exc, traceback_limit_bytes=self._traceback_limit_bytes)
        return encode_message({"id": run_id, "ok": False, "error": error})

    def _call(self, request: dict[str, Any]) -> Any:
        definition = self._registry.get(request["task"])
        context = request["context"]
        task_context = TaskContext(
            id=context["id"],
            name=context["name"],
            queue=context["queue"],
            attempt=context["attempt"],
            max_attempts=context["max_attempts"],
            worker_id=context.get("worker_id"),
        )
        token = set_current_task(task_context)
        try:
            result = definition.func(*request["args"], **request["kwargs"])
            if inspect.isawaitable(result):
                # Runner.run uses its own context unless given one; pass ours so current_task() works.
                result = self._runner.run(_await(result), context=contextvars.copy_context())
            return result
        finally:
            reset_current_task(token)


async def _await(awaitable: Awaitable[Any]) -> Any:
    return await awaitable


def _flush_std_streams() -> None:
    # The worker may SIGKILL this child later (timeout, cancel); output still buffered would be lost.
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError, AttributeError):
            stream.flush()


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m conveyor.worker.process_child")
    parser.add_argument("app_ref", help="the app as 'package.module:attribute'")
    parser.add_argument("--request-fd", type=int, required=True)
    parser.add_argument("--reply-fd", type=int, required=True)
    parser.add_argument("--parent-pid", type=int, required=True)
    parser.add_argument("--traceback-limit-bytes", type=int, default=16384)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse_args(argv)
    _die_with_parent(args.parent_pid)
    # Ctrl-C in a terminal signals the whole process group; the worker decides how its tasks stop,
    # so the child must not die of KeyboardInterrupt in the middle of a graceful shutdown.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # pass_fds made these inheritable; a subprocess started by task code must not keep them open,
    # or the worker would never see EOF when this child dies.
    os.set_inheritable(args.request_fd, False)
    os.set_inheritable(args.reply_fd, False)

    replies = _Replies(args.reply_fd)
    try:
        registry = load_registry(args.app_ref)
    except BaseException as exc:
        replies.send({"ready": False, "error": error_payload(exc, traceback_limit_bytes=args.traceback_limit_bytes)})
        return EXIT_APP_FAILED
    requests = _Requests(args.request_fd)
    replies.send({"ready": True, "pid": os.getpid()})

    executor = _Executor(registry, args.traceback_limit_bytes)
    try:
        while (line := requests.next()) is not None:
            reply = executor.handle(line)
            _flush_std_streams()
            replies.send_line(reply)
            requests.done()
    finally:
        executor.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
