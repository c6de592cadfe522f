"""The query service's own tables in Postgres state (created by the service, next to the
version store's tables, which it only reads; the published datasets and revoked tokens are
`trace_resources.storage.access`'s).

    trace_query_snapshots        the dataset versions a query read, to re-run it on the same data
    trace_query_saved_queries    queries shared within an organisation
    trace_query_exports          asynchronous export jobs and where their result lies
    trace_query_rate_buckets     rate-limit state shared by every worker (UNLOGGED: losing it in
                                 a crash only resets the limits)
"""

from __future__ import annotations

import functools

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import JSONB, UUID

from trace_resources.storage.state import engine_for

__all__ = [
    "metadata",
    "snapshots",
    "saved_queries",
    "exports",
    "rate_buckets",
    "query_db",
]

metadata = sa.MetaData()
_now = sa.func.now()

snapshots = sa.Table(
    "trace_query_snapshots",
    metadata,
    sa.Column("id", sa.Text, primary_key=True),
    sa.Column("org", sa.Text, nullable=False),
    # {dataset: {partition_key: version}}
    sa.Column("versions", JSONB, nullable=False),
    sa.Column("created_at", sa.DateTime(timezone=True), server_default=_now, nullable=False),
)

saved_queries = sa.Table(
    "trace_query_saved_queries",
    metadata,
    sa.Column("id", UUID(as_uuid=False), primary_key=True),
    sa.Column("org", sa.Text, nullable=False),
    sa.Column("name", sa.Text, nullable=False),
    sa.Column("sql", sa.Text, nullable=False),
    sa.Column("description", sa.Text, nullable=True),
    sa.Column("created_by", sa.Text, nullable=False),
    sa.Column("created_at", sa.DateTime(timezone=True), server_default=_now, nullable=False),
    sa.UniqueConstraint("org", "name", name="trace_query_saved_queries_org_name"),
)

exports = sa.Table(
    "trace_query_exports",
    metadata,
    sa.Column("id", UUID(as_uuid=False), primary_key=True),
    sa.Column("org", sa.Text, nullable=False),
    sa.Column("subject", sa.Text, nullable=False),
    sa.Column("sql", sa.Text, nullable=False),
    sa.Column("format", sa.Text, nullable=False),
    # queued -> running -> succeeded | failed
    sa.Column("status", sa.Text, nullable=False),
    sa.Column("snapshot_id", sa.Text, nullable=False),
    sa.Column("object_key", sa.Text, nullable=True),
    sa.Column("rows", sa.BigInteger, nullable=True),
    sa.Column("bytes", sa.BigInteger, nullable=True),
    sa.Column("error", JSONB, nullable=True),
    sa.Column("created_at", sa.DateTime(timezone=True), server_default=_now, nullable=False),
    sa.Column("started_at", sa.DateTime(timezone=True), nullable=True),
    sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
    sa.Index("trace_query_exports_by_owner", "org", "subject", "created_at"),
)

rate_buckets = sa.Table(
    "trace_query_rate_buckets",
    metadata,
    sa.Column("key", sa.Text, primary_key=True),
    # theoretical arrival time of the next request (GCRA), seconds since the epoch
    sa.Column("tat", sa.Float(precision=53), nullable=False),
    prefixes=["UNLOGGED"],
)


@functools.cache
def query_db(dsn: str) -> sa.Engine:
    """The pooled engine of Postgres state, with the version store's and our tables created."""
    engine = engine_for(dsn)
    with engine.begin() as conn:
        conn.execute(sa.text("SELECT pg_advisory_xact_lock(7260110004)"))
        metadata.create_all(conn, checkfirst=True)
    return engine
