"""Wire taps' counters: `trace_tap_producers`, one row per (tap, producing process), written by
the tap's writer thread (never by the primary path) so `trace taps` can say, across processes,
how many events each tap was offered, wrote and dropped, and the last sequence number.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import insert as pg_insert

from trace_resources.storage.state import metadata

__all__ = ["tap_producers", "TapCounters", "save_counters", "load_counters"]

tap_producers = sa.Table(
    "trace_tap_producers",
    metadata,
    sa.Column("tap", sa.Text, primary_key=True),
    sa.Column("producer", sa.Text, primary_key=True),
    sa.Column("offered", sa.BigInteger, nullable=False),
    sa.Column("written", sa.BigInteger, nullable=False),
    sa.Column("dropped", sa.BigInteger, nullable=False),
    sa.Column("failed", sa.BigInteger, nullable=False),
    sa.Column("last_seq", sa.BigInteger, nullable=False),
    sa.Column("last_error", sa.Text, nullable=True),
    sa.Column(
        "started_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False
    ),
    sa.Column(
        "updated_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False
    ),
)


@dataclass(frozen=True)
class TapCounters:
    """One producing process's counters of one tap (cumulative since it started)."""

    tap: str
    producer: str
    offered: int
    written: int
    dropped: int
    failed: int
    last_seq: int
    last_error: str | None = None
    updated_at: datetime | None = None


def save_counters(engine: sa.Engine, counters: TapCounters) -> None:
    values = {
        "offered": counters.offered,
        "written": counters.written,
        "dropped": counters.dropped,
        "failed": counters.failed,
        "last_seq": counters.last_seq,
        "last_error": counters.last_error,
        "updated_at": sa.func.now(),
    }
    with engine.begin() as conn:
        conn.execute(
            pg_insert(tap_producers)
            .values(tap=counters.tap, producer=counters.producer, **values)
            .on_conflict_do_update(index_elements=["tap", "producer"], set_=values)
        )


def load_counters(engine: sa.Engine) -> list[TapCounters]:
    p = tap_producers
    with engine.connect() as conn:
        rows = conn.execute(sa.select(p).order_by(p.c.tap, p.c.started_at, p.c.producer)).all()
    return [
        TapCounters(
            r.tap,
            r.producer,
            r.offered,
            r.written,
            r.dropped,
            r.failed,
            r.last_seq,
            r.last_error,
            r.updated_at,
        )
        for r in rows
    ]
