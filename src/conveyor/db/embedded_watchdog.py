"""Runs the embedded PostgreSQL server and stops it when the process that owns it goes away.

Why a separate process: PR_SET_PDEATHSIG on the postmaster fires when the *thread* that forked it
exits, so a server started from a short-lived thread would die early, and there is no portable
"my parent process died" signal otherwise. Instead the owner keeps the write end of a pipe and
hands only the read end to this watchdog. The kernel closes the write end however the owner ends
(exit, exception, SIGKILL), so EOF on the pipe is the reliable "owner gone" event.

The watchdog is the postmaster's parent and is single-threaded, so here PR_SET_PDEATHSIG *is*
reliable: if the watchdog itself is killed, the postmaster gets SIGINT. The owner starts the
watchdog in its own session so a Ctrl-C aimed at the owner's process group cannot kill it before
it has stopped the server.

Invoked as a script with only stdlib imports (``python -I embedded_watchdog.py --pipe-fd N
[--uid U --gid G] [--grace-s S] -- postgres ...``) so it does not depend on how the owner found
the conveyor package. Exits with the postmaster's exit status.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import select
import signal
import subprocess
import sys
from collections.abc import Callable
from types import FrameType

_PR_SET_PDEATHSIG = 1
_POLL_S = 0.5
_QUIT_GRACE_S = 5.0


def main(argv: list[str] | None = None) -> int:
    args = _parse(sys.argv[1:] if argv is None else argv)
    terminate_requested = False

    def on_sigterm(_signum: int, _frame: FrameType | None) -> None:
        nonlocal terminate_requested
        terminate_requested = True

    # Only the owner's pipe (or an explicit SIGTERM) decides when the server stops.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, on_sigterm)

    as_user = args.uid is not None
    server = subprocess.Popen(
        args.command,
        stdin=subprocess.DEVNULL,
        cwd="/",
        user=args.uid if as_user else None,
        group=args.gid if as_user else None,
        extra_groups=[] if as_user else None,
        preexec_fn=_die_with(os.getpid()),
    )
    with server:
        while server.poll() is None and not terminate_requested:
            readable, _, _ = select.select([args.pipe_fd], [], [], _POLL_S)
            if readable and not os.read(args.pipe_fd, 4096):
                break  # EOF: the owner stopped us or died
        _stop(server, args.grace_s)
    return server.returncode if server.returncode >= 0 else 128 - server.returncode


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="embedded_watchdog")
    parser.add_argument("--pipe-fd", type=int, required=True)
    parser.add_argument("--uid", type=int)
    parser.add_argument("--gid", type=int)
    parser.add_argument("--grace-s", type=float, default=10.0)
    parser.add_argument("command", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    if args.command[:1] == ["--"]:
        args.command = args.command[1:]
    if not args.command:
        parser.error("missing the server command after --")
    return args


def _stop(server: subprocess.Popen[bytes], grace_s: float) -> None:
    """Fast shutdown (SIGINT), then immediate shutdown (SIGQUIT), then SIGKILL."""
    for sig, wait_s in ((signal.SIGINT, grace_s), (signal.SIGQUIT, _QUIT_GRACE_S)):
        server.send_signal(sig)
        try:
            server.wait(wait_s)
            return
        except subprocess.TimeoutExpired:
            continue
    server.kill()
    server.wait()


def _die_with(watchdog_pid: int) -> Callable[[], None] | None:
    """A preexec_fn giving the server SIGINT if the watchdog dies (Linux only)."""
    if not sys.platform.startswith("linux"):
        return None
    libc = ctypes.CDLL(None, use_errno=True)  # loaded before fork: no dlopen in the child

    def set_parent_death_signal() -> None:
        # Runs after the uid switch, which would otherwise clear the setting.
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGINT, 0, 0, 0)
        if os.getppid() != watchdog_pid:  # the watchdog died before prctl took effect
            os._exit(1)

    return set_parent_death_signal


if __name__ == "__main__":
    sys.exit(main())
