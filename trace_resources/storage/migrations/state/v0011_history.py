"""Message history: `trace_event_history`, one row per hop of a unit of work under its
correlation id (the chain's hops: a finalized block range and its commit, written in the
commit's transaction) (`trace_resources/event_history.py`); and `trace_outbox.correlation_id`,
the unit of work that committed the version.

Revision ID: state_0011
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import JSONB

from trace_resources.storage.migrations.ops import create_table_if_missing

revision = "state_0011"
down_revision = "state_0010"
branch_labels = None
depends_on = None


def upgrade() -> None:
    if create_table_if_missing(
        "trace_event_history",
        sa.Column("id", sa.BigInteger, sa.Identity(), primary_key=True),
        sa.Column("correlation_id", sa.Text, nullable=False),
        sa.Column("hop", sa.Text, nullable=False),
        sa.Column("at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False),
        sa.Column("process", sa.Text, nullable=False),
        sa.Column("org", sa.Text, nullable=True),
        sa.Column("details", JSONB, nullable=False),
    ):
        op.create_index(
            "trace_event_history_by_id", "trace_event_history", ["correlation_id", "at"]
        )
    op.add_column("trace_outbox", sa.Column("correlation_id", sa.Text, nullable=True))


def downgrade() -> None:
    op.drop_column("trace_outbox", "correlation_id")
    op.drop_table("trace_event_history")
