"""The query service's engine on Postgres state.

The service's tables are defined, with all their SQL, in `trace_resources.storage`: published
datasets and revoked tokens (`access.py`), snapshots (`snapshots.py`), saved queries
(`saved_queries.py`), export jobs (`exports.py`) and rate-limit buckets (`rate_limits.py`).
"""

from __future__ import annotations

import functools

import sqlalchemy as sa

from trace_resources.storage import access, exports, rate_limits, saved_queries, snapshots, state

__all__ = ["query_db"]

# the modules that define the service's tables on `state.metadata`
_TABLE_MODULES = (access, exports, rate_limits, saved_queries, snapshots)


@functools.cache
def query_db(dsn: str) -> sa.Engine:
    """The pooled engine of Postgres state, with the version store's and our tables created."""
    engine = state.engine_for(dsn)
    with engine.begin() as conn:
        conn.execute(sa.text("SELECT pg_advisory_xact_lock(7260110004)"))
        # `engine_for` may have created the state tables before these modules were imported
        state.metadata.create_all(conn, checkfirst=True)
    return engine
