"""Tables of the debug routes: requests the API leaves for a worker to answer. Schema changes go with
migration 0005.

A stack dump goes through the database, not a side channel: the API inserts a request for a worker,
the worker sees it at its next heartbeat (a look-up in the partial index below, which only ever holds
unanswered requests, so it stays a handful of entries) and writes its answer into the same row.
"""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    CheckConstraint,
    Column,
    DateTime,
    ForeignKey,
    Identity,
    Index,
    Table,
    Text,
    func,
    text,
)
from sqlalchemy.dialects.postgresql import JSONB, UUID

from conveyor.db.models import metadata

debug_requests = Table(
    "conveyor_debug_requests",
    metadata,
    Column("id", BigInteger, Identity(always=False), primary_key=True),
    Column(
        "worker_id",
        UUID(as_uuid=False),
        ForeignKey("conveyor_workers.id", ondelete="CASCADE"),
        nullable=False,
    ),
    Column("kind", Text, nullable=False),
    Column("requested_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    # A worker never answers a request nobody waits for any more (the API gave up, or it was restarted).
    Column("expires_at", DateTime(timezone=True), nullable=False),
    Column("answered_at", DateTime(timezone=True), nullable=True),
    Column("result", JSONB, nullable=True),
    CheckConstraint("kind IN ('stacks')", name="kind_known"),
    Index("ix_conveyor_debug_requests_pending", "worker_id", postgresql_where=text("answered_at IS NULL")),
)
