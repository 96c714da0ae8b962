"""Run N worker processes as one: start them, restart the ones that crash, stop them all together.

Children are whole ``python -m conveyor worker ... --processes 1`` processes started with
``subprocess.Popen``, not ``multiprocessing``: nothing is pickled, and a child is exactly what an
operator would start by hand.

Signals. SIGTERM and SIGINT received by the supervisor are forwarded to every child, each time: the
first asks the workers to finish their in-flight tasks, a second one makes them abort. Children run in
their own process group so that a Ctrl-C in a terminal reaches only the supervisor and is forwarded
once; otherwise each child would see it twice (once from the terminal, once from us) and abort at
once. For the same reason, under systemd use ``KillMode=mixed`` (SIGTERM to the supervisor only).

Orphans. On Linux each child asks the kernel for SIGTERM when its parent dies (``PR_SET_PDEATHSIG``),
so a supervisor killed with SIGKILL does not leave workers running unsupervised: they shut down
gracefully and give their tasks back. This is best effort: the signal is tied to the *thread* that
started the child, so children must be started from a thread that lives as long as the supervisor
(here, the main thread); it does not exist on other systems; and a child still starting up when the
supervisor dies checks its parent once, right after setting it.

Restarts. A child that exits non-zero or is killed by a signal while the supervisor is not stopping
is started again after a backoff of 0.5 s, doubling up to 10 s; the backoff starts over once a child
has run for 60 s. A child that exits 0 on its own (a ``--burst`` worker that drained its queues, or
one an operator asked to drain) has finished its job and is not restarted.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from types import FrameType

log = logging.getLogger("conveyor.supervisor")

INITIAL_BACKOFF_S = 0.5
MAX_BACKOFF_S = 10.0
HEALTHY_RUN_S = 60.0
"""A child that ran this long before crashing is considered to have been healthy: backoff starts over."""

#: Seconds to wait for children to stop after the supervisor itself fails, before killing them.
LEFTOVER_GRACE_S = 30.0

_PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>
_STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


@dataclass
class _Child:
    label: str
    command: list[str]
    process: subprocess.Popen[bytes] | None = None
    started_at: float = 0.0
    backoff_s: float = INITIAL_BACKOFF_S
    restart_at: float | None = None
    finished: bool = False

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.returncode is None


class Supervisor:
    """Keep one process per command running until told to stop.

    Args:
        commands: the argv of each child.
        labels: a name per child for log lines (default ``worker-1`` ... ``worker-N``).
        env: the children's environment (default: this process's).
        clock: monotonic seconds; replaceable in tests.
    """

    def __init__(
        self,
        commands: Sequence[Sequence[str]],
        *,
        labels: Sequence[str] | None = None,
        env: Mapping[str, str] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        names = list(labels) if labels is not None else [f"worker-{i}" for i in range(1, len(commands) + 1)]
        if len(names) != len(commands):
            raise ValueError(f"{len(commands)} commands but {len(names)} labels")
        self._children = [_Child(label, list(command)) for label, command in zip(names, commands, strict=True)]
        self._env = None if env is None else dict(env)
        self._clock = clock
        self.stopping = False
        self._forwarded: set[int] = set()
        self._failed_during_stop = False

    @property
    def pids(self) -> list[int]:
        """Process ids of the children running now."""
        return [c.process.pid for c in self._children if c.alive and c.process is not None]

    def run(self) -> int:
        """Supervise until every child has finished; returns the exit code for this process.

        0 when the children stopped cleanly after SIGTERM/SIGINT or all exited 0 on their own; 1 if a
        child exited non-zero, or was killed by anything but the signal we passed on, while stopping.
        Must run in the main thread (signal handlers, and the thread that owns PR_SET_PDEATHSIG).
        """
        wakeup_read, wakeup_write = os.pipe()
        os.set_blocking(wakeup_read, False)
        os.set_blocking(wakeup_write, False)
        previous = _install_wakeup(wakeup_write)
        try:
            for child in self._children:
                self._spawn(child)
            while not all(child.finished for child in self._children):
                self._wait(wakeup_read)
                self._reap()
                self._restart_due()
            return 1 if self._failed_during_stop else 0
        finally:
            _restore(previous)
            self._stop_leftovers()
            os.close(wakeup_read)
            os.close(wakeup_write)

    def stop(self, sig: int = signal.SIGTERM) -> None:
        """Stop restarting children and pass ``sig`` on to every running one."""
        if not self.stopping:
            log.info("supervisor received %s: stopping %d workers", signal.Signals(sig).name, len(self.pids))
        self.stopping = True
        self._forwarded.add(sig)
        for child in self._children:
            if child.restart_at is not None:
                child.restart_at = None
                child.finished = True
            if child.alive and child.process is not None:
                with contextlib.suppress(ProcessLookupError):
                    child.process.send_signal(sig)

    # -- the loop --------------------------------------------------------------------------------

    def _wait(self, wakeup_read: int) -> None:
        """Sleep until a signal arrives (SIGCHLD included) or the next restart is due."""
        due = [c.restart_at for c in self._children if c.restart_at is not None]
        # The cap only guards against a lost wake-up; SIGCHLD normally ends the wait at once.
        timeout = max(0.0, min([*due, self._clock() + 1.0]) - self._clock())
        readable, _, _ = select.select([wakeup_read], [], [], timeout)
        if not readable:
            return
        with contextlib.suppress(BlockingIOError):
            for signum in os.read(wakeup_read, 512):
                if signum in _STOP_SIGNALS:
                    self.stop(signum)

    def _reap(self) -> None:
        for child in self._children:
            if child.process is None or child.process.poll() is None:
                continue
            code = child.process.returncode
            pid = child.process.pid
            child.process = None
            if self.stopping:
                child.finished = True
                if code != 0 and not self._stopped_by_us(code):
                    self._failed_during_stop = True
                    log.error("%s (pid %d) %s while stopping", child.label, pid, _describe(code))
                continue
            if code == 0:
                child.finished = True
                log.info("%s (pid %d) finished", child.label, pid)
                continue
            self._schedule_restart(child, f"{child.label} (pid {pid}) {_describe(code)}")

    def _stopped_by_us(self, code: int) -> bool:
        # A child still importing has no handler yet and dies of the signal we forwarded (-SIGTERM), or
        # exits 128+N when a second one arrives before it runs: either way it was stopped, with nothing
        # in flight, exactly as asked.
        return any(code in (-sig, 128 + sig) for sig in self._forwarded)

    def _schedule_restart(self, child: _Child, what: str) -> None:
        now = self._clock()
        if now - child.started_at >= HEALTHY_RUN_S:
            child.backoff_s = INITIAL_BACKOFF_S
        delay = child.backoff_s
        child.backoff_s = min(delay * 2, MAX_BACKOFF_S)
        child.restart_at = now + delay
        log.warning("%s; restarting it in %.1f s", what, delay)

    def _restart_due(self) -> None:
        now = self._clock()
        for child in self._children:
            if child.restart_at is not None and child.restart_at <= now and not self.stopping:
                child.restart_at = None
                self._spawn(child)

    def _spawn(self, child: _Child) -> None:
        child.started_at = self._clock()
        try:
            child.process = subprocess.Popen(
                child.command,
                env=self._env,
                stdin=subprocess.DEVNULL,
                # Own process group: a terminal's Ctrl-C reaches only us, and we forward it once.
                process_group=0,
                preexec_fn=_die_with_parent(os.getpid()),
            )
        except OSError as exc:
            child.process = None
            self._schedule_restart(child, f"{child.label} could not be started ({exc})")
            return
        log.info("started %s (pid %d)", child.label, child.process.pid)

    def _stop_leftovers(self) -> None:
        """Only reached with live children if the supervisor itself failed: don't leave them behind."""
        alive = [c.process for c in self._children if c.alive and c.process is not None]
        if not alive:
            return
        log.error("supervisor failed: stopping %d workers", len(alive))
        for process in alive:
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + LEFTOVER_GRACE_S
        for process in alive:
            try:
                process.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def _describe(returncode: int) -> str:
    if returncode < 0:
        try:
            return f"was killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"was killed by signal {-returncode}"
    return f"exited with code {returncode}"


_Handler = Callable[[int, FrameType | None], object] | int | signal.Handlers | None


def _ignore(signum: int, frame: FrameType | None) -> None:
    """Python-level handler that does nothing: the wakeup fd carries the signal to the loop."""


def _install_wakeup(fd: int) -> tuple[int, dict[int, _Handler]]:
    # A Python signal handler must not take locks (it runs between bytecodes of the main thread, which
    # may hold them). With a wakeup fd the C-level handler writes the signal number to a pipe and the
    # loop reads it in select(): no work happens inside the handler at all.
    old_fd = signal.set_wakeup_fd(fd, warn_on_full_buffer=False)
    handlers: dict[int, _Handler] = {}
    for sig in (*_STOP_SIGNALS, signal.SIGCHLD):
        handlers[sig] = signal.signal(sig, _ignore)
    return old_fd, handlers


def _restore(previous: tuple[int, dict[int, _Handler]]) -> None:
    old_fd, handlers = previous
    for sig, handler in handlers.items():
        signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
    signal.set_wakeup_fd(old_fd)


def _die_with_parent(parent_pid: int) -> Callable[[], None] | None:
    """A ``preexec_fn`` that makes the child receive SIGTERM when its parent dies (Linux only)."""
    prctl = _prctl()
    if prctl is None:
        return None

    def preexec() -> None:
        # Runs in the forked child before exec; PDEATHSIG survives exec (unless the binary is setuid).
        prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
        # The parent may have died between fork and prctl: then nobody would ever send the signal. Exit
        # rather than kill ourselves: until exec this process runs the parent's signal handlers.
        if os.getppid() != parent_pid:
            os._exit(1)

    return preexec


def _prctl() -> Callable[..., int] | None:
    # Resolved in the parent: dlopen() in a forked child is not safe.
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        function: Callable[..., int] = libc.prctl
    except (OSError, AttributeError):
        return None
    return function
