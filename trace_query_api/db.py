"""The query service's tables in Postgres state (created by the service, next to the
version store's tables, which it only reads).

    trace_query_revoked_tokens   token ids refused from now on (`trace token revoke`)
    trace_query_public_datasets  datasets published to every organisation (`trace public add`)

The service's other tables are defined, with all their SQL, in `trace_resources.storage`:
snapshots (`snapshots.py`), saved queries (`saved_queries.py`), export jobs (`exports.py`) and
rate-limit buckets (`rate_limits.py`); `query_db` creates them too.
"""

from __future__ import annotations

import functools

import sqlalchemy as sa

from trace_resources.storage import exports, rate_limits, saved_queries, snapshots, state
from trace_resources.storage.state import engine_for

__all__ = [
    "metadata",
    "revoked_tokens",
    "public_datasets",
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

_STORAGE_TABLES = [
    snapshots.snapshots,
    saved_queries.saved_queries,
    exports.exports,
    rate_limits.rate_buckets,
]


@functools.cache
def query_db(dsn: str) -> sa.Engine:
    """The pooled engine of Postgres state, with the version store's and our tables created."""
    engine = engine_for(dsn)
    with engine.begin() as conn:
        conn.execute(sa.text("SELECT pg_advisory_xact_lock(7260110004)"))
        metadata.create_all(conn, checkfirst=True)
        # `engine_for` may have created the state tables before these modules were imported
        state.metadata.create_all(conn, tables=_STORAGE_TABLES, checkfirst=True)
    return engine
