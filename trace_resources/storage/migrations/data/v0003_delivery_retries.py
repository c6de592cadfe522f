"""Delivery retries for a period, not a count: `trace_alert_deliveries.retry_until` (the end of
a failing delivery's retry period, set by its first failure) and `dead_reason` (why retries
stopped), and `trace_alert_delivery_attempts`, one row per attempt (when it started and
ended, its outcome, the receiver's `Retry-After`, the attempt it scheduled). Rows that are
already pending keep retrying: their period starts at their next failure.

Revision ID: data_0003
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from trace_resources.storage.migrations.ops import create_table_if_missing
from trace_resources.storage.migrations.ops import created_at as _created_at

revision = "data_0003"
down_revision = "data_0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column(
        "trace_alert_deliveries",
        sa.Column("retry_until", sa.DateTime(timezone=True), nullable=True),
    )
    op.add_column("trace_alert_deliveries", sa.Column("dead_reason", sa.Text, nullable=True))
    create_table_if_missing(
        "trace_alert_delivery_attempts",
        sa.Column("dedupe_key", sa.Text, primary_key=True),
        sa.Column("channel", sa.Text, primary_key=True),
        sa.Column("replay", sa.Integer, primary_key=True),
        sa.Column("attempt", sa.Integer, primary_key=True),
        _created_at("started_at"),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("outcome", sa.Text, nullable=True),
        sa.Column("error", sa.Text, nullable=True),
        sa.Column("retry_after_s", sa.Float, nullable=True),
        sa.Column("next_attempt_at", sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(
            ["dedupe_key", "channel"],
            ["trace_alert_deliveries.dedupe_key", "trace_alert_deliveries.channel"],
            name="trace_alert_delivery_attempts_delivery",
            ondelete="CASCADE",
        ),
    )


def downgrade() -> None:
    op.drop_table("trace_alert_delivery_attempts")
    op.drop_column("trace_alert_deliveries", "dead_reason")
    op.drop_column("trace_alert_deliveries", "retry_until")
