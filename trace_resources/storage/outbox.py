"""The outbox: one event per committed version, written by the commit's own transaction and
relayed afterwards (to Dagster, by the outbox sensor).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import sqlalchemy as sa

from trace_resources.storage import state as t
from trace_resources.storage.records import OutboxEvent

__all__ = ["Outbox", "correlate", "correlations"]


def correlate(
    conn: sa.Connection, correlation_id: str, versions: Sequence[tuple[str, str, int]]
) -> None:
    """Stamp the committed versions' events (dataset, partition key, version) with the unit
    of work that committed them, in the commit's own transaction (`within`)."""
    o = t.outbox
    for dataset, partition_key, version in versions:
        conn.execute(
            o.update()
            .where(o.c.dataset == dataset)
            .where(o.c.partition_key == partition_key)
            .where(o.c.version == version)
            .where(o.c.correlation_id.is_(None))
            .values(correlation_id=correlation_id)
        )


def correlations(
    engine: sa.Engine, versions: Iterable[tuple[str, str, int]]
) -> dict[tuple[str, str, int], str]:
    """The correlation id each committed version (dataset, partition key, version) was
    committed under, for those that carry one."""
    wanted = sorted(set(versions))
    if not wanted:
        return {}
    o = t.outbox
    found: dict[tuple[str, str, int], str] = {}
    with engine.connect() as conn:
        for start in range(0, len(wanted), 500):
            rows = conn.execute(
                sa.select(o.c.dataset, o.c.partition_key, o.c.version, o.c.correlation_id)
                .where(
                    sa.tuple_(o.c.dataset, o.c.partition_key, o.c.version).in_(
                        wanted[start : start + 500]
                    )
                )
                .where(o.c.correlation_id.is_not(None))
            ).all()
            found.update({(r.dataset, r.partition_key, r.version): r.correlation_id for r in rows})
    return found


class Outbox:
    """Events not yet relayed, and marking them relayed."""

    def __init__(self, engine: sa.Engine) -> None:
        self.engine = engine

    def unrelayed(self, limit: int = 500) -> list[OutboxEvent]:
        """Committed-version events not yet relayed, oldest first.

        Selected by `relayed_at IS NULL`, not by id > cursor: identity values are handed out
        when a transaction inserts, not when it commits, so an event with a smaller id can
        become visible after a larger one has been relayed.
        """
        o = t.outbox
        with self.engine.connect() as conn:
            rows = conn.execute(
                sa.select(o).where(o.c.relayed_at.is_(None)).order_by(o.c.id).limit(limit)
            ).all()
        return [
            OutboxEvent(
                r.id, r.event_type, r.dataset, r.partition_key, r.version, r.payload, r.created_at
            )
            for r in rows
        ]

    def mark_relayed(
        self, ids: Sequence[int], guard: Callable[[sa.Connection], None] | None = None
    ) -> None:
        """Mark events relayed; `guard(conn)` runs first in the transaction and may refuse it
        by raising (the relay's leader-lease fence): nothing is marked then."""
        if not ids:
            return
        with self.engine.begin() as conn:
            if guard is not None:
                guard(conn)
            conn.execute(
                t.outbox.update()
                .where(t.outbox.c.id.in_(list(ids)))
                .values(relayed_at=sa.func.now())
            )
