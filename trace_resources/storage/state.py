"""The schema of Postgres state: the table definitions (SQLAlchemy Core) of the dataset
registry and schemas, fences, attempts, versions, current-version pointers, commit keys, the
outbox, quality results, reader pins and the GC queue; and the pooled engine per database.

Only modules of this package query them: the version store's concerns (`version_store.py`)
and the access rule (`access.py`, which reads the registry's dataset names); everything else
reads through the read model (`read_model.py`). The query service's tables are defined on the
same `metadata` by the modules that own them (`access.py`, `snapshots.py`, `saved_queries.py`,
`exports.py`, `rate_limits.py`); the schema is made by the migrations (`migrations/`).
"""

from __future__ import annotations

import threading

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import JSONB, UUID

from trace_resources.storage.migrations import open_engine

__all__ = [
    "metadata",
    "datasets",
    "dataset_schemas",
    "fences",
    "attempts",
    "versions",
    "pointers",
    "outbox",
    "commit_keys",
    "pins",
    "gc_queue",
    "quality_results",
    "segments",
    "segment_keys",
    "engine_for",
    "dispose_engine",
]

metadata = sa.MetaData()

_now = sa.func.now()

datasets = sa.Table(
    "trace_datasets",
    metadata,
    sa.Column("name", sa.Text, primary_key=True),
    sa.Column("commit_mode", sa.Text, nullable=False),
    sa.Column("current_schema_version", sa.Integer, nullable=False),
    sa.Column("created_at", sa.DateTime(timezone=True), server_default=_now, nullable=False),
)

dataset_schemas = sa.Table(
    "trace_dataset_schemas",
    metadata,
    sa.Column("dataset", sa.Text, primary_key=True),
    sa.Column("schema_version", sa.Integer, primary_key=True),
    sa.Column("schema_hash", sa.Text, nullable=False),
    sa.Column("schema_json", JSONB, nullable=False),
    sa.Column("drift", JSONB, nullable=True),
    sa.Column("created_at", sa.DateTime(timezone=True), server_default=_now, nullable=False),
)

fences = sa.Table(
    "trace_fences",
    metadata,
    sa.Column("dataset", sa.Text, primary_key=True),
    sa.Column("partition_key", sa.Text, primary_key=True),
    sa.Column("fence", sa.BigInteger, nullable=False),
)

attempts = sa.Table(
    "trace_attempts",
    metadata,
    sa.Column("attempt_id", UUID(as_uuid=False), primary_key=True),
    sa.Column("dataset", sa.Text, nullable=False),
    sa.Column("partition_key", sa.Text, nullable=False),
    sa.Column("fence", sa.BigInteger, nullable=False),
    sa.Column("run_id", sa.Text, nullable=True),
    sa.Column("step_key", sa.Text, nullable=True),
    sa.Column("retry_number", sa.Integer, nullable=False, server_default="0"),
    # staging -> committed | unchanged | fenced | failed | abandoned ('unchanged': a replace
    # identical to the current version; `committed_version` is the version it kept)
    sa.Column("state", sa.Text, nullable=False),
    sa.Column("lease_expires_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("committed_version", sa.Integer, nullable=True),
    sa.Column("created_at", sa.DateTime(timezone=True), server_default=_now, nullable=False),
    sa.Column("updated_at", sa.DateTime(timezone=True), server_default=_now, nullable=False),
    sa.Index("trace_attempts_by_partition", "dataset", "partition_key"),
    # staging cleanup finds expired leases among the live attempts only
    sa.Index(
        "trace_attempts_live", "lease_expires_at", postgresql_where=sa.text("state = 'staging'")
    ),
)

versions = sa.Table(
    "trace_versions",
    metadata,
    sa.Column("dataset", sa.Text, primary_key=True),
    sa.Column("partition_key", sa.Text, primary_key=True),
    sa.Column("version", sa.Integer, primary_key=True),
    sa.Column("attempt_id", UUID(as_uuid=False), nullable=False, unique=True),
    sa.Column("commit_mode", sa.Text, nullable=False),
    sa.Column("schema_version", sa.Integer, nullable=False),
    sa.Column("manifest", JSONB, nullable=False),
    sa.Column("row_count", sa.BigInteger, nullable=False),
    sa.Column("byte_count", sa.BigInteger, nullable=False),
    sa.Column("created_at", sa.DateTime(timezone=True), server_default=_now, nullable=False),
)

pointers = sa.Table(
    "trace_pointers",
    metadata,
    sa.Column("dataset", sa.Text, primary_key=True),
    sa.Column("partition_key", sa.Text, primary_key=True),
    sa.Column("current_version", sa.Integer, nullable=False),
    sa.Column("updated_at", sa.DateTime(timezone=True), server_default=_now, nullable=False),
)

outbox = sa.Table(
    "trace_outbox",
    metadata,
    sa.Column("id", sa.BigInteger, sa.Identity(), primary_key=True),
    sa.Column("event_type", sa.Text, nullable=False),
    sa.Column("dataset", sa.Text, nullable=False),
    sa.Column("partition_key", sa.Text, nullable=False),
    sa.Column("version", sa.Integer, nullable=False),
    sa.Column("payload", JSONB, nullable=False),
    sa.Column("created_at", sa.DateTime(timezone=True), server_default=_now, nullable=False),
    sa.Column("relayed_at", sa.DateTime(timezone=True), nullable=True),
    # the unit of work that committed it (`trace history`; state_0010), NULL: none carried
    sa.Column("correlation_id", sa.Text, nullable=True),
    # the relay looks only at what it has not relayed yet
    sa.Index("trace_outbox_unrelayed", "id", postgresql_where=sa.text("relayed_at IS NULL")),
    # a version's event (its correlation id: `outbox.correlations`; state_0012)
    sa.Index("trace_outbox_by_version", "dataset", "partition_key", "version"),
)

# Which version a logical writer committed: a Dagster step and its retries (see
# `io_manager.commit_key_for`) commit each (dataset, partition) at most once, as Delta's
# transaction identifiers (txn appId) make a retried write a no-op. Kept when GC removes the
# version, so that a late retry never commits superseded data again.
commit_keys = sa.Table(
    "trace_commit_keys",
    metadata,
    sa.Column("dataset", sa.Text, primary_key=True),
    sa.Column("partition_key", sa.Text, primary_key=True),
    sa.Column("commit_key", sa.Text, primary_key=True),
    sa.Column("version", sa.Integer, nullable=False),
    sa.Column("attempt_id", UUID(as_uuid=False), nullable=False),
    sa.Column("created_at", sa.DateTime(timezone=True), server_default=_now, nullable=False),
)

# Quality rule outcomes of committed versions (the raw datasets' checks run after the commit):
# one row per (dataset, partition, version, rule). Readers that feed derived datasets refuse a
# version with a failed blocking rule, in any later run, until a new version replaces it.
quality_results = sa.Table(
    "trace_quality_results",
    metadata,
    sa.Column("dataset", sa.Text, primary_key=True),
    sa.Column("partition_key", sa.Text, primary_key=True),
    sa.Column("version", sa.Integer, primary_key=True),
    sa.Column("rule", sa.Text, primary_key=True),
    sa.Column("passed", sa.Boolean, nullable=False),
    sa.Column("blocking", sa.Boolean, nullable=False),
    sa.Column("failing_rows", sa.BigInteger, nullable=False),
    sa.Column("rows", sa.BigInteger, nullable=False),
    sa.Column("threshold", sa.Float, nullable=False),
    sa.Column("examples", JSONB, nullable=False),
    sa.Column("run_id", sa.Text, nullable=True),
    sa.Column("evaluated_at", sa.DateTime(timezone=True), server_default=_now, nullable=False),
)

# Versions a reader is reading: GC never removes a version with an unexpired pin.
pins = sa.Table(
    "trace_pins",
    metadata,
    sa.Column("reader_id", sa.Text, primary_key=True),
    sa.Column("dataset", sa.Text, primary_key=True),
    sa.Column("partition_key", sa.Text, primary_key=True),
    sa.Column("version", sa.Integer, primary_key=True),
    sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("created_at", sa.DateTime(timezone=True), server_default=_now, nullable=False),
    sa.Index("trace_pins_by_version", "dataset", "partition_key", "version"),
)

# Files of removed versions, queued in the transaction that removed the versions and deleted
# afterwards: a GC killed between the two finishes on its next run (a write-ahead log).
gc_queue = sa.Table(
    "trace_gc_queue",
    metadata,
    sa.Column("key", sa.Text, primary_key=True),
    sa.Column("dataset", sa.Text, nullable=False),
    sa.Column("reason", sa.Text, nullable=False),
    sa.Column("queued_at", sa.DateTime(timezone=True), server_default=_now, nullable=False),
)


# Append mode ("segments as rows"): each append to an open partition is one row here, so an
# append costs the same whatever the partition holds. A version of an open partition lists
# only its base (compacted) files in its manifest and the live window of segments
# `live_from_seq < seq <= through_seq` (manifest keys), whose files readers add in seq order.
segments = sa.Table(
    "trace_segments",
    metadata,
    sa.Column("dataset", sa.Text, primary_key=True),
    sa.Column("partition_key", sa.Text, primary_key=True),
    sa.Column("seq", sa.BigInteger, primary_key=True),
    sa.Column("attempt_id", UUID(as_uuid=False), nullable=False),
    sa.Column("version", sa.Integer, nullable=False),  # the version the append made
    sa.Column("files", JSONB, nullable=False),
    sa.Column("row_count", sa.BigInteger, nullable=False),
    sa.Column("byte_count", sa.BigInteger, nullable=False),
    sa.Column("first_block", sa.BigInteger, nullable=True),
    sa.Column("last_block", sa.BigInteger, nullable=True),
    sa.Column("source", JSONB, nullable=True),
    sa.Column("created_at", sa.DateTime(timezone=True), server_default=_now, nullable=False),
)

# The idempotency keys of appends (e.g. "block:123"), one row per key: a retried append finds
# its keys here. Kept while the partition has an open version (GC removes them with the
# partition's segments once no open version of it remains).
segment_keys = sa.Table(
    "trace_segment_keys",
    metadata,
    sa.Column("dataset", sa.Text, primary_key=True),
    sa.Column("partition_key", sa.Text, primary_key=True),
    sa.Column("key", sa.Text, primary_key=True),
    sa.Column("seq", sa.BigInteger, nullable=False),
)


_engines: dict[str, sa.Engine] = {}
_engines_lock = threading.Lock()


def engine_for(dsn: str) -> sa.Engine:
    """One pooled engine per database per process, checked once to be at the head revision
    (`SchemaNotCurrentError` otherwise: the tables are made by `trace db upgrade`)."""
    with _engines_lock:
        engine = _engines.get(dsn)
        if engine is None:
            engine = open_engine(dsn, "state")
            _engines[dsn] = engine
    return engine


def dispose_engine(dsn: str) -> None:
    """Close the pooled connections to one database (e.g. a test's, before it is dropped)."""
    with _engines_lock:
        engine = _engines.pop(dsn, None)
    if engine is not None:
        engine.dispose()
