"""``conveyor api``, ``conveyor api-keys`` and ``conveyor up`` as users run them: real processes, real
HTTP on free local ports, real signals."""

from __future__ import annotations

import json
import re
import signal
import socket
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.acceptance.test_cli import assert_one_line_error, background, conveyor, ok, wait_for
from tests.conftest import subprocess_env

APP = "sample_app:app"
WAIT_S = 60.0


@pytest.fixture
def env(database_url: str) -> dict[str, str]:
    # sample_app has a process-executor task, so each worker starts a pool: keep it to one process.
    return subprocess_env(database_url, CONVEYOR_WORKER__PROCESS_POOL_SIZE="1")


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    """Commands run from a directory that has nothing to do with the project."""
    return tmp_path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def printed_url(workdir: Path) -> str | None:
    found = re.search(r"api: (http://[\d.]+:\d+)", (workdir / "stdout.log").read_text())
    return found.group(1) if found else None


def make_key(env: dict[str, str], workdir: Path, scopes: str) -> dict[str, Any]:
    made: dict[str, Any] = json.loads(
        ok(conveyor("api-keys", "create", "--scopes", scopes, "--name", "test", "--json", env=env, cwd=workdir))
    )
    return made


def get(url: str, key: str | None = None, **kwargs: Any) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.get(url, headers=headers, timeout=30, **kwargs)


@pytest.mark.slow
def test_api__serves_until_sigterm(env: dict[str, str], workdir: Path) -> None:
    key = make_key(env, workdir, "tasks:write")["key"]
    with background("api", "--port", "0", env=env, cwd=workdir) as process:
        url = wait_for("the API URL", lambda: printed_url(workdir))
        assert get(f"{url}/health/ready").json()["status"] == "ok"
        anonymous = get(f"{url}/api/v1/tasks")
        # Without --app any task name is accepted (it may be defined in another code base).
        enqueued = httpx.post(
            f"{url}/api/v1/tasks",
            json={"name": "defined.elsewhere", "args": [1]},
            headers={"Authorization": f"Bearer {key}"},
            timeout=30,
        )

        process.send_signal(signal.SIGTERM)

        assert process.wait(timeout=WAIT_S) == 0
    assert anonymous.status_code == 401
    assert anonymous.headers["content-type"] == "application/problem+json"
    assert enqueued.status_code == 201
    assert key not in (workdir / "stderr.log").read_text()  # keys are never logged


@pytest.mark.slow
def test_api__sigterm_ends_open_event_streams_at_once(env: dict[str, str], workdir: Path) -> None:
    key = make_key(env, workdir, "tasks:read")["key"]
    with background("api", "--port", "0", env=env, cwd=workdir) as process:
        url = wait_for("the API URL", lambda: printed_url(workdir))
        streams = [EventStream(f"{url}/api/v1/events", key) for _ in range(2)]
        for stream in streams:
            assert stream.connected.wait(WAIT_S), stream.lines

        signalled = time.monotonic()
        process.send_signal(signal.SIGTERM)
        code = process.wait(timeout=WAIT_S)
        stopped_s = time.monotonic() - signalled
        for stream in streams:
            stream.thread.join(timeout=5)

    assert code == 0
    # Not uvicorn's graceful timeout (10 s) waiting for streams that never end by themselves.
    assert stopped_s < 3.0
    for stream in streams:
        assert not stream.thread.is_alive()
        assert stream.error is None  # a clean end of the response, not a broken connection
        assert "event: shutdown" in stream.lines


class EventStream:
    """A client reading ``GET /events`` in a thread, line by line, until the response ends."""

    def __init__(self, url: str, key: str) -> None:
        self.url, self.key = url, key
        self.lines: list[str] = []
        self.error: BaseException | None = None
        self.connected = threading.Event()
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        headers = {"Authorization": f"Bearer {self.key}", "Accept": "text/event-stream"}
        try:
            with httpx.stream("GET", self.url, headers=headers, timeout=WAIT_S) as response:
                assert response.status_code == 200
                for line in response.iter_lines():
                    self.lines.append(line)
                    if line == ": connected":
                        self.connected.set()
        except BaseException as exc:  # reported by the test, not lost in the thread
            self.error = exc


@pytest.mark.slow
def test_api__several_worker_processes(env: dict[str, str], workdir: Path) -> None:
    key = make_key(env, workdir, "tasks:read")["key"]
    port = free_port()
    with background("api", "--port", str(port), "--workers", "2", "--app", APP, env=env, cwd=workdir) as process:
        url = f"http://127.0.0.1:{port}"

        def ready() -> bool:
            try:
                return get(f"{url}/health/ready").status_code == 200
            except httpx.HTTPError:
                return False

        wait_for("the API to answer", ready)
        answers = {get(f"{url}/api/v1/tasks", key).status_code for _ in range(10)}
        # Enough streams that both processes almost surely hold some (connections are spread by the
        # kernel); each process must end its own.
        streams = [EventStream(f"{url}/api/v1/events", key) for _ in range(6)]
        for stream in streams:
            assert stream.connected.wait(WAIT_S), stream.lines

        signalled = time.monotonic()
        process.send_signal(signal.SIGTERM)
        code = process.wait(timeout=WAIT_S)
        stopped_s = time.monotonic() - signalled
        for stream in streams:
            stream.thread.join(timeout=5)

    assert code == 0
    assert answers == {200}
    # Not uvicorn's graceful timeout (10 s) in each process, waiting for streams that never end.
    assert stopped_s < 6.0
    for stream in streams:
        assert not stream.thread.is_alive()
        assert stream.error is None
        assert "event: shutdown" in stream.lines


def test_api__the_socket_listens_before_the_server_starts() -> None:
    # `conveyor up` and `conveyor api` print the URL, then start uvicorn: a client that connects in
    # between must be queued by the kernel, not refused.
    from conveyor.cli.api import _bind

    sock = _bind("127.0.0.1", 0)
    try:
        with socket.create_connection(sock.getsockname(), timeout=5):
            pass
    finally:
        sock.close()


@pytest.mark.slow
def test_api__a_busy_port_is_one_line_error(env: dict[str, str], workdir: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]

        line = assert_one_line_error(conveyor("api", "--port", str(port), env=env, cwd=workdir))

    assert f"cannot listen on 127.0.0.1:{port}" in line


def test_api_keys__create_list_revoke(env: dict[str, str], workdir: Path) -> None:
    created = conveyor("api-keys", "create", "--scopes", "tasks:read,tasks:write", "--name", "ci", env=env, cwd=workdir)
    key = ok(created).strip()
    assert re.fullmatch(r"cvk_[A-Za-z0-9_-]{43}", key)
    assert "shown once" in created.stderr

    listed = json.loads(ok(conveyor("api-keys", "list", "--json", env=env, cwd=workdir)))
    assert [(k["name"], k["scopes"], k["prefix"]) for k in listed] == [("ci", ["tasks:read", "tasks:write"], key[:12])]
    assert key not in json.dumps(listed)

    ok(conveyor("api-keys", "revoke", str(listed[0]["id"]), env=env, cwd=workdir))
    listed = json.loads(ok(conveyor("api-keys", "list", "--json", env=env, cwd=workdir)))
    assert listed[0]["revoked_at"] is not None

    assert "no API key with id 99" in assert_one_line_error(conveyor("api-keys", "revoke", "99", env=env, cwd=workdir))
    bad = assert_one_line_error(conveyor("api-keys", "create", "--scopes", "root", env=env, cwd=workdir))
    assert "--scopes" in bad


@pytest.mark.slow
def test_api__a_revoked_key_is_refused_within_seconds(env: dict[str, str], workdir: Path) -> None:
    made = make_key(env, workdir, "tasks:read")
    with background("api", "--port", "0", env=env, cwd=workdir) as process:
        url = wait_for("the API URL", lambda: printed_url(workdir))
        assert get(f"{url}/api/v1/tasks", made["key"]).status_code == 200

        ok(conveyor("api-keys", "revoke", str(made["id"]), env=env, cwd=workdir))
        revoked_at = time.monotonic()
        wait_for("the key to be refused", lambda: get(f"{url}/api/v1/tasks", made["key"]).status_code == 401)

        assert time.monotonic() - revoked_at < 3.0
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=WAIT_S) == 0


@pytest.mark.slow
def test_up__serves_the_api_and_prints_an_admin_key_on_first_start_only(env: dict[str, str], workdir: Path) -> None:
    with background("up", "--app", APP, "--port", "0", env=env, cwd=workdir) as process:
        url = wait_for("the API URL", lambda: printed_url(workdir))
        wait_for("the services", lambda: "api started" in (workdir / "stdout.log").read_text())
        output = (workdir / "stdout.log").read_text()
        found = re.search(r"admin API key \(shown this once, keep it\): (cvk_\S+)", output)
        assert found, output
        key = found.group(1)

        enqueued = httpx.post(
            f"{url}/api/v1/tasks",
            json={"name": "add", "args": [20, 22]},
            headers={"Authorization": f"Bearer {key}"},
            timeout=30,
        )
        result = get(f"{url}/api/v1/tasks/{enqueued.json()['id']}/result", key, params={"wait": 20}).json()
        workers = get(f"{url}/api/v1/workers", key).json()["items"]

        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=WAIT_S) == 0
    assert result == {"id": enqueued.json()["id"], "state": "succeeded", "ready": True, "result": 42, "error": None}
    assert len(workers) == 1 and "add" in workers[0]["task_names"]
    assert key not in (workdir / "stderr.log").read_text()

    # The second start finds an admin key: it makes and prints none, and the first one still works.
    with background("up", "--app", APP, "--port", "0", env=env, cwd=workdir) as process:
        url = wait_for("the API URL", lambda: printed_url(workdir))
        wait_for("the services", lambda: "api started" in (workdir / "stdout.log").read_text())
        assert "admin API key" not in (workdir / "stdout.log").read_text()
        assert get(f"{url}/api/v1/queues", key).status_code == 200
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=WAIT_S) == 0
