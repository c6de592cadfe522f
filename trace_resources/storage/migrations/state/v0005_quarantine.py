"""Quarantined versions: `trace_quarantine`, one row per committed version judged wrong and
superseded (a range whose boundary hash another range and the chain contradict), with the
check that caught it, the block, the endpoint that served it and when (`trace quarantine list`).

Revision ID: state_0005
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import JSONB

from trace_resources.storage.migrations.ops import create_table_if_missing
from trace_resources.storage.migrations.ops import created_at as _created_at

revision = "state_0005"
down_revision = "state_0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    if create_table_if_missing(
        "trace_quarantine",
        sa.Column("dataset", sa.Text, primary_key=True),
        sa.Column("partition_key", sa.Text, primary_key=True),
        sa.Column("version", sa.Integer, primary_key=True),
        sa.Column("replaced_by", sa.Integer, nullable=False),
        sa.Column("check_name", sa.Text, nullable=False),
        sa.Column("block_number", sa.BigInteger, nullable=False),
        sa.Column("endpoint", sa.Text, nullable=True),
        sa.Column("detail", sa.Text, nullable=False),
        sa.Column("source", JSONB, nullable=True),
        _created_at(),
    ):
        op.create_index("trace_quarantine_created", "trace_quarantine", ["created_at"])
