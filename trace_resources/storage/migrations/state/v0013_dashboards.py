"""Dashboards: `trace_dashboards` (an organisation's dashboards), `trace_dashboard_versions`
(every version's spec) and `trace_dashboard_embeds` (the embed links of a version, checked on
every use) (`trace_resources/storage/dashboards.py`).

Revision ID: state_0013
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import JSONB, UUID

from trace_resources.storage.migrations.ops import create_table_if_missing, created_at

revision = "state_0013"
down_revision = "state_0012"
branch_labels = None
depends_on = None


def upgrade() -> None:
    if create_table_if_missing(
        "trace_dashboards",
        sa.Column("id", UUID(as_uuid=False), primary_key=True),
        sa.Column("org", sa.Text, nullable=False),
        sa.Column("name", sa.Text, nullable=False),
        sa.Column("current_version", sa.Integer, nullable=False),
        sa.Column("created_by", sa.Text, nullable=False),
        created_at(),
        created_at("updated_at"),
    ):
        op.create_index("trace_dashboards_by_org", "trace_dashboards", ["org"])
    create_table_if_missing(
        "trace_dashboard_versions",
        sa.Column(
            "dashboard_id",
            UUID(as_uuid=False),
            sa.ForeignKey("trace_dashboards.id", ondelete="CASCADE"),
            primary_key=True,
        ),
        sa.Column("version", sa.Integer, primary_key=True),
        sa.Column("spec", JSONB, nullable=False),
        sa.Column("created_by", sa.Text, nullable=False),
        created_at(),
    )
    if create_table_if_missing(
        "trace_dashboard_embeds",
        sa.Column("id", UUID(as_uuid=False), primary_key=True),
        sa.Column(
            "dashboard_id",
            UUID(as_uuid=False),
            sa.ForeignKey("trace_dashboards.id", ondelete="CASCADE"),
            nullable=False,
        ),
        sa.Column("org", sa.Text, nullable=False),
        sa.Column("version", sa.Integer, nullable=False),
        sa.Column("panel", sa.Text, nullable=True),
        sa.Column("pins", JSONB, nullable=True),
        sa.Column("created_by", sa.Text, nullable=False),
        created_at(),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("revoked_at", sa.DateTime(timezone=True), nullable=True),
    ):
        op.create_index(
            "trace_dashboard_embeds_by_dashboard", "trace_dashboard_embeds", ["dashboard_id"]
        )


def downgrade() -> None:
    op.drop_table("trace_dashboard_embeds")
    op.drop_table("trace_dashboard_versions")
    op.drop_table("trace_dashboards")
