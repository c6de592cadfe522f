"""Baseline of Postgres data: the tables `metadata.create_all` made before migrations.

Revision ID: data_0001
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import JSONB

from trace_resources.storage.migrations.ops import create_table_if_missing
from trace_resources.storage.migrations.ops import created_at as _created_at

revision = "data_0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    create_table_if_missing(
        "trace_alert_rules",
        sa.Column("org", sa.Text, primary_key=True),
        sa.Column("rule_id", sa.Text, primary_key=True),
        sa.Column("version", sa.Integer, primary_key=True),
        sa.Column("spec", JSONB, nullable=False),
        sa.Column("enabled", sa.Boolean, nullable=False),
        _created_at(),
    )
    if create_table_if_missing(
        "trace_alerts",
        sa.Column("dedupe_key", sa.Text, primary_key=True),
        sa.Column("org", sa.Text, nullable=False),
        sa.Column("kind", sa.Text, nullable=False),
        sa.Column("payload", JSONB, nullable=False),
        sa.Column("destination", JSONB, nullable=False),
        _created_at(),
    ):
        op.create_index("trace_alerts_by_org", "trace_alerts", ["org", "created_at"])
    if create_table_if_missing(
        "trace_alert_deliveries",
        sa.Column("dedupe_key", sa.Text, primary_key=True),
        sa.Column("channel", sa.Text, primary_key=True),
        sa.Column("state", sa.Text, nullable=False),
        sa.Column("attempts", sa.Integer, nullable=False, server_default="0"),
        _created_at("next_attempt_at"),
        sa.Column("last_error", sa.Text, nullable=True),
        sa.Column("delivered_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("dead_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("replays", sa.Integer, nullable=False, server_default="0"),
    ):
        op.create_index(
            "trace_alert_deliveries_due",
            "trace_alert_deliveries",
            ["next_attempt_at"],
            postgresql_where=sa.text("state = 'pending'"),
        )
    create_table_if_missing(
        "trace_alert_channels",
        sa.Column("channel", sa.Text, primary_key=True),
        sa.Column("tokens", sa.Float, nullable=False),
        _created_at("updated_at"),
    )
    # the evaluation ledger (what each evaluated range last raised); updated_at is nullable
    create_table_if_missing(
        "trace_alert_ledger",
        sa.Column("partition_key", sa.Text, primary_key=True),
        sa.Column("org", sa.Text, primary_key=True),
        sa.Column("rule_id", sa.Text, primary_key=True),
        sa.Column("rule_version", sa.Integer, primary_key=True),
        sa.Column("base_key", sa.Text, primary_key=True),
        sa.Column("dedupe_key", sa.Text, nullable=False),
        sa.Column("generation", sa.Integer, nullable=False),
        sa.Column("standing", sa.Boolean, nullable=False),
        sa.Column("payload", JSONB, nullable=False),
        sa.Column("destination", JSONB, nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), server_default=sa.func.now()),
    )
