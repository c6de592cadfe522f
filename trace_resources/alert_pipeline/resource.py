"""Dagster resource of the alert pipeline: rules, alerts (Postgres data) and the buffer; and
the evaluation ledger (what each evaluated range last raised, see
`trace_assets.alerts.evaluate.reconcile`)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import dagster as dg
import sqlalchemy as sa
from pydantic import Field
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.dialects.postgresql import insert as pg_insert

from trace_resources.alert_pipeline import tables as t
from trace_resources.alert_pipeline.queue import SqsBuffer
from trace_resources.alert_pipeline.rules import RuleStore

__all__ = [
    "AlertsResource",
    "LedgerEntry",
    "evaluation_lock",
    "ledger",
    "load_ledger",
    "previous_alerts",
    "save_ledger",
]

# trace_alert_ledger: one row per (range, rule version, alert base key): the key of its latest
# generation and whether the range's last evaluation still raised it (standing) or retracted it
ledger = sa.Table(
    "trace_alert_ledger",
    t.metadata,
    sa.Column("partition_key", sa.Text, primary_key=True),
    sa.Column("org", sa.Text, primary_key=True),
    sa.Column("rule_id", sa.Text, primary_key=True),
    sa.Column("rule_version", sa.Integer, primary_key=True),
    sa.Column("base_key", sa.Text, primary_key=True),
    sa.Column("dedupe_key", sa.Text, nullable=False),
    sa.Column("generation", sa.Integer, nullable=False),
    sa.Column("standing", sa.Boolean, nullable=False),
    sa.Column("payload", JSONB, nullable=False),
    sa.Column("destination", JSONB, nullable=False),
    sa.Column("updated_at", sa.DateTime(timezone=True), server_default=sa.func.now()),
)


@dataclass(frozen=True)
class LedgerEntry:
    """What the ledger knows of one alert of one range under one rule version."""

    org: str
    rule_id: str
    rule_version: int
    base_key: str
    key: str  # the key of its latest generation
    generation: int
    standing: bool  # raised by the last evaluation (False: retracted)
    payload: dict[str, Any]
    destination: dict[str, Any]


class AlertsResource(dg.ConfigurableResource):
    """Where evaluated alerts go: the SQS buffer; and where rules are kept: Postgres data."""

    data_dsn: str = Field(description="SQLAlchemy URL of Postgres data (rules, alerts).")
    sqs_endpoint_url: str | None = Field(default=None, description="SQS API endpoint.")
    region: str = Field(default="us-east-1", description="SQS region.")
    queue: str = Field(default="trace-alerts", description="Buffer queue name.")
    visibility_timeout_s: int = Field(default=30, description="Buffer visibility timeout.")

    def engine(self) -> sa.Engine:
        return t.data_engine(self.data_dsn)

    def rules(self) -> RuleStore:
        return RuleStore(self.engine())

    def buffer(self) -> SqsBuffer:
        return SqsBuffer(
            self.queue,
            endpoint_url=self.sqs_endpoint_url,
            region=self.region,
            visibility_timeout_s=self.visibility_timeout_s,
        )


@contextlib.contextmanager
def evaluation_lock(engine: sa.Engine, partition_key: str) -> Iterator[None]:
    """Serialises evaluations of one range (read ledger, publish, write ledger), across
    processes: two runs of one range must not both decide on the same old ledger."""
    lock_key = {"k": f"trace-alert-range:{partition_key}"}
    with engine.connect() as conn:
        conn.execute(sa.text("SELECT pg_advisory_lock(hashtextextended(:k, 0))"), lock_key)
        conn.commit()
        try:
            yield
        finally:
            conn.execute(sa.text("SELECT pg_advisory_unlock(hashtextextended(:k, 0))"), lock_key)
            conn.commit()


def _in_blocks(payload: sa.ColumnElement[Any], blocks: tuple[int, int]) -> sa.ColumnElement[bool]:
    """The alert's row is in blocks first..last (an alert without a block number is not)."""
    number = payload["row"]["block_number"].astext
    return sa.and_(
        number.op("~")(r"^\d+$"), sa.cast(number, sa.BigInteger).between(blocks[0], blocks[1])
    )


def load_ledger(
    engine: sa.Engine,
    partition_key: str,
    rule_versions: dict[tuple[str, str], int],
    *,
    blocks: tuple[int, int] | None = None,
) -> list[LedgerEntry]:
    """Ledger entries of this range for the rule versions in force (with `blocks`, only the
    alerts of rows in blocks first..last: the head follower evaluates a few blocks at a time).
    A rule version with no entries yet (a range evaluated before the ledger existed) starts
    from the alerts the sink stored for it."""
    lg = ledger
    query = sa.select(lg).where(lg.c.partition_key == partition_key)
    if blocks is not None:
        query = query.where(_in_blocks(lg.c.payload, blocks))
    with engine.connect() as conn:
        rows = conn.execute(query).all()
    out = [
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
        if rule_versions.get((r.org, r.rule_id)) == r.rule_version
    ]
    known = {(e.org, e.rule_id) for e in out}
    for key, payload, destination in previous_alerts(
        engine, partition_key, rule_versions, blocks=blocks
    ):
        org, rule_id = str(payload.get("org")), str(payload.get("rule_id"))
        if (org, rule_id) in known:
            continue
        out.append(
            LedgerEntry(
                org,
                rule_id,
                int(payload.get("rule_version") or 0),
                str(payload.get("base_key") or key),
                key,
                int(payload.get("generation") or 0),
                True,
                payload,
                destination,
            )
        )
    return out


def save_ledger(engine: sa.Engine, partition_key: str, entries: Sequence[LedgerEntry]) -> None:
    if not entries:
        return
    values = [
        {
            "partition_key": partition_key,
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
            stmt = pg_insert(ledger).values(values[start : start + 1000])
            conn.execute(
                stmt.on_conflict_do_update(
                    index_elements=["partition_key", "org", "rule_id", "rule_version", "base_key"],
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


def previous_alerts(
    engine: sa.Engine,
    partition_key: str,
    rule_versions: dict[tuple[str, str], int],
    *,
    blocks: tuple[int, int] | None = None,
) -> list[tuple[str, dict[str, Any], dict[str, Any]]]:
    """Alerts already upserted for this range by the rule versions now in force (standing:
    not retracted); with `blocks`, only those of rows in blocks first..last."""
    a = t.alerts
    retracted = sa.select(a.c.dedupe_key).where(a.c.kind == "retraction").subquery()
    query = sa.select(a.c.dedupe_key, a.c.payload, a.c.destination).where(
        a.c.kind == "alert",
        a.c.payload["partition_key"].astext == partition_key,
        ("retract:" + a.c.dedupe_key).not_in(sa.select(retracted.c.dedupe_key)),
    )
    if blocks is not None:
        query = query.where(_in_blocks(a.c.payload, blocks))
    with engine.connect() as conn:
        rows = conn.execute(query).all()
    return [
        (r.dedupe_key, r.payload, r.destination)
        for r in rows
        if rule_versions.get((r.payload.get("org"), r.payload.get("rule_id")))
        == r.payload.get("rule_version")
    ]
