"""Environment promotion: `trace_promotions`, one row per `trace promote --apply` into this
environment: from which environment, by whom and when, and every item it touched with its
state before and after (so `trace promote rollback` can restore the prior state exactly), and
when the writes that follow the state commit (alert rules, declaration files) were completed.

Revision ID: state_0008
"""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import JSONB

from trace_resources.storage.migrations.ops import create_table_if_missing
from trace_resources.storage.migrations.ops import created_at as _created_at

revision = "state_0008"
down_revision = "state_0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    create_table_if_missing(
        "trace_promotions",
        sa.Column("id", sa.BigInteger, sa.Identity(), primary_key=True),
        sa.Column("source_env", sa.Text, nullable=False),
        sa.Column("target_env", sa.Text, nullable=False),
        sa.Column("actor", sa.Text, nullable=False),
        _created_at(),
        sa.Column("changes", JSONB, nullable=False),
        sa.Column("completed_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("rolled_back_by", sa.Text, nullable=True),
        sa.Column("rolled_back_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("rollback_completed_at", sa.DateTime(timezone=True), nullable=True),
    )
