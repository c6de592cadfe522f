"""Organisations' own transforms (UDFs): `trace_udf_versions`, one row per applied version of
a declaration (`trace udf apply`), with the YAML as written and the validated declaration.

Revision ID: state_0003
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import JSONB

from trace_resources.storage.migrations.ops import create_table_if_missing
from trace_resources.storage.migrations.ops import created_at as _created_at

revision = "state_0003"
down_revision = "state_0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    if create_table_if_missing(
        "trace_udf_versions",
        sa.Column("name", sa.Text, primary_key=True),
        sa.Column("version", sa.Integer, primary_key=True),
        sa.Column("org", sa.Text, nullable=False),
        sa.Column("source_file", sa.Text, nullable=False),
        sa.Column("source", sa.Text, nullable=False),
        sa.Column("declaration", JSONB, nullable=False),
        sa.Column("sha256", sa.Text, nullable=False),
        sa.Column("applied_by", sa.Text, nullable=False),
        _created_at(),
    ):
        op.create_index("trace_udf_versions_org", "trace_udf_versions", ["org", "name"])
