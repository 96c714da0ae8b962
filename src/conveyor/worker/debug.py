"""A worker's answers to the API's debug requests (``GET /debug/workers/{id}/stacks``).

The heartbeat calls :func:`answer_debug_requests` after renewing its leases: one index probe for
requests addressed to this worker, and for each a dump of every thread's stack
(``sys._current_frames``) and every asyncio task's await chain (``asyncio.all_tasks``), written back
into the request's row. It is bounded in time and never raises: the heartbeat keeps leases alive and
must not fail because of a debugging aid.

A dump holds file names, line numbers, function names and source lines: no local variables, no
arguments, nothing of the tasks' payloads.
"""

from __future__ import annotations

import asyncio
import linecache
import logging
import os
import socket
import sys
import threading
import traceback
from datetime import UTC, datetime
from types import FrameType
from typing import Any

from conveyor.db.debug_store import answer_request, pending_requests
from conveyor.db.hot_pool import HotPool
from conveyor.errors import DatabaseError

log = logging.getLogger("conveyor.worker")

#: Frames kept per stack (the innermost ones).
MAX_FRAMES = 60
#: Asyncio tasks listed in one dump.
MAX_TASKS = 1_000


async def answer_debug_requests(hot: HotPool, worker_id: str, *, timeout_s: float) -> None:
    """Answer what the API asked of this worker, within ``timeout_s`` seconds; log, never raise."""
    try:
        async with asyncio.timeout(timeout_s):
            for request_id, kind in await pending_requests(hot, worker_id):
                if kind == "stacks":
                    await answer_request(hot, request_id, stack_dump())
                    log.info("worker %s: answered a stack dump request (%d)", worker_id, request_id)
    except (DatabaseError, TimeoutError) as exc:
        log.debug("worker %s: could not answer debug requests: %s", worker_id, exc)
    except Exception:
        log.exception("worker %s: error while answering debug requests", worker_id)


def stack_dump() -> dict[str, Any]:
    """Every thread's stack and every asyncio task's await chain of this process, as JSON data."""
    threads_by_id = {thread.ident: thread for thread in threading.enumerate()}
    threads = []
    for ident, frame in sorted(sys._current_frames().items()):
        thread = threads_by_id.get(ident)
        threads.append(
            {
                "id": ident,
                "name": thread.name if thread is not None else f"thread-{ident}",
                "daemon": thread.daemon if thread is not None else None,
                "stack": _thread_stack(frame),
            }
        )
    try:
        all_tasks = list(asyncio.all_tasks())
    except RuntimeError:  # no running loop (called from a plain thread)
        all_tasks = []
    tasks = [
        {
            "name": task.get_name(),
            "coroutine": getattr(task.get_coro(), "__qualname__", type(task.get_coro()).__name__),
            "done": task.done(),
            "cancelling": task.cancelling(),
            "stack": _await_chain(task.get_coro()),
        }
        for task in sorted(all_tasks, key=lambda t: t.get_name())[:MAX_TASKS]
    ]
    return {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "taken_at": datetime.now(UTC).isoformat(),
        "threads": threads,
        "tasks": tasks,
        "tasks_total": len(all_tasks),
    }


def _thread_stack(frame: FrameType) -> list[dict[str, Any]]:
    summary = traceback.extract_stack(frame)[-MAX_FRAMES:]
    return [{"file": f.filename, "line": f.lineno, "function": f.name, "code": f.line or ""} for f in summary]


def _await_chain(coroutine: Any) -> list[dict[str, Any]]:
    """The frames of a coroutine and of what it awaits, outermost first. (``Task.get_stack`` gives a
    suspended coroutine's own frame only, not where down the chain it is waiting.)"""
    frames: list[dict[str, Any]] = []
    current = coroutine
    while current is not None and len(frames) < MAX_FRAMES:
        frame = (
            getattr(current, "cr_frame", None)
            or getattr(current, "gi_frame", None)
            or getattr(current, "ag_frame", None)
        )
        if frame is not None:
            code = frame.f_code
            line = frame.f_lineno
            frames.append(
                {
                    "file": code.co_filename,
                    "line": line,
                    "function": code.co_name,
                    "code": linecache.getline(code.co_filename, line).strip() if line else "",
                }
            )
        current = (
            getattr(current, "cr_await", None)
            or getattr(current, "gi_yieldfrom", None)
            or getattr(current, "ag_await", None)
        )
    return frames
