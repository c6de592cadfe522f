"""Open tables: `trace_iceberg_published`, one row per outbox event (committed version) the
Iceberg publisher has published as a snapshot of the dataset's Iceberg table, with the snapshot
id (NULL when the version was skipped, e.g. GC removed it before it was published), so that
publishing resumes after a crash exactly where it stopped.

Revision ID: state_0006
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from trace_resources.storage.migrations.ops import create_table_if_missing
from trace_resources.storage.migrations.ops import created_at as _created_at

revision = "state_0006"
down_revision = "state_0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    if create_table_if_missing(
        "trace_iceberg_published",
        sa.Column("outbox_id", sa.BigInteger, primary_key=True),
        sa.Column("dataset", sa.Text, nullable=False),
        sa.Column("partition_key", sa.Text, nullable=False),
        sa.Column("version", sa.Integer, nullable=False),
        sa.Column("snapshot_id", sa.BigInteger, nullable=True),
        sa.Column("operation", sa.Text, nullable=False),
        _created_at("published_at"),
    ):
        op.create_index(
            "trace_iceberg_published_dataset", "trace_iceberg_published", ["dataset", "outbox_id"]
        )
