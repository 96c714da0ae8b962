"""Conveyor against PgQueuer in one sitting: runs bench_core.py, then reference_pgqueuer.py, against the
same PostgreSQL server, and prints the ratio Conveyor/PgQueuer for each figure. Asserts nothing.

    .venv/bin/python benchmarks/compare.py [--server-url URL] [--tasks 50000] [--repeat 3] [--latency-seconds 10]

Without --server-url it starts a private PostgreSQL from the embedded binaries (fsync on), as bench_core
does without --database-url, and deletes it afterwards. Each script gets a database of its own on that
server (created if missing): bench_core gets conveyor_vs_pgq (with --big 0, as PgQueuer has no
counterpart of the 1,000,000-queued run, and --task anoop, as PgQueuer's entrypoints are async), the
reference gets pgq_perf. The reference runs under --pgqueuer-python, a virtualenv with pgqueuer
(reference_pgqueuer.py's docstring says how to make it); Conveyor never imports PgQueuer. The two
scripts run one after the other, never at the same time. Rates: a ratio above 1 means Conveyor is
faster. Latencies: a ratio below 1 means Conveyor starts tasks sooner.
"""

from __future__ import annotations

import argparse
import re
import shlex
import shutil
import subprocess
import tempfile
from pathlib import Path
from urllib.parse import urlsplit

import psycopg
from psycopg import sql

HERE = Path(__file__).resolve().parent
REPO = HERE.parent

# (label, unit, pattern): each pattern reads one figure from the lines both scripts print.
FIGURES = [
    ("bulk enqueue", "tasks/s", r"^bulk enqueue:\s+([\d,.]+) tasks/s"),
    ("drain, 1 process", "tasks/s", r"^drain, 1 process:\s+([\d,.]+) tasks/s"),
    ("drain, 2 processes", "tasks/s", r"^drain, 2 processes:\s+([\d,.]+) tasks/s"),
    ("latency p50", "ms", r"latency at 200 tasks/s: p50 ([\d.]+) ms"),
    ("latency p95", "ms", r"latency at 200 tasks/s: .*p95 ([\d.]+) ms"),
    ("latency p99", "ms", r"latency at 200 tasks/s: .*p99 ([\d.]+) ms"),
]


def ensure_database(server_url: str, name: str) -> str:
    """The URL of database ``name`` on the server of ``server_url``, created if it does not exist."""
    with psycopg.connect(server_url, autocommit=True) as conn:
        if conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone() is None:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    return urlsplit(server_url)._replace(path=f"/{name}").geturl()


def run(command: list[str]) -> str:
    """Run one script, echoing its output as it comes, and return that output."""
    print("$ " + shlex.join(command), flush=True)
    lines: list[str] = []
    with subprocess.Popen(command, stdout=subprocess.PIPE, text=True, cwd=REPO) as proc:
        assert proc.stdout is not None
        for line in proc.stdout:
            print(line, end="", flush=True)
            lines.append(line)
    if proc.returncode != 0:
        raise SystemExit(f"{command[1]} exited with {proc.returncode}")
    return "".join(lines)


def figures(output: str) -> dict[str, float]:
    found: dict[str, float] = {}
    for label, _, pattern in FIGURES:
        match = re.search(pattern, output, re.MULTILINE)
        if match is None:
            raise SystemExit(f"no {label!r} figure in the output")
        found[label] = float(match.group(1).replace(",", ""))
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", type=int, default=50_000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--latency-seconds", type=float, default=10.0)
    parser.add_argument("--conveyor-python", default=str(REPO / ".venv" / "bin" / "python"))
    parser.add_argument("--pgqueuer-python", default="/tmp/pgq-venv/bin/python")
    parser.add_argument(
        "--server-url", help="a PostgreSQL server to use, e.g. postgresql://postgres@127.0.0.1:5432/postgres"
    )
    parser.add_argument("--pgqueuer-args", default="", help="more options for the reference, e.g. '--driver psycopg'")
    args = parser.parse_args()

    server = None
    tmp: Path | None = None
    server_url = args.server_url
    if server_url is None:
        from conveyor.db.embedded import EmbeddedPostgres

        tmp = Path(tempfile.mkdtemp(prefix="conveyor-compare-"))
        tmp.chmod(0o755)
        server = EmbeddedPostgres(tmp / "data", ephemeral=True)
        server_url = server.start()
    common = ["--tasks", str(args.tasks), "--repeat", str(args.repeat), "--latency-seconds", str(args.latency_seconds)]
    try:
        conveyor_url = ensure_database(server_url, "conveyor_vs_pgq")
        pgq_url = ensure_database(server_url, "pgq_perf")
        bench_core = [args.conveyor_python, str(HERE / "bench_core.py"), "--database-url", conveyor_url]
        bench_core += ["--big", "0", "--task", "anoop"]
        conveyor = figures(run([*bench_core, *common]))
        print()
        reference = [args.pgqueuer_python, str(HERE / "reference_pgqueuer.py"), "--database-url", pgq_url]
        pgq = figures(run([*reference, *common, *shlex.split(args.pgqueuer_args)]))
    finally:
        if server is not None:
            server.stop()
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)

    print(f"\nConveyor / PgQueuer, {args.tasks} no-op tasks, median of {args.repeat} runs, same PostgreSQL")
    print(f"{'figure':<22}{'Conveyor':>14}{'PgQueuer':>14}{'ratio':>8}")
    for label, unit, _ in FIGURES:
        ratio = conveyor[label] / pgq[label] if pgq[label] else float("nan")
        digits = 0 if unit == "tasks/s" else 2
        better = "higher is better" if unit == "tasks/s" else "lower is better"
        print(f"{label:<22}{conveyor[label]:>14,.{digits}f}{pgq[label]:>14,.{digits}f}{ratio:>8.2f}  {unit}, {better}")


if __name__ == "__main__":
    main()
