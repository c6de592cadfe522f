"""Append segments as rows: `trace_segments` (one row per append to an open partition) and
`trace_segment_keys` (the appends' idempotency keys). The keys of the segments that current
append versions list in their manifests are copied into `trace_segment_keys` (with seq 0:
those files stay in the versions' manifests as their base files), so a retried append of
such a segment remains a no-op.

Revision ID: state_0002
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import JSONB, UUID

from trace_resources.storage.migrations.ops import create_table_if_missing
from trace_resources.storage.migrations.ops import created_at as _created_at

revision = "state_0002"
down_revision = "state_0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    create_table_if_missing(
        "trace_segments",
        sa.Column("dataset", sa.Text, primary_key=True),
        sa.Column("partition_key", sa.Text, primary_key=True),
        sa.Column("seq", sa.BigInteger, primary_key=True),
        sa.Column("attempt_id", UUID(as_uuid=False), nullable=False),
        sa.Column("version", sa.Integer, nullable=False),
        sa.Column("files", JSONB, nullable=False),
        sa.Column("row_count", sa.BigInteger, nullable=False),
        sa.Column("byte_count", sa.BigInteger, nullable=False),
        sa.Column("first_block", sa.BigInteger, nullable=True),
        sa.Column("last_block", sa.BigInteger, nullable=True),
        sa.Column("source", JSONB, nullable=True),
        _created_at(),
    )
    create_table_if_missing(
        "trace_segment_keys",
        sa.Column("dataset", sa.Text, primary_key=True),
        sa.Column("partition_key", sa.Text, primary_key=True),
        sa.Column("key", sa.Text, primary_key=True),
        sa.Column("seq", sa.BigInteger, nullable=False),
    )
    op.execute(
        """
        INSERT INTO trace_segment_keys (dataset, partition_key, key, seq)
        SELECT v.dataset, v.partition_key, k.key, 0
        FROM trace_versions v
        JOIN trace_pointers p
          ON p.dataset = v.dataset AND p.partition_key = v.partition_key
         AND p.current_version = v.version
        CROSS JOIN LATERAL jsonb_array_elements(
            COALESCE(v.manifest -> 'segments', '[]'::jsonb)) AS s(segment)
        CROSS JOIN LATERAL jsonb_array_elements_text(
            COALESCE(s.segment -> 'keys', jsonb_build_array(s.segment -> 'segment_key'))) AS k(key)
        WHERE v.commit_mode = 'append'
        ON CONFLICT DO NOTHING
        """
    )
