"""Organisations' enrichment uploads: `trace_enrichments`, one row per uploaded dataset name
(`PUT /v1/enrichments/{name}`, `trace enrich upload`); its data and versions are the commit
protocol's.

Revision ID: state_0004
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from trace_resources.storage.migrations.ops import create_table_if_missing
from trace_resources.storage.migrations.ops import created_at as _created_at

revision = "state_0004"
down_revision = "state_0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    if create_table_if_missing(
        "trace_enrichments",
        sa.Column("name", sa.Text, primary_key=True),
        sa.Column("org", sa.Text, nullable=False),
        sa.Column("description", sa.Text, nullable=True),
        sa.Column("uploaded_by", sa.Text, nullable=False),
        _created_at(),
        _created_at("updated_at"),
    ):
        op.create_index("trace_enrichments_org", "trace_enrichments", ["org", "name"])
