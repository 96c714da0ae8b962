"""The ``--processes`` supervisor's rules, with tiny stand-in children instead of workers: what is
restarted, with what backoff, what a stop forwards and which exit code results."""

from __future__ import annotations

import os
import signal
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from conveyor.worker import supervisor as supervisor_module
from conveyor.worker.supervisor import Supervisor

WAIT_S = 30.0


def child(tmp_path: Path, name: str, body: str) -> list[str]:
    """A child process running ``body``; it appends a line to ``<name>.runs`` each time it starts."""
    script = tmp_path / f"{name}.py"
    script.write_text(
        "import os, signal, sys, time\n"
        f"RUNS = {str(tmp_path / (name + '.runs'))!r}\n"
        "with open(RUNS, 'a') as f:\n"
        "    f.write(f'{os.getpid()}\\n')\n" + textwrap.dedent(body)
    )
    return [sys.executable, str(script)]


def runs(tmp_path: Path, name: str) -> list[int]:
    path = tmp_path / f"{name}.runs"
    return [int(line) for line in path.read_text().split()] if path.exists() else []


@contextmanager
def signal_self_when(ready: Callable[[], bool], *signals: int) -> Iterator[None]:
    """Send ``signals`` to this process (the supervisor) once ``ready()``, from a helper thread."""
    stop = threading.Event()

    def watch() -> None:
        deadline = time.monotonic() + WAIT_S
        while not stop.is_set() and time.monotonic() < deadline:
            if ready():
                for sig in signals:
                    os.kill(os.getpid(), sig)
                    time.sleep(0.2)
                return
            time.sleep(0.02)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def test_supervisor__children_that_exit_0_are_not_restarted(tmp_path: Path) -> None:
    commands = [child(tmp_path, f"ok{i}", "sys.exit(0)") for i in range(2)]

    assert Supervisor(commands).run() == 0

    assert [len(runs(tmp_path, f"ok{i}")) for i in range(2)] == [1, 1]


def test_supervisor__a_crashing_child_is_restarted_with_doubling_backoff(tmp_path: Path) -> None:
    # Fails twice (once by exit code, once killed by a signal), then succeeds.
    body = """
        attempts = len(open(RUNS).read().split())
        if attempts == 1:
            sys.exit(3)
        if attempts == 2:
            os.kill(os.getpid(), signal.SIGKILL)
        sys.exit(0)
    """
    started = time.monotonic()

    assert Supervisor([child(tmp_path, "flaky", body)]).run() == 0

    assert len(runs(tmp_path, "flaky")) == 3
    assert time.monotonic() - started >= 0.5 + 1.0  # two restarts: 0.5 s, then 1 s


def test_supervisor__backoff_caps_and_starts_over_after_a_healthy_run() -> None:
    now = [1000.0]
    sup = Supervisor([["unused"]], clock=lambda: now[0])
    slot = sup._children[0]
    delays = []
    for _ in range(7):
        slot.started_at = now[0]
        sup._schedule_restart(slot, "test crash")
        assert slot.restart_at is not None
        delays.append(slot.restart_at - now[0])
    assert delays == [0.5, 1.0, 2.0, 4.0, 8.0, 10.0, 10.0]

    slot.started_at = now[0]
    now[0] += supervisor_module.HEALTHY_RUN_S
    sup._schedule_restart(slot, "crash after a long healthy run")
    assert slot.restart_at == now[0] + 0.5


def test_supervisor__sigterm_is_forwarded_and_a_clean_stop_exits_0(tmp_path: Path) -> None:
    body = """
        stop = []
        signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
        open(RUNS + '.ready', 'w').close()
        while not stop:
            time.sleep(0.01)
        sys.exit(0)
    """
    commands = [child(tmp_path, f"w{i}", body) for i in range(2)]
    ready = lambda: all((tmp_path / f"w{i}.runs.ready").exists() for i in range(2))  # noqa: E731

    with signal_self_when(ready, signal.SIGTERM):
        assert Supervisor(commands).run() == 0

    assert [len(runs(tmp_path, f"w{i}")) for i in range(2)] == [1, 1]


def test_supervisor__a_second_signal_is_forwarded_too(tmp_path: Path) -> None:
    body = """
        seen = []
        signal.signal(signal.SIGTERM, lambda *_: seen.append(1))
        signal.signal(signal.SIGINT, lambda *_: seen.append(2))
        open(RUNS + '.ready', 'w').close()
        while len(seen) < 2:
            time.sleep(0.01)
        open(RUNS + '.seen', 'w').write(repr(seen))
    """
    ready = lambda: (tmp_path / "w.runs.ready").exists()  # noqa: E731

    with signal_self_when(ready, signal.SIGTERM, signal.SIGINT):
        assert Supervisor([child(tmp_path, "w", body)]).run() == 0

    assert (tmp_path / "w.runs.seen").read_text() == "[1, 2]"


def test_supervisor__a_child_failing_during_stop_makes_the_exit_code_non_zero(tmp_path: Path) -> None:
    body = """
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(3))
        open(RUNS + '.ready', 'w').close()
        while True:
            time.sleep(0.01)
    """
    ready = lambda: (tmp_path / "bad.runs.ready").exists()  # noqa: E731

    with signal_self_when(ready, signal.SIGTERM):
        assert Supervisor([child(tmp_path, "bad", body)]).run() == 1

    assert len(runs(tmp_path, "bad")) == 1  # not restarted while stopping


def test_supervisor__restores_signal_handlers(tmp_path: Path) -> None:
    before = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGCHLD)}

    Supervisor([child(tmp_path, "quick", "sys.exit(0)")]).run()

    assert {sig: signal.getsignal(sig) for sig in before} == before


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux-only")
def test_supervisor__children_ask_for_sigterm_when_the_parent_dies(tmp_path: Path) -> None:
    body = """
        import ctypes
        value = ctypes.c_int()
        ctypes.CDLL(None).prctl(2, ctypes.byref(value), 0, 0, 0)  # PR_GET_PDEATHSIG
        open(RUNS + '.sig', 'w').write(str(value.value))
    """

    Supervisor([child(tmp_path, "orphan", body)]).run()

    assert (tmp_path / "orphan.runs.sig").read_text() == str(int(signal.SIGTERM))


def test_supervisor__a_child_killed_by_the_forwarded_signal_stopped_cleanly(tmp_path: Path) -> None:
    # A worker still importing has no handler yet: the forwarded SIGTERM kills it, as asked.
    body = """
        open(RUNS + '.ready', 'w').close()
        time.sleep(60)
    """
    ready = lambda: (tmp_path / "young.runs.ready").exists()  # noqa: E731

    with signal_self_when(ready, signal.SIGTERM):
        assert Supervisor([child(tmp_path, "young", body)]).run() == 0
