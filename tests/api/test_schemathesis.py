"""Schema-driven testing of the live API: schemathesis reads /openapi.json from a real uvicorn server
and checks that no input yields a server error, that every answer (status, content type, headers, body)
is one the document promises, and that data violating the document is refused.

It runs twice at once: with an admin key (examples plus the deterministic coverage phase: boundary and
negative values for every parameter) and with a read-only key (examples plus random fuzzing; writes
must answer 403 as documented). Left out: revoking API keys (it would revoke the run's own key at
random; covered in test_auth) and the event stream (a response that never ends).
"""

from __future__ import annotations

import asyncio
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import uvicorn

from conveyor.api.app import create_app
from tests.api.conftest import TEST_AUTH, Keys, make_keys, new_app

CHECKS = ",".join(
    [
        "not_a_server_error",
        "status_code_conformance",
        "content_type_conformance",
        "response_headers_conformance",
        "response_schema_conformance",
        "negative_data_rejection",
    ]
)
EXCLUDED = ["/api/v1/admin/api-keys/{key_id}", "/api/v1/events"]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def live_api(database_url: str) -> Iterator[tuple[str, Keys]]:
    app = new_app(database_url)
    keys = app.run_sync(make_keys(app))
    port = _free_port()
    config = uvicorn.Config(create_app(app, auth=TEST_AUTH), host="127.0.0.1", port=port, log_level="warning")
    server = uvicorn.Server(config)

    async def serve() -> None:
        try:
            await server.serve()
        finally:
            await app.aclose()  # the engine of the server's loop

    thread = threading.Thread(target=asyncio.run, args=(serve(),), daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline, "the API server did not start"
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}", keys
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        app.close()


def _run(base_url: str, key: str, phases: str, max_examples: int, cwd: Path) -> subprocess.Popen[str]:
    binary = Path(sys.executable).parent / "schemathesis"
    assert binary.exists(), "schemathesis is not installed: pip install -e '.[dev]'"
    command = [
        str(binary),
        "run",
        f"{base_url}/openapi.json",
        "--header",
        f"Authorization: Bearer {key}",
        "--checks",
        CHECKS,
        "--phases",
        phases,
        "--max-examples",
        str(max_examples),
        "--seed",
        "20261122",
        "--no-shrink",
        "--request-timeout",
        "10",
        *[arg for path in EXCLUDED for arg in ("--exclude-path", path)],
    ]
    return subprocess.Popen(command, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_schemathesis__admin_and_read_only_keys(live_api: tuple[str, Keys], tmp_path: Path) -> None:
    base_url, keys = live_api
    runs = {
        "admin": _run(base_url, keys.admin, "examples,coverage", 20, tmp_path),
        "read-only": _run(base_url, keys.reader, "examples,fuzzing", 10, tmp_path),
    }
    failed = []
    for label, process in runs.items():
        output, _ = process.communicate(timeout=280)
        if process.returncode != 0:
            failed.append(f"--- schemathesis with the {label} key (exit {process.returncode}) ---\n{output[-12000:]}")
    assert not failed, "\n".join(failed)
