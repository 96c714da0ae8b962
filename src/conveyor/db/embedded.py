"""The PostgreSQL server Conveyor starts and owns when no database URL is configured.

``EmbeddedPostgres(data_dir).start()`` initialises the cluster on first use (trust auth, user
``postgres``), starts it on 127.0.0.1 at a port other than 5432 (remembered in the data dir so the
URL stays stable between runs) and returns its URL. If a server from the same data dir is already
running, ``start()`` attaches to it instead. The server stops with :meth:`EmbeddedPostgres.stop`,
at interpreter exit, or, with ``stop_with_parent``, when the owning process dies in any way (see
``embedded_watchdog``).

Unix sockets are disabled: TCP on loopback is all Conveyor needs, and it sidesteps the 107-byte
socket path limit for deep data directories.

Module map: ``embedded_binaries`` finds PostgreSQL and the account to run it as,
``embedded_process`` launches, probes and stops processes, ``embedded_watchdog`` is the process
that outlives a dead owner just long enough to stop its server.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import shutil
import subprocess
import threading
import time
from pathlib import Path
from types import TracebackType

import platformdirs
import psutil

from conveyor.db import embedded_process as proc
from conveyor.db.embedded_binaries import (
    ROOT_STATE_DIR,
    PostgresBinaries,
    ServiceUser,
    binaries_for_user,
    find_binaries,
    first_blocked,
    make_dirs,
    service_user,
    user_for_uid,
)
from conveyor.db.embedded_process import free_port
from conveyor.errors import EmbeddedServerError

__all__ = ["EmbeddedPostgres", "PostgresBinaries", "default_data_dir", "find_binaries", "free_port"]

PORT_FILE = "conveyor-port"
LOG_FILE = "conveyor-postgres.log"
_MAX_CONNECTIONS = 300  # test suites and worker pools open many connections at once
_BIND_ATTEMPTS = 3  # a free port can be taken between choosing it and the server binding it


def default_data_dir() -> Path:
    """``/var/lib/conveyor/postgres`` for root, else ``<user data dir>/conveyor/postgres``."""
    if os.geteuid() == 0:
        return ROOT_STATE_DIR / "postgres"
    return Path(platformdirs.user_data_dir("conveyor")) / "postgres"


def _url(port: int) -> str:
    return f"postgresql://postgres@127.0.0.1:{port}/postgres"


class EmbeddedPostgres:
    """A local PostgreSQL server kept in ``data_dir``, reachable only on 127.0.0.1.

    Args:
        data_dir: cluster directory; created and initialised on first start, kept afterwards.
            When running as root it must be reachable by the unprivileged server account.
        port: TCP port; ``None`` reuses the one recorded in ``data_dir`` if free, else picks one.
        fsync: ``False`` trades crash safety for speed (tests).
        binaries: PostgreSQL install to use; ``None`` runs :func:`find_binaries`.
        stop_with_parent: stop the server when this process dies, even by SIGKILL.
        ephemeral: delete ``data_dir`` after :meth:`stop`.
    """

    def __init__(
        self,
        data_dir: Path,
        *,
        port: int | None = None,
        fsync: bool = True,
        binaries: PostgresBinaries | None = None,
        stop_with_parent: bool = True,
        ephemeral: bool = False,
    ) -> None:
        if port == proc.RESERVED_PORT:
            raise EmbeddedServerError("port 5432 is left to a system PostgreSQL; choose another")
        self._data_dir = Path(data_dir).absolute()
        self._port = port
        self._fsync = fsync
        self._binaries = binaries
        self._stop_with_parent = stop_with_parent
        self._ephemeral = ephemeral
        self._lock = threading.Lock()
        self._url: str | None = None
        self._server: proc.ServerProcess | None = None  # set only when we started the server
        self._postmaster_pid: int | None = None

    @property
    def url(self) -> str:
        """``postgresql://postgres@127.0.0.1:PORT/postgres``; only valid after :meth:`start`."""
        if self._url is None:
            raise EmbeddedServerError("the embedded server is not started")
        return self._url

    @property
    def owns_server(self) -> bool:
        """True if this object started the server (and so stops it); False when it attached."""
        return self._server is not None

    @property
    def postmaster_pid(self) -> int | None:
        """Process id of the running server, once started or attached."""
        return self._postmaster_pid

    @property
    def data_dir(self) -> Path:
        return self._data_dir

    def __enter__(self) -> EmbeddedPostgres:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def start(self, timeout_s: float = 30.0) -> str:
        """Start (or attach to) the server and wait until it accepts connections; returns the URL.

        Calling it again while the server runs returns the same URL. Raises
        :class:`EmbeddedServerError` (with the tail of the server log) if the server cannot start.
        """
        with self._lock:
            if self._url is not None and (self._server is None or self._server.exit_code() is None):
                return self._url
            if self._server is not None:  # the server we started has died: clean up, start afresh
                self._server.stop(self._postmaster_pid, self._data_dir)
            self._forget()
            self._url = self._start(time.monotonic() + timeout_s)
            if self._server is not None:
                # A clean exit stops the server before the process is gone, so a next run started
                # right away never attaches to a server that is about to shut down.
                atexit.register(self.stop)
            return self._url

    def _start(self, deadline: float) -> str:
        binaries = self._binaries or find_binaries()
        make_dirs(self._data_dir.parent)
        with contextlib.suppress(FileExistsError):
            self._data_dir.mkdir(mode=0o700)
        with proc.locked_dir(self._data_dir, deadline):
            port = self._running_port(deadline)
            if port is not None:
                return _url(port)
            self._require_empty_or_cluster()
            try:
                user = self._server_user()
                if user is not None:
                    binaries = binaries_for_user(binaries, user)
                if not (self._data_dir / "PG_VERSION").exists():
                    self._initdb(binaries, user, deadline)
                return self._launch(binaries, user, deadline)
            except BaseException:
                if self._ephemeral:  # no server runs from it (checked above, under the lock)
                    shutil.rmtree(self._data_dir, ignore_errors=True)
                raise

    def stop(self) -> None:
        """Stop the server if this object started it (fast shutdown); otherwise just detach."""
        with self._lock:
            server = self._server if self._server is not None and self._server.owned_here else None
            if server is not None:
                server.stop(self._postmaster_pid, self._data_dir)
                atexit.unregister(self.stop)
            self._forget()
            if server is not None and self._ephemeral:
                shutil.rmtree(self._data_dir, ignore_errors=True)

    def _forget(self) -> None:
        self._url, self._server, self._postmaster_pid = None, None, None

    def _server_user(self) -> ServiceUser | None:
        """Who runs the server: this process unless it is root (PostgreSQL refuses root)."""
        user = service_user()
        if user is None:
            return None
        st = self._data_dir.stat()
        if (self._data_dir / "PG_VERSION").exists() and st.st_uid != 0:
            # An existing cluster keeps the account that created it (e.g. `nobody` on a host
            # where useradd was unavailable).
            user = user_for_uid(st.st_uid, st.st_gid)
        os.chown(self._data_dir, user.uid, user.gid)
        blocked = first_blocked(self._data_dir, user, want=7)
        if blocked is not None:
            raise EmbeddedServerError(
                f"the server runs as user {user.name!r}, who cannot reach {blocked} (on the way to "
                f"{self._data_dir}); use a data directory under a path that user can traverse"
            )
        return user

    def _require_empty_or_cluster(self) -> None:
        if not (self._data_dir / "PG_VERSION").exists() and any(self._data_dir.iterdir()):
            raise EmbeddedServerError(
                f"{self._data_dir} is neither empty nor a PostgreSQL data directory; "
                "choose another directory for the embedded server"
            )

    def _initdb(self, binaries: PostgresBinaries, user: ServiceUser | None, deadline: float) -> None:
        self._require_empty_or_cluster()
        # --no-locale: a C-locale cluster behaves the same on every host and needs no OS locales.
        cmd = [str(binaries.initdb), "-D", str(self._data_dir), "--auth=trust", "--encoding=UTF8"]
        cmd += ["-U", "postgres", "--no-locale"] + ([] if self._fsync else ["--no-sync"])
        try:
            done = subprocess.run(
                cmd,
                capture_output=True,
                text=True,
                check=False,
                timeout=max(deadline - time.monotonic(), 1.0),
                env=proc.child_env(),
                cwd="/",
                stdin=subprocess.DEVNULL,
                user=proc.uid(user),
                group=proc.gid(user),
                extra_groups=proc.groups(user),
            )
        except subprocess.TimeoutExpired as exc:
            raise EmbeddedServerError(f"initdb in {self._data_dir} timed out") from exc
        if done.returncode != 0:
            output = proc.tail(done.stdout + done.stderr)
            raise EmbeddedServerError(f"initdb in {self._data_dir} failed (exit {done.returncode}):\n{output}")

    def _launch(self, binaries: PostgresBinaries, user: ServiceUser | None, deadline: float) -> str:
        log_path = self._data_dir / LOG_FILE
        proc.rotate_log(log_path)
        for attempt in range(1, _BIND_ATTEMPTS + 1):
            port = self._choose_port()
            log_offset = proc.log_size(log_path)
            server = proc.ServerProcess.spawn(
                self._server_command(binaries, port),
                user=user,
                log_path=log_path,
                stop_with_parent=self._stop_with_parent,
            )
            try:
                self._wait_ready(server, port, deadline)
            except EmbeddedServerError as exc:
                server.stop(None, self._data_dir)
                log = proc.log_tail(log_path, log_offset)
                port_clash = "could not bind" in log or "could not create any TCP/IP sockets" in log
                if port_clash and self._port is None and attempt < _BIND_ATTEMPTS:
                    continue
                raise EmbeddedServerError(f"{exc}; server log ({log_path}):\n{log}") from None
            self._server = server
            self._postmaster_pid = proc.read_pidfile(self._data_dir)[0]
            proc.write_owned(self._data_dir / PORT_FILE, f"{port}\n", user)
            if user is not None:
                os.chown(log_path, user.uid, user.gid)
            return _url(port)
        raise AssertionError("unreachable: the last attempt returns or raises")

    def _server_command(self, binaries: PostgresBinaries, port: int) -> list[str]:
        settings = {
            "listen_addresses": "127.0.0.1",
            "port": str(port),
            "unix_socket_directories": "",
            "max_connections": str(_MAX_CONNECTIONS),
        }
        if not self._fsync:
            settings |= {"fsync": "off", "synchronous_commit": "off", "full_page_writes": "off"}
        cmd = [str(binaries.postgres), "-D", str(self._data_dir)]
        for name, value in settings.items():
            cmd += ["-c", f"{name}={value}"]
        return cmd

    def _wait_ready(self, server: proc.ServerProcess, port: int, deadline: float) -> None:
        while True:
            code = server.exit_code()
            if code is not None:
                raise EmbeddedServerError(f"PostgreSQL in {self._data_dir} exited during startup (code {code})")
            if proc.serves(_url(port), self._data_dir):
                return
            if time.monotonic() > deadline:
                raise EmbeddedServerError(f"PostgreSQL in {self._data_dir} did not accept connections in time")
            time.sleep(0.1)

    def _running_port(self, deadline: float) -> int | None:
        """Port of a live server already running from our data dir, or None."""
        try:
            pid, port = proc.read_pidfile(self._data_dir)
        except (OSError, ValueError, IndexError):
            return None
        if not proc.is_postmaster_of(pid, self._data_dir):
            if psutil.pid_exists(pid):
                # The pid was recycled after a crash or reboot: PostgreSQL would refuse to start
                # while any live process holds it, although that process is not our server.
                with contextlib.suppress(FileNotFoundError):
                    (self._data_dir / "postmaster.pid").unlink()
            return None
        # A live postmaster may still be starting up or shutting down: wait to see which.
        while proc.is_postmaster_of(pid, self._data_dir):
            if proc.serves(_url(port), self._data_dir):
                self._postmaster_pid = pid
                return port
            if time.monotonic() > deadline:
                raise EmbeddedServerError(
                    f"a PostgreSQL server (pid {pid}) holds {self._data_dir} but does not accept "
                    f"connections on port {port}"
                )
            time.sleep(0.1)
        return None

    def _choose_port(self) -> int:
        if self._port is not None:
            return self._port
        with contextlib.suppress(OSError, ValueError):
            recorded = int((self._data_dir / PORT_FILE).read_text().strip())
            if 1024 <= recorded <= 65535 and recorded != proc.RESERVED_PORT and proc.port_is_free(recorded):
                return recorded
        return free_port()
