"""The alerts an organisation has been sent, newest first, each with its delivery per channel.

Reads what the sink upserted into `trace_alerts` and the deliverer's state in
`trace_alert_deliveries`; writes nothing. Pages are keyset pages on (created_at, dedupe_key),
so a page stays stable while new alerts arrive.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

import sqlalchemy as sa

from trace_resources.alert_pipeline import tables as t

__all__ = ["AlertPosition", "Delivery", "StoredAlert", "AlertHistoryPage", "list_alerts"]

# (created_at, dedupe_key) of the last alert of the previous page
AlertPosition = tuple[datetime, str]


@dataclass(frozen=True)
class Delivery:
    channel: str  # "<org>/<channel name>"
    state: str  # pending | delivered | dead
    attempts: int
    next_attempt_at: datetime
    last_error: str | None
    delivered_at: datetime | None
    dead_at: datetime | None
    replays: int


@dataclass(frozen=True)
class StoredAlert:
    dedupe_key: str
    org: str
    kind: str  # alert | retraction
    payload: dict[str, Any]
    destination: dict[str, Any]
    created_at: datetime
    deliveries: list[Delivery]  # ordered by channel

    @property
    def position(self) -> AlertPosition:
        return self.created_at, self.dedupe_key


@dataclass(frozen=True)
class AlertHistoryPage:
    alerts: list[StoredAlert]
    more: bool  # further alerts follow the last one


def _alerts_query(
    org: str,
    *,
    rule_id: str | None,
    kind: str | None,
    partition_key: str | None,
    after: AlertPosition | None,
    limit: int,
) -> sa.Select[Any]:
    a = t.alerts
    query = sa.select(a).where(a.c.org == org)
    if rule_id is not None:
        query = query.where(a.c.destination["rule_id"].astext == rule_id)
    if kind is not None:
        query = query.where(a.c.kind == kind)
    if partition_key is not None:
        query = query.where(a.c.payload["partition_key"].astext == partition_key)
    if after is not None:
        query = query.where(sa.tuple_(a.c.created_at, a.c.dedupe_key) < sa.tuple_(*after))
    return query.order_by(a.c.created_at.desc(), a.c.dedupe_key.desc()).limit(limit)


def _deliveries(conn: sa.Connection, keys: list[str]) -> dict[str, list[Delivery]]:
    d = t.deliveries
    found: dict[str, list[Delivery]] = {k: [] for k in keys}
    if keys:
        query = sa.select(d).where(d.c.dedupe_key.in_(keys)).order_by(d.c.channel)
        for row in conn.execute(query):
            found[row.dedupe_key].append(
                Delivery(
                    row.channel,
                    row.state,
                    row.attempts,
                    row.next_attempt_at,
                    row.last_error,
                    row.delivered_at,
                    row.dead_at,
                    row.replays,
                )
            )
    return found


def list_alerts(
    engine: sa.Engine,
    org: str,
    *,
    rule_id: str | None = None,
    kind: str | None = None,
    partition_key: str | None = None,
    after: AlertPosition | None = None,
    limit: int = 100,
) -> AlertHistoryPage:
    """The org's alerts (of one rule, kind or block range), newest first, from just after
    `after` (the position of the previous page's last alert)."""
    query = _alerts_query(
        org, rule_id=rule_id, kind=kind, partition_key=partition_key, after=after, limit=limit + 1
    )
    with engine.connect() as conn:
        rows = conn.execute(query).all()
        page = rows[:limit]
        deliveries = _deliveries(conn, [r.dedupe_key for r in page])
    alerts = [
        StoredAlert(
            r.dedupe_key,
            r.org,
            r.kind,
            r.payload,
            r.destination,
            r.created_at,
            deliveries[r.dedupe_key],
        )
        for r in page
    ]
    return AlertHistoryPage(alerts, more=len(rows) > limit)
