"""Leader leases: `trace_leases`, one row per singleton (the head follower of a chain, the
outbox relay, ...) with its holder, a fencing token that only grows, its expiry by the
database clock, and the holder's Postgres backend pid (a holder whose session ended is taken
over at once) (`trace_resources/leases.py`).

Revision ID: state_0009
"""

from __future__ import annotations

import sqlalchemy as sa

from trace_resources.storage.migrations.ops import create_table_if_missing

revision = "state_0009"
down_revision = "state_0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    create_table_if_missing(
        "trace_leases",
        sa.Column("name", sa.Text, primary_key=True),
        sa.Column("holder", sa.Text, nullable=False),
        sa.Column("token", sa.BigInteger, nullable=False),
        sa.Column("acquired_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("renewed_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("holder_pid", sa.Integer, nullable=True),
    )
