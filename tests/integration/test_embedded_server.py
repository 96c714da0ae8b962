"""The embedded PostgreSQL server with real binaries and real processes (no mocks).

Every test uses its own data directory and stops what it starts. As root (as in CI), the server
runs as the unprivileged ``conveyor-pg`` account, which these tests check too.
"""

from __future__ import annotations

import errno
import os
import select
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psutil
import psycopg
import pytest

from conveyor.db.embedded import (
    EmbeddedPostgres,
    PostgresBinaries,
    default_data_dir,
    find_binaries,
    free_port,
)
from conveyor.db.embedded_binaries import binaries_for_user, origin_libdirs, service_user
from conveyor.errors import EmbeddedServerError

pytestmark = pytest.mark.slow

as_root = pytest.mark.skipif(os.geteuid() != 0, reason="exercises the run-as-root path")

# Owner process for the parent-death test: starts the server from a thread that then exits.
_OWNER_SCRIPT = """
import sys, threading, time
from pathlib import Path
from conveyor.db.embedded import EmbeddedPostgres

server = EmbeddedPostgres(Path(sys.argv[1]), fsync=False)
starter = threading.Thread(target=server.start)
starter.start()
starter.join()
print(server.url, server.postmaster_pid, flush=True)
time.sleep(600)
"""


@pytest.fixture
def workdir() -> Iterator[Path]:
    # Not tmp_path: pytest's base temp dir is 0700, which the unprivileged account the server runs
    # as (when the tests run as root) cannot traverse.
    path = Path(tempfile.mkdtemp(prefix="conveyor-embedded-test-"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def servers() -> Iterator[list[EmbeddedPostgres]]:
    """Servers a test started; stopped afterwards even if the test fails."""
    started: list[EmbeddedPostgres] = []
    yield started
    for server in reversed(started):
        server.stop()


def _query(url: str, sql: str) -> list[tuple[object, ...]]:
    with psycopg.connect(url, connect_timeout=5, autocommit=True) as conn:
        cursor = conn.execute(sql)
        return cursor.fetchall() if cursor.description else []


def _refuses(url: str) -> bool:
    try:
        with psycopg.connect(url, connect_timeout=2):
            return False
    except psycopg.OperationalError:
        return True


def _gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def _wait_until(condition: Callable[[], bool], timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.1)
    return condition()


def _port(url: str) -> int:
    return int(url.rsplit(":", 1)[1].split("/")[0])


def _kill_leftover(pid: int | None) -> None:
    if pid is not None and not _gone(pid):
        os.kill(pid, signal.SIGKILL)


def test_find_binaries__returns_a_bindir_with_initdb_and_postgres() -> None:
    binaries = find_binaries()

    assert (binaries.bindir / "postgres").is_file()
    assert (binaries.bindir / "initdb").is_file()
    assert binaries.version.isdigit()


def test_free_port__is_bindable_and_never_5432() -> None:
    for _ in range(20):
        port = free_port()
        assert port != 5432
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", port))


def test_default_data_dir__follows_the_privilege_of_the_process() -> None:
    expected_root = Path("/var/lib/conveyor/postgres")
    if os.geteuid() == 0:
        assert default_data_dir() == expected_root
    else:
        assert default_data_dir().parts[-2:] == ("conveyor", "postgres")


def test_ephemeral_server__answers_then_stops_and_deletes_its_data(workdir: Path) -> None:
    data_dir = workdir / "pg"
    server = EmbeddedPostgres(data_dir, fsync=False, ephemeral=True)
    try:
        url = server.start()

        assert url.startswith("postgresql://postgres@127.0.0.1:")
        assert _port(url) != 5432
        assert server.owns_server
        assert _query(url, "SELECT 1") == [(1,)]
        assert _query(url, "SHOW fsync") == [("off",)]
        assert _query(url, "SHOW max_connections") == [("300",)]
        _query(url, "CREATE TABLE t (id int)")
    finally:
        server.stop()

    assert _refuses(url)
    assert not data_dir.exists()


def test_server__keeps_its_data_and_port_across_restarts(workdir: Path) -> None:
    data_dir = workdir / "pg"
    with EmbeddedPostgres(data_dir, fsync=False) as first:
        url = first.url
        _query(url, "CREATE TABLE kept (v text)")
        _query(url, "INSERT INTO kept VALUES ('still here')")
    assert _refuses(url)

    with EmbeddedPostgres(data_dir, fsync=False) as second:
        assert second.url == url
        assert second.owns_server
        assert _query(second.url, "SELECT v FROM kept") == [("still here",)]


def test_start__twice_returns_the_same_url_and_a_second_instance_attaches(
    workdir: Path, servers: list[EmbeddedPostgres]
) -> None:
    data_dir = workdir / "pg"
    owner = EmbeddedPostgres(data_dir, fsync=False)
    servers.append(owner)
    url = owner.start()

    assert owner.start() == url
    assert owner.owns_server

    attached = EmbeddedPostgres(data_dir, fsync=False)
    servers.append(attached)
    assert attached.start() == url
    assert not attached.owns_server
    assert attached.postmaster_pid == owner.postmaster_pid

    attached.stop()  # detaching must leave the owner's server running
    assert _query(url, "SELECT 1") == [(1,)]

    owner.stop()
    assert _refuses(url)


def test_start__concurrent_starts_on_one_data_dir_share_one_server(
    workdir: Path, servers: list[EmbeddedPostgres]
) -> None:
    contenders = [EmbeddedPostgres(workdir / "pg", fsync=False) for _ in range(4)]
    servers.extend(contenders)
    with ThreadPoolExecutor(max_workers=len(contenders)) as pool:
        urls = list(pool.map(lambda server: server.start(), contenders))

    assert len(set(urls)) == 1
    assert sum(server.owns_server for server in contenders) == 1


def test_start__moves_to_a_new_port_when_the_recorded_one_is_taken(workdir: Path) -> None:
    data_dir = workdir / "pg"
    with EmbeddedPostgres(data_dir, fsync=False) as server:
        old_port = _port(server.url)

    with socket.socket() as squatter:
        # SO_REUSEADDR: the stopped server's port may linger in TIME_WAIT. If something else (another
        # test worker) took the port meanwhile, it is taken all the same, which is what this test needs.
        squatter.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            squatter.bind(("127.0.0.1", old_port))
            squatter.listen()
        except OSError as exc:
            if exc.errno != errno.EADDRINUSE:
                raise
        with EmbeddedPostgres(data_dir, fsync=False) as server:
            new_port = _port(server.url)
            assert new_port not in (old_port, 5432)
            assert _query(server.url, "SELECT 1") == [(1,)]

    assert (data_dir / "conveyor-port").read_text().strip() == str(new_port)


def test_start__explicit_port_in_use_raises_with_the_server_log(workdir: Path) -> None:
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        port = squatter.getsockname()[1]
        server = EmbeddedPostgres(workdir / "pg", port=port, fsync=False, ephemeral=True)
        try:
            with pytest.raises(EmbeddedServerError, match="could not bind") as caught:
                server.start(timeout_s=30)
        finally:
            server.stop()

    assert "server log" in str(caught.value)
    assert not server.owns_server
    assert not (workdir / "pg").exists()  # ephemeral: a failed start leaves nothing behind


def test_start__port_5432_is_refused(workdir: Path) -> None:
    with pytest.raises(EmbeddedServerError, match="5432"):
        EmbeddedPostgres(workdir / "pg", port=5432)


def test_owner_killed__server_stops_even_if_started_from_an_exited_thread(workdir: Path) -> None:
    postmaster_pid: int | None = None
    with subprocess.Popen(
        [sys.executable, "-c", _OWNER_SCRIPT, str(workdir / "pg")],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    ) as owner:
        try:
            assert owner.stdout is not None
            ready, _, _ = select.select([owner.stdout], [], [], 60)
            line = owner.stdout.readline() if ready else ""
            assert line, f"owner printed nothing; exit code {owner.poll()}"
            url, pid_text = line.split()
            postmaster_pid = int(pid_text)
            assert _query(url, "SELECT 1") == [(1,)]

            owner.send_signal(signal.SIGKILL)
            owner.wait(10)

            assert _wait_until(lambda: _gone(int(pid_text)), timeout_s=15), "postmaster still running"
            assert _wait_until(lambda: _refuses(url), timeout_s=15), "port still accepts connections"
        finally:
            if owner.poll() is None:
                owner.kill()
            _kill_leftover(postmaster_pid)


def test_watchdog_killed__server_stops_too(workdir: Path, servers: list[EmbeddedPostgres]) -> None:
    server = EmbeddedPostgres(workdir / "pg", fsync=False)
    servers.append(server)
    url = server.start()
    postmaster_pid = server.postmaster_pid
    assert postmaster_pid is not None
    watchdog = psutil.Process(postmaster_pid).parent()
    assert watchdog is not None and watchdog.pid != os.getpid()

    try:
        watchdog.send_signal(signal.SIGKILL)

        assert _wait_until(lambda: _gone(postmaster_pid), timeout_s=15), "postmaster outlived its watchdog"
        assert _refuses(url)
    finally:
        _kill_leftover(postmaster_pid)


@as_root
def test_as_root__server_runs_as_an_unprivileged_account(workdir: Path, servers: list[EmbeddedPostgres]) -> None:
    data_dir = workdir / "pg"
    server = EmbeddedPostgres(data_dir, fsync=False)
    servers.append(server)
    server.start()
    assert server.postmaster_pid is not None

    uid = psutil.Process(server.postmaster_pid).uids().effective
    assert uid != 0
    assert data_dir.stat().st_uid == uid
    assert stat.S_IMODE(data_dir.stat().st_mode) == 0o700


@as_root
def test_as_root__unreachable_binaries_are_copied_once_and_run(workdir: Path, servers: list[EmbeddedPostgres]) -> None:
    user = service_user()
    assert user is not None
    installed = find_binaries()
    # A private copy (like an install under /root, which the server account cannot traverse),
    # keeping library dirs the binaries find relative to themselves at the same relative place.
    private = workdir / "private"
    private.mkdir(mode=0o700)
    trees = {installed.bindir.parent, *origin_libdirs(installed.bindir)}
    anchor = Path(os.path.commonpath(trees))
    for tree in trees:
        shutil.copytree(tree, private / tree.relative_to(anchor), symlinks=True)
    unreachable = PostgresBinaries(bindir=private / installed.bindir.relative_to(anchor), version=installed.version)
    cache = workdir / "cache"

    copied = binaries_for_user(unreachable, user, cache_root=cache)

    assert copied.bindir.is_relative_to(cache / f"pgsql-{installed.version}")
    assert copied.version == installed.version
    for part in (cache, copied.bindir.parent, copied.bindir, copied.bindir.parent / "share"):
        assert stat.S_IMODE(part.stat().st_mode) == 0o755
        assert part.stat().st_uid == 0
    inodes = (copied.bindir.parent.stat().st_ino, copied.postgres.stat().st_ino)
    assert binaries_for_user(unreachable, user, cache_root=cache) == copied
    assert (copied.bindir.parent.stat().st_ino, copied.postgres.stat().st_ino) == inodes  # reused
    assert binaries_for_user(copied, user, cache_root=cache) == copied  # reachable: used as is

    server = EmbeddedPostgres(workdir / "pg", fsync=False, binaries=copied, ephemeral=True)
    servers.append(server)
    server.start()
    assert server.postmaster_pid is not None
    assert Path(psutil.Process(server.postmaster_pid).exe()).parent == copied.bindir


@as_root
def test_as_root__data_dir_the_server_account_cannot_reach_is_refused(tmp_path: Path) -> None:
    private = tmp_path / "private"  # pytest's base temp dir is 0700 root: untraversable
    private.mkdir(mode=0o700)
    server = EmbeddedPostgres(private / "pg", fsync=False)

    with pytest.raises(EmbeddedServerError, match="cannot reach"):
        server.start()
    assert not server.owns_server
