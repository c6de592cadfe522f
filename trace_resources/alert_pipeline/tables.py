"""Tables of the alert pipeline in Postgres data (SQLAlchemy Core).

trace_alert_rules       versioned rule declarations per organisation (latest version wins)
trace_alerts            one row per dedupe_key: what the sink upserted from the buffer
trace_alert_deliveries  per-alert, per-channel delivery state (pending/delivered/dead) and
                        its retry schedule (next_attempt_at, retry_until)
trace_alert_delivery_attempts  every attempt of a delivery: when, its outcome, what it scheduled
trace_alert_channels    per-channel token bucket of the rate limit
trace_alert_ledger      what each evaluated range last raised (defined in `resource`)
"""

from __future__ import annotations

import functools

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import JSONB

from trace_resources.storage.migrations import open_engine

__all__ = [
    "metadata",
    "rules",
    "alerts",
    "deliveries",
    "delivery_attempts",
    "channels",
    "data_engine",
]

metadata = sa.MetaData()
_now = sa.func.now()

rules = sa.Table(
    "trace_alert_rules",
    metadata,
    sa.Column("org", sa.Text, primary_key=True),
    sa.Column("rule_id", sa.Text, primary_key=True),
    sa.Column("version", sa.Integer, primary_key=True),
    sa.Column("spec", JSONB, nullable=False),
    sa.Column("enabled", sa.Boolean, nullable=False),
    sa.Column("created_at", sa.DateTime(timezone=True), server_default=_now, nullable=False),
)

alerts = sa.Table(
    "trace_alerts",
    metadata,
    sa.Column("dedupe_key", sa.Text, primary_key=True),
    sa.Column("org", sa.Text, nullable=False),
    sa.Column("kind", sa.Text, nullable=False),  # alert | retraction
    sa.Column("payload", JSONB, nullable=False),
    sa.Column("destination", JSONB, nullable=False),
    sa.Column("created_at", sa.DateTime(timezone=True), server_default=_now, nullable=False),
    sa.Index("trace_alerts_by_org", "org", "created_at"),
)

deliveries = sa.Table(
    "trace_alert_deliveries",
    metadata,
    sa.Column("dedupe_key", sa.Text, primary_key=True),
    sa.Column("channel", sa.Text, primary_key=True),  # "<org>/<channel name>"
    sa.Column("state", sa.Text, nullable=False),  # pending | delivered | dead
    sa.Column("attempts", sa.Integer, nullable=False, server_default="0"),
    sa.Column("next_attempt_at", sa.DateTime(timezone=True), server_default=_now, nullable=False),
    sa.Column("last_error", sa.Text, nullable=True),
    sa.Column("delivered_at", sa.DateTime(timezone=True), nullable=True),
    sa.Column("dead_at", sa.DateTime(timezone=True), nullable=True),
    sa.Column("replays", sa.Integer, nullable=False, server_default="0"),
    # end of the retry period: set by the first failure (of the replay), never moved after
    sa.Column("retry_until", sa.DateTime(timezone=True), nullable=True),
    sa.Column("dead_reason", sa.Text, nullable=True),  # why retries stopped (state dead)
    sa.Index(
        "trace_alert_deliveries_due",
        "next_attempt_at",
        postgresql_where=sa.text("state = 'pending'"),
    ),
)

delivery_attempts = sa.Table(
    "trace_alert_delivery_attempts",
    metadata,
    sa.Column("dedupe_key", sa.Text, primary_key=True),
    sa.Column("channel", sa.Text, primary_key=True),
    sa.Column("replay", sa.Integer, primary_key=True),  # the delivery's `replays` then
    sa.Column("attempt", sa.Integer, primary_key=True),  # 1, 2, ... within the replay
    sa.Column("started_at", sa.DateTime(timezone=True), server_default=_now, nullable=False),
    sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
    # delivered | retry | dead | superseded (NULL: in flight, or its deliverer died)
    sa.Column("outcome", sa.Text, nullable=True),
    sa.Column("error", sa.Text, nullable=True),
    sa.Column("retry_after_s", sa.Float, nullable=True),  # the receiver's Retry-After
    sa.Column("next_attempt_at", sa.DateTime(timezone=True), nullable=True),  # outcome retry
    sa.ForeignKeyConstraint(
        ["dedupe_key", "channel"],
        ["trace_alert_deliveries.dedupe_key", "trace_alert_deliveries.channel"],
        name="trace_alert_delivery_attempts_delivery",
        ondelete="CASCADE",
    ),
)

channels = sa.Table(
    "trace_alert_channels",
    metadata,
    sa.Column("channel", sa.Text, primary_key=True),
    sa.Column("tokens", sa.Float, nullable=False),
    sa.Column("updated_at", sa.DateTime(timezone=True), server_default=_now, nullable=False),
)


@functools.cache
def data_engine(dsn: str) -> sa.Engine:
    """One pooled engine per data database per process, checked once to be at the head
    revision (`SchemaNotCurrentError` otherwise: the tables are made by `trace db upgrade`)."""
    return open_engine(dsn, "data")
