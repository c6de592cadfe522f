"""Correlation state of composite alert rules (Postgres data): the one owner of its tables.

trace_alert_composite_events  the member events each evaluated range held, per rule version:
                              replaced whole when the range is evaluated again (a re-commit)
trace_alert_composite_ranges  the ranges evaluated per rule version (first and last block)
trace_alert_composite_firings what the rule version raised: one row per firing base key, its
                              latest generation's key and whether it still stands (False:
                              retracted), as `trace_alert_ledger` is for simple rules

The aggregation itself is a pure function in `trace_assets.alerts.composite`; this module only
stores and reads. `composite_lock` serialises evaluations of one rule across processes: a
firing may span ranges, so two ranges of one rule must not be decided on the same old state.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.dialects.postgresql import insert as pg_insert

from trace_resources.alert_pipeline import tables as t
from trace_resources.alert_pipeline.resource import LedgerEntry

__all__ = [
    "CompositeEvent",
    "EvaluatedRange",
    "RuleRef",
    "composite_events",
    "composite_firings",
    "composite_lock",
    "composite_ranges",
    "load_events",
    "load_firings",
    "load_ranges",
    "record_range",
    "save_firings",
]


def _rule() -> list[sa.Column[Any]]:
    """The key columns of one rule version (every table of the state starts with them)."""
    return [
        sa.Column("org", sa.Text, primary_key=True),
        sa.Column("rule_id", sa.Text, primary_key=True),
        sa.Column("rule_version", sa.Integer, primary_key=True),
    ]


composite_events = sa.Table(
    "trace_alert_composite_events",
    t.metadata,
    *_rule(),
    sa.Column("partition_key", sa.Text, primary_key=True),
    sa.Column("identity", sa.Text, primary_key=True),
    sa.Column("member", sa.Text, primary_key=True),
    sa.Column("block_number", sa.BigInteger, nullable=False),
    sa.Column("event", JSONB, nullable=False),
)

composite_ranges = sa.Table(
    "trace_alert_composite_ranges",
    t.metadata,
    *_rule(),
    sa.Column("partition_key", sa.Text, primary_key=True),
    sa.Column("first_block", sa.BigInteger, nullable=False),
    sa.Column("last_block", sa.BigInteger, nullable=False),
    sa.Column("evaluated_at", sa.DateTime(timezone=True), server_default=sa.func.now()),
)

composite_firings = sa.Table(
    "trace_alert_composite_firings",
    t.metadata,
    *_rule(),
    sa.Column("base_key", sa.Text, primary_key=True),
    sa.Column("dedupe_key", sa.Text, nullable=False),
    sa.Column("generation", sa.Integer, nullable=False),
    sa.Column("standing", sa.Boolean, nullable=False),
    sa.Column("payload", JSONB, nullable=False),
    sa.Column("destination", JSONB, nullable=False),
    sa.Column("updated_at", sa.DateTime(timezone=True), server_default=sa.func.now()),
)


@dataclass(frozen=True)
class RuleRef:
    """One version of one rule (correlation state is kept per rule version)."""

    org: str
    rule_id: str
    version: int

    def where(self, table: sa.Table) -> sa.ColumnElement[bool]:
        return sa.and_(
            table.c.org == self.org,
            table.c.rule_id == self.rule_id,
            table.c.rule_version == self.version,
        )


@dataclass(frozen=True)
class CompositeEvent:
    """One member event as stored: its range, identity, member and block, and its details."""

    partition_key: str
    identity: str
    member: str
    block_number: int
    event: dict[str, Any]


@dataclass(frozen=True)
class EvaluatedRange:
    partition_key: str
    first_block: int
    last_block: int


@contextlib.contextmanager
def composite_lock(engine: sa.Engine, rule: RuleRef) -> Iterator[None]:
    """Serialises evaluations of one composite rule version, across processes."""
    lock_key = {"k": f"trace-composite:{rule.org}/{rule.rule_id}@v{rule.version}"}
    with engine.connect() as conn:
        conn.execute(sa.text("SELECT pg_advisory_lock(hashtextextended(:k, 0))"), lock_key)
        conn.commit()
        try:
            yield
        finally:
            conn.execute(sa.text("SELECT pg_advisory_unlock(hashtextextended(:k, 0))"), lock_key)
            conn.commit()


def record_range(
    engine: sa.Engine, rule: RuleRef, span: EvaluatedRange, events: Sequence[CompositeEvent]
) -> None:
    """Replace the range's member events with `events` and mark the range evaluated (one
    transaction: a re-committed range's vanished events are gone with it)."""
    ev = composite_events
    with engine.begin() as conn:
        conn.execute(ev.delete().where(rule.where(ev), ev.c.partition_key == span.partition_key))
        rows = [
            {
                "org": rule.org,
                "rule_id": rule.rule_id,
                "rule_version": rule.version,
                "partition_key": e.partition_key,
                "identity": e.identity,
                "member": e.member,
                "block_number": e.block_number,
                "event": e.event,
            }
            for e in events
        ]
        for start in range(0, len(rows), 1000):
            conn.execute(pg_insert(ev).values(rows[start : start + 1000]).on_conflict_do_nothing())
        stmt = pg_insert(composite_ranges).values(
            org=rule.org,
            rule_id=rule.rule_id,
            rule_version=rule.version,
            partition_key=span.partition_key,
            first_block=span.first_block,
            last_block=span.last_block,
        )
        conn.execute(
            stmt.on_conflict_do_update(
                index_elements=["org", "rule_id", "rule_version", "partition_key"],
                set_={"evaluated_at": sa.func.now()},
            )
        )


def load_events(engine: sa.Engine, rule: RuleRef) -> list[CompositeEvent]:
    ev = composite_events
    query = sa.select(ev).where(rule.where(ev)).order_by(ev.c.block_number, ev.c.identity)
    with engine.connect() as conn:
        rows = conn.execute(query).all()
    return [
        CompositeEvent(r.partition_key, r.identity, r.member, r.block_number, r.event) for r in rows
    ]


def load_ranges(engine: sa.Engine, rule: RuleRef) -> list[EvaluatedRange]:
    rg = composite_ranges
    query = sa.select(rg).where(rule.where(rg)).order_by(rg.c.first_block)
    with engine.connect() as conn:
        rows = conn.execute(query).all()
    return [EvaluatedRange(r.partition_key, r.first_block, r.last_block) for r in rows]


def load_firings(engine: sa.Engine, rule: RuleRef) -> list[LedgerEntry]:
    f = composite_firings
    with engine.connect() as conn:
        rows = conn.execute(sa.select(f).where(rule.where(f)).order_by(f.c.base_key)).all()
    return [
        LedgerEntry(
            r.org,
            r.rule_id,
            r.rule_version,
            r.base_key,
            r.dedupe_key,
            r.generation,
            r.standing,
            r.payload,
            r.destination,
        )
        for r in rows
    ]


def save_firings(engine: sa.Engine, entries: Sequence[LedgerEntry]) -> None:
    """Record what was published (after publishing: a crash in between re-sends, and the
    sink keeps one row per dedupe_key)."""
    if not entries:
        return
    f = composite_firings
    values = [
        {
            "org": e.org,
            "rule_id": e.rule_id,
            "rule_version": e.rule_version,
            "base_key": e.base_key,
            "dedupe_key": e.key,
            "generation": e.generation,
            "standing": e.standing,
            "payload": e.payload,
            "destination": e.destination,
        }
        for e in entries
    ]
    with engine.begin() as conn:
        for start in range(0, len(values), 1000):
            stmt = pg_insert(f).values(values[start : start + 1000])
            conn.execute(
                stmt.on_conflict_do_update(
                    index_elements=["org", "rule_id", "rule_version", "base_key"],
                    set_={
                        "dedupe_key": stmt.excluded.dedupe_key,
                        "generation": stmt.excluded.generation,
                        "standing": stmt.excluded.standing,
                        "payload": stmt.excluded.payload,
                        "destination": stmt.excluded.destination,
                        "updated_at": sa.func.now(),
                    },
                )
            )
