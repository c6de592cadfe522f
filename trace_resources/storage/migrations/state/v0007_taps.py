"""Wire taps: `trace_tap_producers`, each process's counters per tap (offered, written,
dropped, failed, last sequence number), for `trace taps`.

Revision ID: state_0007
"""

from __future__ import annotations

import sqlalchemy as sa

from trace_resources.storage.migrations.ops import create_table_if_missing
from trace_resources.storage.migrations.ops import created_at as _created_at

revision = "state_0007"
down_revision = "state_0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    create_table_if_missing(
        "trace_tap_producers",
        sa.Column("tap", sa.Text, primary_key=True),
        sa.Column("producer", sa.Text, primary_key=True),
        sa.Column("offered", sa.BigInteger, nullable=False),
        sa.Column("written", sa.BigInteger, nullable=False),
        sa.Column("dropped", sa.BigInteger, nullable=False),
        sa.Column("failed", sa.BigInteger, nullable=False),
        sa.Column("last_seq", sa.BigInteger, nullable=False),
        sa.Column("last_error", sa.Text, nullable=True),
        _created_at("started_at"),
        _created_at("updated_at"),
    )
