"""Operating-system plumbing for the embedded server: launching, probing and stopping processes.

``embedded.py`` decides *what* to run (data dir, port, attach or start); this module knows *how*:
the watchdog pipe, running as another user, reading ``postmaster.pid``, probing a port.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import psycopg

from conveyor.db.embedded_binaries import ServiceUser
from conveyor.errors import EmbeddedServerError

RESERVED_PORT = 5432  # a system PostgreSQL's port: never ours
SHUTDOWN_GRACE_S = 10.0  # fast shutdown may checkpoint; after this, immediate shutdown
_LOG_ROTATE_BYTES = 10 * 1024 * 1024
_WATCHDOG_SCRIPT = Path(__file__).with_name("embedded_watchdog.py")

# Write ends of watchdog pipes. A child forked without exec (multiprocessing) would inherit them
# and keep its watchdog from seeing EOF after the owner dies, so forked children close them at once.
_OWNER_PIPE_FDS: set[int] = set()


def _close_owner_pipes_in_child() -> None:
    for fd in _OWNER_PIPE_FDS:
        with contextlib.suppress(OSError):
            os.close(fd)
    _OWNER_PIPE_FDS.clear()


os.register_at_fork(after_in_child=_close_owner_pipes_in_child)


class ServerProcess:
    """A postmaster this process launched, either directly or under the watchdog.

    With a watchdog, ``process`` is the watchdog (the postmaster is its child) and stopping means
    closing our end of its pipe; see ``embedded_watchdog`` for why.
    """

    def __init__(self, process: subprocess.Popen[bytes], pipe_w: int | None) -> None:
        self._process = process
        self._pipe_w = pipe_w
        self._owner_pid = os.getpid()

    @classmethod
    def spawn(
        cls, command: list[str], *, user: ServiceUser | None, log_path: Path, stop_with_parent: bool
    ) -> ServerProcess:
        # Own session for the server and its watchdog: a Ctrl-C sent to the owner's process group
        # leaves shutdown to the owner, which may still need the database while it winds down.
        with open(log_path, "ab") as log:
            if not stop_with_parent:
                process = subprocess.Popen(
                    command,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    cwd="/",
                    env=child_env(),
                    start_new_session=True,
                    user=uid(user),
                    group=gid(user),
                    extra_groups=groups(user),
                )
                return cls(process, None)
            read_fd, write_fd = os.pipe()  # both non-inheritable; read_fd goes via pass_fds only
            _OWNER_PIPE_FDS.add(write_fd)
            watchdog = [sys.executable, "-I", str(_WATCHDOG_SCRIPT), "--pipe-fd", str(read_fd)]
            watchdog += ["--grace-s", str(SHUTDOWN_GRACE_S)]
            if user is not None:
                watchdog += ["--uid", str(user.uid), "--gid", str(user.gid)]
            try:
                process = subprocess.Popen(
                    [*watchdog, "--", *command],
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    cwd="/",
                    env=child_env(),
                    pass_fds=(read_fd,),
                    start_new_session=True,
                )
            except BaseException:
                _OWNER_PIPE_FDS.discard(write_fd)
                os.close(write_fd)
                raise
            finally:
                os.close(read_fd)
            return cls(process, write_fd)

    @property
    def owned_here(self) -> bool:
        """False in a child forked from the owner: only the owner may stop the server."""
        return os.getpid() == self._owner_pid

    def exit_code(self) -> int | None:
        """``None`` while the server (or its watchdog) runs."""
        return self._process.poll()

    def stop(self, postmaster_pid: int | None, data_dir: Path) -> None:
        """Fast shutdown, waiting until the server has exited (escalating if it hangs)."""
        if not self.owned_here:
            return
        if self._pipe_w is not None:
            # EOF on the pipe asks the watchdog for a fast shutdown; it exits once the server has.
            _OWNER_PIPE_FDS.discard(self._pipe_w)
            os.close(self._pipe_w)
            self._pipe_w = None
        else:
            self._process.send_signal(signal.SIGINT)
        try:
            self._process.wait(SHUTDOWN_GRACE_S + 10.0)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait()
        if postmaster_pid is not None and is_postmaster_of(postmaster_pid, data_dir):
            # Only if the watchdog was killed first; the server then already got SIGINT from it.
            with contextlib.suppress(ProcessLookupError):
                os.kill(postmaster_pid, signal.SIGQUIT)


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (never 5432)."""
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind(("127.0.0.1", 0))
            port: int = sock.getsockname()[1]
        if port != RESERVED_PORT:
            return port


def port_is_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        # As PostgreSQL does, so a port held only by TIME_WAIT connections counts as free.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def serves(url: str, data_dir: Path) -> bool:
    """True if ``url`` accepts connections and is the server for ``data_dir`` (not a stranger)."""
    try:
        with psycopg.connect(url, connect_timeout=2, autocommit=True) as conn:
            row = conn.execute("SHOW data_directory").fetchone()
    except psycopg.Error:
        return False
    return row is not None and Path(str(row[0])).resolve() == data_dir.resolve()


def is_postmaster_of(pid: int, data_dir: Path) -> bool:
    """True if ``pid`` is a live PostgreSQL process working in ``data_dir``."""
    try:
        process = psutil.Process(pid)
        if process.status() == psutil.STATUS_ZOMBIE or not process.name().startswith("postgres"):
            return False
        # The postmaster chdirs into its data directory before writing postmaster.pid.
        return Path(process.cwd()).resolve() == data_dir.resolve()
    except psutil.NoSuchProcess:
        return False
    except psutil.Error:
        return True  # cannot tell: assume it is, so its lock file is left alone


def read_pidfile(data_dir: Path) -> tuple[int, int]:
    """(pid, port) from ``postmaster.pid`` (its first and fourth lines)."""
    lines = (data_dir / "postmaster.pid").read_text().splitlines()
    return int(lines[0]), int(lines[3])


@contextlib.contextmanager
def locked_dir(directory: Path, deadline: float) -> Iterator[None]:
    """Serialise starts across processes: an flock on the directory itself until ``deadline``."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise EmbeddedServerError(f"another process is starting the server in {directory}") from None
                time.sleep(0.05)
        yield
    finally:
        os.close(fd)


def child_env() -> dict[str, str]:
    # PG* variables (PGDATA, PGPORT, PGOPTIONS...) would override what we pass explicitly.
    env = {key: value for key, value in os.environ.items() if not key.startswith("PG")}
    env["LC_ALL"] = "C"  # English messages, so start failures are readable and greppable
    return env


def uid(user: ServiceUser | None) -> int | None:
    return None if user is None else user.uid


def gid(user: ServiceUser | None) -> int | None:
    return None if user is None else user.gid


def groups(user: ServiceUser | None) -> list[int] | None:
    # No supplementary groups: the server gets exactly the unprivileged account's rights.
    return None if user is None else []


def write_owned(path: Path, text: str, user: ServiceUser | None) -> None:
    """Write a file into the data dir owned by the server's account (PostgreSQL may open any)."""
    path.write_text(text)
    if user is not None:
        os.chown(path, user.uid, user.gid)


def rotate_log(log_path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        if log_path.stat().st_size > _LOG_ROTATE_BYTES:
            log_path.replace(log_path.with_name(log_path.name + ".1"))


def log_size(log_path: Path) -> int:
    try:
        return log_path.stat().st_size
    except FileNotFoundError:
        return 0


def log_tail(log_path: Path, offset: int = 0, lines: int = 25) -> str:
    """The last ``lines`` lines written to ``log_path`` after byte ``offset``."""
    try:
        with open(log_path, "rb") as log:
            log.seek(offset)
            text = log.read().decode(errors="replace")
    except OSError:
        text = ""
    return tail(text, lines)


def tail(text: str, lines: int = 25) -> str:
    return "\n".join(text.strip().splitlines()[-lines:]) or "(empty)"
