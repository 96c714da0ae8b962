"""Tables of the HTTP API's authentication (API keys), and the indexes the API's task lists need.
Schema changes go with migration 0002."""

from __future__ import annotations

from sqlalchemy import BigInteger, CheckConstraint, Column, DateTime, Identity, Index, Table, Text, func, text
from sqlalchemy.dialects.postgresql import ARRAY

from conveyor.db.models import metadata, tasks

#: Every scope a key can hold; the check constraint keeps the table to these.
SCOPES = ("tasks:read", "tasks:write", "admin")

api_keys = Table(
    "conveyor_api_keys",
    metadata,
    Column("id", BigInteger, Identity(always=False), primary_key=True),
    Column("name", Text, nullable=False),
    # The key's first characters, so people can tell keys apart in a list; never enough to use it.
    Column("prefix", Text, nullable=False),
    # sha256 of the whole key. The key itself is shown once, at creation, and stored nowhere.
    Column("key_hash", Text, nullable=False),
    Column("scopes", ARRAY(Text), nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    Column("last_used_at", DateTime(timezone=True), nullable=True),
    Column("revoked_at", DateTime(timezone=True), nullable=True),
    CheckConstraint(
        "cardinality(scopes) > 0 AND scopes <@ ARRAY['tasks:read', 'tasks:write', 'admin']::text[]",
        name="scopes_known",
    ),
    Index("ix_conveyor_api_keys_key_hash", "key_hash", unique=True),
)

# -- indexes on conveyor_tasks for the API's lists and statistics ---------------------------------
# Keyset pages filtered by one column walk (column, id) in id order and stop after one page, however
# rare the value: without them a filter that matches few of a million rows scans the primary key to
# the end. Each sort the API offers is an index walk too (a sort without one is a top-N sort of every
# matching row: ~0.7 s at a million). The two sort indexes are partial, so they cost nothing for the
# rows they leave out: finished_at (also "throughput in the last minute") holds finished tasks only,
# waiting_run_at waiting tasks only.
Index("ix_conveyor_tasks_state_id", tasks.c.state, tasks.c.id)
Index("ix_conveyor_tasks_queue_id", tasks.c.queue, tasks.c.id)
Index("ix_conveyor_tasks_name_id", tasks.c.name, tasks.c.id)
Index(
    "ix_conveyor_tasks_finished_at",
    tasks.c.finished_at,
    tasks.c.id,
    postgresql_where=text("finished_at IS NOT NULL"),
)
Index(
    "ix_conveyor_tasks_waiting_run_at",
    tasks.c.run_at,
    tasks.c.id,
    postgresql_where=text("state IN ('scheduled', 'queued')"),
)
