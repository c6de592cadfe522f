"""The dead letters of delivery: rows in state `dead` after their last attempt (a permanent
failure, or a retry period over: `dead_reason` says which).

`trace dlq list` shows them; `trace dlq replay` returns them to `pending`, due now, with a
fresh retry period (it starts at their next failure) and attempt count; their earlier attempts
stay in `trace_alert_delivery_attempts` under the previous replay number. The alert row itself
is never touched, so a replay can deliver again (at least once) but never duplicates a row.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

import sqlalchemy as sa

from trace_resources.alert_pipeline import tables as t

__all__ = ["DeadLetter", "list_dead", "replay"]


@dataclass(frozen=True)
class DeadLetter:
    dedupe_key: str
    channel: str
    org: str
    attempts: int
    last_error: str | None
    dead_at: datetime | None
    replays: int
    dead_reason: str | None = None


def list_dead(
    engine: sa.Engine, *, org: str | None = None, channel: str | None = None, limit: int = 100
) -> list[DeadLetter]:
    d, a = t.deliveries, t.alerts
    query = (
        sa.select(d, a.c.org)
        .join(a, a.c.dedupe_key == d.c.dedupe_key)
        .where(d.c.state == "dead")
        .order_by(d.c.dead_at, d.c.dedupe_key)
        .limit(limit)
    )
    if org is not None:
        query = query.where(a.c.org == org)
    if channel is not None:
        query = query.where(d.c.channel == channel)
    with engine.connect() as conn:
        return [
            DeadLetter(
                r.dedupe_key,
                r.channel,
                r.org,
                r.attempts,
                r.last_error,
                r.dead_at,
                r.replays,
                r.dead_reason,
            )
            for r in conn.execute(query)
        ]


def replay(
    engine: sa.Engine,
    *,
    keys: Sequence[str] | None = None,
    org: str | None = None,
    channel: str | None = None,
) -> int:
    """Dead rows (all, or the given dedupe keys / org / channel) back to pending; returns how
    many."""
    d, a = t.deliveries, t.alerts
    where = d.c.state == "dead"
    if keys is not None:
        where &= d.c.dedupe_key.in_(list(keys))
    if channel is not None:
        where &= d.c.channel == channel
    if org is not None:
        where &= d.c.dedupe_key.in_(sa.select(a.c.dedupe_key).where(a.c.org == org))
    with engine.begin() as conn:
        result = conn.execute(
            d.update()
            .where(where)
            .values(
                state="pending",
                attempts=0,
                next_attempt_at=sa.func.now(),
                dead_at=None,
                dead_reason=None,
                retry_until=None,
                replays=d.c.replays + 1,
            )
        )
    return int(result.rowcount)
