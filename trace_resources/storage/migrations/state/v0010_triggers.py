"""Triggers: `trace_trigger_calls` (accepted webhook calls, one per idempotency key) and
`trace_trigger_objects` (the objects file-arrival triggers acted on)
(`trace_resources/storage/triggers.py`).

Revision ID: state_0010
"""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import JSONB

from trace_resources.storage.migrations.ops import create_table_if_missing

revision = "state_0010"
down_revision = "state_0009"
branch_labels = None
depends_on = None


def upgrade() -> None:
    create_table_if_missing(
        "trace_trigger_calls",
        sa.Column("id", sa.BigInteger, sa.Identity(), primary_key=True),
        sa.Column("trigger", sa.Text, nullable=False),
        sa.Column("org", sa.Text, nullable=False),
        sa.Column("subject", sa.Text, nullable=False),
        sa.Column("idempotency_key", sa.Text, nullable=False),
        sa.Column("payload", JSONB, nullable=False),
        sa.Column(
            "received_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False
        ),
        sa.UniqueConstraint("trigger", "idempotency_key", name="uq_trace_trigger_calls_key"),
    )
    create_table_if_missing(
        "trace_trigger_objects",
        sa.Column("trigger", sa.Text, primary_key=True),
        sa.Column("object_key", sa.Text, primary_key=True),
        sa.Column("object_version", sa.Text, primary_key=True),
        sa.Column("outcome", sa.Text, nullable=False),
        sa.Column(
            "seen_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False
        ),
    )
