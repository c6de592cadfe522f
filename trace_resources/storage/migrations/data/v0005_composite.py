"""Correlation state of composite alert rules: the member events each evaluated range held, the
ranges evaluated, and what each rule version raised (`trace_resources.alert_pipeline.composite`).

Revision ID: data_0005
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import JSONB

from trace_resources.storage.migrations.ops import create_table_if_missing

revision = "data_0005"
down_revision = "data_0004"
branch_labels = None
depends_on = None


def _rule() -> list[sa.Column[object]]:
    return [
        sa.Column("org", sa.Text, primary_key=True),
        sa.Column("rule_id", sa.Text, primary_key=True),
        sa.Column("rule_version", sa.Integer, primary_key=True),
    ]


def upgrade() -> None:
    create_table_if_missing(
        "trace_alert_composite_events",
        *_rule(),
        sa.Column("partition_key", sa.Text, primary_key=True),
        sa.Column("identity", sa.Text, primary_key=True),
        sa.Column("member", sa.Text, primary_key=True),
        sa.Column("block_number", sa.BigInteger, nullable=False),
        sa.Column("event", JSONB, nullable=False),
    )
    create_table_if_missing(
        "trace_alert_composite_ranges",
        *_rule(),
        sa.Column("partition_key", sa.Text, primary_key=True),
        sa.Column("first_block", sa.BigInteger, nullable=False),
        sa.Column("last_block", sa.BigInteger, nullable=False),
        sa.Column("evaluated_at", sa.DateTime(timezone=True), server_default=sa.func.now()),
    )
    create_table_if_missing(
        "trace_alert_composite_firings",
        *_rule(),
        sa.Column("base_key", sa.Text, primary_key=True),
        sa.Column("dedupe_key", sa.Text, nullable=False),
        sa.Column("generation", sa.Integer, nullable=False),
        sa.Column("standing", sa.Boolean, nullable=False),
        sa.Column("payload", JSONB, nullable=False),
        sa.Column("destination", JSONB, nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), server_default=sa.func.now()),
    )


def downgrade() -> None:
    op.drop_table("trace_alert_composite_firings")
    op.drop_table("trace_alert_composite_ranges")
    op.drop_table("trace_alert_composite_events")
