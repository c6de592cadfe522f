"""Baseline of Postgres state: the tables `metadata.create_all` made before migrations.

Revision ID: state_0001
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import JSONB, UUID

from trace_resources.storage.migrations.ops import create_table_if_missing
from trace_resources.storage.migrations.ops import created_at as _created_at

revision = "state_0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    _version_store()
    _query_service()


def _version_store() -> None:
    create_table_if_missing(
        "trace_datasets",
        sa.Column("name", sa.Text, primary_key=True),
        sa.Column("commit_mode", sa.Text, nullable=False),
        sa.Column("current_schema_version", sa.Integer, nullable=False),
        _created_at(),
    )
    create_table_if_missing(
        "trace_dataset_schemas",
        sa.Column("dataset", sa.Text, primary_key=True),
        sa.Column("schema_version", sa.Integer, primary_key=True),
        sa.Column("schema_hash", sa.Text, nullable=False),
        sa.Column("schema_json", JSONB, nullable=False),
        sa.Column("drift", JSONB, nullable=True),
        _created_at(),
    )
    create_table_if_missing(
        "trace_fences",
        sa.Column("dataset", sa.Text, primary_key=True),
        sa.Column("partition_key", sa.Text, primary_key=True),
        sa.Column("fence", sa.BigInteger, nullable=False),
    )
    if create_table_if_missing(
        "trace_attempts",
        sa.Column("attempt_id", UUID(as_uuid=False), primary_key=True),
        sa.Column("dataset", sa.Text, nullable=False),
        sa.Column("partition_key", sa.Text, nullable=False),
        sa.Column("fence", sa.BigInteger, nullable=False),
        sa.Column("run_id", sa.Text, nullable=True),
        sa.Column("step_key", sa.Text, nullable=True),
        sa.Column("retry_number", sa.Integer, nullable=False, server_default="0"),
        sa.Column("state", sa.Text, nullable=False),
        sa.Column("lease_expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("committed_version", sa.Integer, nullable=True),
        _created_at(),
        _created_at("updated_at"),
    ):
        op.create_index(
            "trace_attempts_by_partition", "trace_attempts", ["dataset", "partition_key"]
        )
        op.create_index(
            "trace_attempts_live",
            "trace_attempts",
            ["lease_expires_at"],
            postgresql_where=sa.text("state = 'staging'"),
        )
    create_table_if_missing(
        "trace_versions",
        sa.Column("dataset", sa.Text, primary_key=True),
        sa.Column("partition_key", sa.Text, primary_key=True),
        sa.Column("version", sa.Integer, primary_key=True),
        sa.Column("attempt_id", UUID(as_uuid=False), nullable=False),
        sa.Column("commit_mode", sa.Text, nullable=False),
        sa.Column("schema_version", sa.Integer, nullable=False),
        sa.Column("manifest", JSONB, nullable=False),
        sa.Column("row_count", sa.BigInteger, nullable=False),
        sa.Column("byte_count", sa.BigInteger, nullable=False),
        _created_at(),
        sa.UniqueConstraint("attempt_id", name="trace_versions_attempt_id_key"),
    )
    create_table_if_missing(
        "trace_pointers",
        sa.Column("dataset", sa.Text, primary_key=True),
        sa.Column("partition_key", sa.Text, primary_key=True),
        sa.Column("current_version", sa.Integer, nullable=False),
        _created_at("updated_at"),
    )
    if create_table_if_missing(
        "trace_outbox",
        sa.Column("id", sa.BigInteger, sa.Identity(), primary_key=True),
        sa.Column("event_type", sa.Text, nullable=False),
        sa.Column("dataset", sa.Text, nullable=False),
        sa.Column("partition_key", sa.Text, nullable=False),
        sa.Column("version", sa.Integer, nullable=False),
        sa.Column("payload", JSONB, nullable=False),
        _created_at(),
        sa.Column("relayed_at", sa.DateTime(timezone=True), nullable=True),
    ):
        op.create_index(
            "trace_outbox_unrelayed",
            "trace_outbox",
            ["id"],
            postgresql_where=sa.text("relayed_at IS NULL"),
        )
    create_table_if_missing(
        "trace_commit_keys",
        sa.Column("dataset", sa.Text, primary_key=True),
        sa.Column("partition_key", sa.Text, primary_key=True),
        sa.Column("commit_key", sa.Text, primary_key=True),
        sa.Column("version", sa.Integer, nullable=False),
        sa.Column("attempt_id", UUID(as_uuid=False), nullable=False),
        _created_at(),
    )
    create_table_if_missing(
        "trace_quality_results",
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
        _created_at("evaluated_at"),
    )
    if create_table_if_missing(
        "trace_pins",
        sa.Column("reader_id", sa.Text, primary_key=True),
        sa.Column("dataset", sa.Text, primary_key=True),
        sa.Column("partition_key", sa.Text, primary_key=True),
        sa.Column("version", sa.Integer, primary_key=True),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        _created_at(),
    ):
        op.create_index(
            "trace_pins_by_version", "trace_pins", ["dataset", "partition_key", "version"]
        )
    create_table_if_missing(
        "trace_gc_queue",
        sa.Column("key", sa.Text, primary_key=True),
        sa.Column("dataset", sa.Text, nullable=False),
        sa.Column("reason", sa.Text, nullable=False),
        _created_at("queued_at"),
    )


def _query_service() -> None:
    create_table_if_missing(
        "trace_query_revoked_tokens",
        sa.Column("jti", sa.Text, primary_key=True),
        sa.Column("reason", sa.Text, nullable=True),
        _created_at("revoked_at"),
    )
    create_table_if_missing(
        "trace_query_public_datasets",
        sa.Column("dataset", sa.Text, primary_key=True),
        sa.Column("description", sa.Text, nullable=True),
        _created_at("published_at"),
    )
    create_table_if_missing(
        "trace_query_snapshots",
        sa.Column("id", sa.Text, primary_key=True),
        sa.Column("org", sa.Text, nullable=False),
        sa.Column("versions", JSONB, nullable=False),
        _created_at(),
    )
    create_table_if_missing(
        "trace_query_saved_queries",
        sa.Column("id", UUID(as_uuid=False), primary_key=True),
        sa.Column("org", sa.Text, nullable=False),
        sa.Column("name", sa.Text, nullable=False),
        sa.Column("sql", sa.Text, nullable=False),
        sa.Column("description", sa.Text, nullable=True),
        sa.Column("created_by", sa.Text, nullable=False),
        _created_at(),
        sa.UniqueConstraint("org", "name", name="trace_query_saved_queries_org_name"),
    )
    if create_table_if_missing(
        "trace_query_exports",
        sa.Column("id", UUID(as_uuid=False), primary_key=True),
        sa.Column("org", sa.Text, nullable=False),
        sa.Column("subject", sa.Text, nullable=False),
        sa.Column("sql", sa.Text, nullable=False),
        sa.Column("format", sa.Text, nullable=False),
        sa.Column("status", sa.Text, nullable=False),
        sa.Column("snapshot_id", sa.Text, nullable=False),
        sa.Column("object_key", sa.Text, nullable=True),
        sa.Column("rows", sa.BigInteger, nullable=True),
        sa.Column("bytes", sa.BigInteger, nullable=True),
        sa.Column("error", JSONB, nullable=True),
        _created_at(),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
    ):
        op.create_index(
            "trace_query_exports_by_owner", "trace_query_exports", ["org", "subject", "created_at"]
        )
    # UNLOGGED: losing the rate-limit state in a crash only resets the limits
    create_table_if_missing(
        "trace_query_rate_buckets",
        sa.Column("key", sa.Text, primary_key=True),
        sa.Column("tat", sa.Float(precision=53), nullable=False),
        prefixes=["UNLOGGED"],
    )
