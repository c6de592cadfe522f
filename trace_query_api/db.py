"""The query service's own tables in Postgres state (made by the state migrations, next to the
version store's tables, which it only reads).

    trace_query_revoked_tokens   token ids refused from now on (`trace token revoke`)
    trace_query_public_datasets  datasets published to every organisation (`trace public add`)
    trace_query_snapshots        the dataset versions a query read, to re-run it on the same data
    trace_query_saved_queries    queries shared within an organisation
    trace_query_exports          asynchronous export jobs and where their result lies
    trace_query_rate_buckets     rate-limit state shared by every worker (UNLOGGED: losing it in
                                 a crash only resets the limits)
"""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import JSONB, UUID

from trace_resources.storage.state import engine_for

__all__ = [
    "metadata",
    "revoked_tokens",
    "public_datasets",
    "snapshots",
    "saved_queries",
    "exports",
    "rate_buckets",
    "query_db",
]

metadata = sa.MetaData()
_now = sa.func.now()

revoked_tokens = sa.Table(
    "trace_query_revoked_tokens",
    metadata,
    sa.Column("jti", sa.Text, primary_key=True),
    sa.Column("reason", sa.Text, nullable=True),
    sa.Column("revoked_at", sa.DateTime(timezone=True), server_default=_now, nullable=False),
)

public_datasets = sa.Table(
    "trace_query_public_datasets",
    metadata,
    sa.Column("dataset", sa.Text, primary_key=True),
    sa.Column("description", sa.Text, nullable=True),
    sa.Column("published_at", sa.DateTime(timezone=True), server_default=_now, nullable=False),
)

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


def query_db(dsn: str) -> sa.Engine:
    """The pooled engine of Postgres state (the version store's and our tables)."""
    return engine_for(dsn)
