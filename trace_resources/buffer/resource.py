"""Dagster resource of the alert pipeline: rules, alerts (Postgres data) and the buffer."""

from __future__ import annotations

from typing import Any

import dagster as dg
import sqlalchemy as sa
from pydantic import Field

from trace_resources.buffer import tables as t
from trace_resources.buffer.queue import SqsBuffer
from trace_resources.buffer.rules import RuleStore

__all__ = ["AlertsResource", "previous_alerts"]


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


def previous_alerts(
    engine: sa.Engine, partition_key: str, rule_versions: dict[tuple[str, str], int]
) -> list[tuple[str, dict[str, Any], dict[str, Any]]]:
    """Alerts already upserted for this range by the rule versions now in force."""
    a = t.alerts
    with engine.connect() as conn:
        rows = conn.execute(
            sa.select(a.c.dedupe_key, a.c.payload, a.c.destination).where(
                a.c.kind == "alert", a.c.payload["partition_key"].astext == partition_key
            )
        ).all()
    return [
        (r.dedupe_key, r.payload, r.destination)
        for r in rows
        if rule_versions.get((r.payload.get("org"), r.payload.get("rule_id")))
        == r.payload.get("rule_version")
    ]
