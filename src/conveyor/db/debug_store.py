"""What the debug routes read: the database's own statistics and locks, and stack dumps of workers.

A stack dump is a request row (``conveyor_debug_requests``): the API inserts it, the worker finds it at
its next heartbeat (:func:`pending_requests`, an index probe of a partial index that only ever holds
unanswered requests), writes its dump into the row (:func:`answer_request`), and the API, polling the
row by primary key, reads and deletes it. A request carries an expiry, so a worker never answers a
request nobody waits for, and nothing accumulates.

The statistics read ``pg_stat_*`` views, bounded: conveyor tables only, locks up to a limit. A lock's
query text is shown for Conveyor's own sessions only (whose statements carry parameters separately,
never literal values); other applications sharing the database may have secrets in theirs.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy.ext.asyncio import AsyncEngine

from conveyor.db.errors import translate_errors
from conveyor.db.executors import Row, execute_async
from conveyor.db.hot_pool import HotPool

_REQUEST = """
INSERT INTO conveyor_debug_requests (worker_id, kind, expires_at)
VALUES (%(worker_id)s::uuid, %(kind)s, now() + make_interval(secs => %(ttl_s)s))
RETURNING id
"""
_ANSWER_OF = "SELECT answered_at, result FROM conveyor_debug_requests WHERE id = %(id)s"
_DISCARD = "DELETE FROM conveyor_debug_requests WHERE id = %(id)s"
_PENDING = """
SELECT id, kind FROM conveyor_debug_requests
WHERE worker_id = %(worker_id)s::uuid AND answered_at IS NULL AND expires_at > now()
ORDER BY id
"""
_ANSWER = """
UPDATE conveyor_debug_requests SET answered_at = now(), result = %(result)s::jsonb
WHERE id = %(id)s AND answered_at IS NULL
"""

_TABLES = """
SELECT s.relname AS name, s.n_live_tup AS live_rows, s.n_dead_tup AS dead_rows,
       s.seq_scan, s.seq_tup_read, COALESCE(s.idx_scan, 0) AS idx_scan, COALESCE(s.idx_tup_fetch, 0) AS idx_tup_fetch,
       s.n_tup_ins AS inserted, s.n_tup_upd AS updated, s.n_tup_hot_upd AS hot_updated, s.n_tup_del AS deleted,
       s.last_vacuum, s.last_autovacuum, s.last_analyze, s.last_autoanalyze,
       s.vacuum_count, s.autovacuum_count,
       pg_relation_size(s.relid) AS table_bytes, pg_total_relation_size(s.relid) AS total_bytes
FROM pg_stat_user_tables s
WHERE s.relname LIKE 'conveyor\\_%%'
ORDER BY s.relname
"""

_CONNECTIONS = """
SELECT COALESCE(state, 'unknown') AS state,
       CASE WHEN application_name LIKE 'conveyor%%' THEN application_name ELSE 'other' END AS application,
       count(*) AS n,
       max(EXTRACT(EPOCH FROM now() - xact_start))::float8 AS oldest_xact_age_s
FROM pg_stat_activity
WHERE datname = current_database() AND backend_type = 'client backend'
GROUP BY 1, 2
ORDER BY 2, 1
"""

_SERVER = """
SELECT current_setting('server_version') AS version,
       current_setting('max_connections')::int AS max_connections,
       pg_database_size(current_database()) AS database_bytes,
       (SELECT count(*) FROM pg_stat_activity) AS connections
"""

_LOCKS = """
SELECT l.locktype, l.mode, l.granted, l.pid,
       CASE WHEN l.relation IS NOT NULL THEN l.relation::regclass::text END AS relation,
       l.transactionid::text AS transaction_id,
       CASE WHEN a.application_name LIKE 'conveyor%%' THEN a.application_name ELSE 'other' END AS application,
       a.state, a.wait_event_type, a.wait_event,
       EXTRACT(EPOCH FROM now() - a.xact_start)::float8 AS xact_age_s,
       EXTRACT(EPOCH FROM now() - a.query_start)::float8 AS query_age_s,
       CASE WHEN a.application_name LIKE 'conveyor%%' THEN left(a.query, %(query_chars)s) END AS query,
       pg_blocking_pids(l.pid) AS blocked_by,
       count(*) OVER () AS total
FROM pg_locks l
JOIN pg_stat_activity a ON a.pid = l.pid
WHERE a.datname = current_database() AND l.pid <> pg_backend_pid()
ORDER BY l.granted, a.xact_start NULLS LAST, l.pid
LIMIT %(limit)s
"""


@dataclass(frozen=True)
class DatabaseStats:
    server: Row
    tables: list[Row]
    connections: list[Row]


@dataclass(frozen=True)
class Locks:
    total: int
    items: list[Row]


class DebugStore:
    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine

    async def database(self) -> DatabaseStats:
        with translate_errors():
            async with self.engine.connect() as conn:
                server = (await execute_async(conn, _SERVER, {}))[0]
                tables = await execute_async(conn, _TABLES, {})
                connections = await execute_async(conn, _CONNECTIONS, {})
        return DatabaseStats(server=server, tables=tables, connections=connections)

    async def locks(self, limit: int, query_chars: int = 300) -> Locks:
        with translate_errors():
            async with self.engine.connect() as conn:
                rows = await execute_async(conn, _LOCKS, {"limit": limit, "query_chars": query_chars})
        return Locks(total=int(rows[0]["total"]) if rows else 0, items=rows)

    # -- requests to workers ---------------------------------------------------------------------

    async def request(self, worker_id: str, kind: str, ttl_s: float) -> int:
        with translate_errors():
            async with self.engine.begin() as conn:
                rows = await execute_async(conn, _REQUEST, {"worker_id": worker_id, "kind": kind, "ttl_s": ttl_s})
        return int(rows[0]["id"])

    async def answer_of(self, request_id: int) -> tuple[datetime, Any] | None:
        """The answer (when, what) once the worker has written it; None until then."""
        with translate_errors():
            async with self.engine.connect() as conn:
                rows = await execute_async(conn, _ANSWER_OF, {"id": request_id})
        if not rows or rows[0]["answered_at"] is None:
            return None
        return rows[0]["answered_at"], rows[0]["result"]

    async def discard(self, request_id: int) -> None:
        with translate_errors():
            async with self.engine.begin() as conn:
                await execute_async(conn, _DISCARD, {"id": request_id})


# -- the worker's side (its hot pool: autocommit, no SQLAlchemy on the heartbeat path) ---------------


async def pending_requests(hot: HotPool, worker_id: str) -> list[tuple[int, str]]:
    rows = await hot.fetch(_PENDING, {"worker_id": worker_id})
    return [(int(r["id"]), str(r["kind"])) for r in rows]


async def answer_request(hot: HotPool, request_id: int, result: Any) -> None:
    await hot.fetch(_ANSWER, {"id": request_id, "result": json.dumps(result, separators=(",", ":"))})
