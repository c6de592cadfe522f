"""Message history: `trace_event_history`, one row per hop of a unit of work under its
correlation id (the alerts' hops: an alert raised, written with its row by the sink, and each
delivery attempt's outcome, written with its record by the deliverer)
(`trace_resources/event_history.py`).

Revision ID: data_0004
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import JSONB

from trace_resources.storage.migrations.ops import create_table_if_missing

revision = "data_0004"
down_revision = "data_0003"
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


def downgrade() -> None:
    op.drop_table("trace_event_history")
