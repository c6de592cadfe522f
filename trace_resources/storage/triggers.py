"""Triggers' tables, their one owner:

trace_trigger_calls   one row per accepted webhook call; (trigger, idempotency_key) is
                      unique, so the same key fires once; `id` orders them for the sensor
                      that turns each into a run request (its cursor is the last id)
trace_trigger_objects one row per object a file-arrival trigger acted on, by (trigger, key,
                      version: its size and last-modified time): each object once, across
                      restarts and sensor copies; an object written again is a new arrival
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.dialects.postgresql import insert as pg_insert

from trace_resources.storage.history import process_name, record_hops
from trace_resources.storage.state import metadata

__all__ = [
    "trigger_calls",
    "trigger_objects",
    "TriggerCall",
    "record_call",
    "calls_after",
    "seen_objects",
    "record_object",
    "call_correlation_id",
]

trigger_calls = sa.Table(
    "trace_trigger_calls",
    metadata,
    sa.Column("id", sa.BigInteger, sa.Identity(), primary_key=True),
    sa.Column("trigger", sa.Text, nullable=False),
    sa.Column("org", sa.Text, nullable=False),
    sa.Column("subject", sa.Text, nullable=False),
    sa.Column("idempotency_key", sa.Text, nullable=False),
    sa.Column("payload", JSONB, nullable=False),
    sa.Column(
        "received_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False
    ),
    sa.UniqueConstraint("trigger", "idempotency_key", name="uq_trace_trigger_calls_key"),
)

trigger_objects = sa.Table(
    "trace_trigger_objects",
    metadata,
    sa.Column("trigger", sa.Text, primary_key=True),
    sa.Column("object_key", sa.Text, primary_key=True),
    sa.Column("object_version", sa.Text, primary_key=True),
    sa.Column("outcome", sa.Text, nullable=False),
    sa.Column("seen_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False),
)


@dataclass(frozen=True)
class TriggerCall:
    """One accepted webhook call."""

    id: int
    trigger: str
    org: str
    subject: str
    idempotency_key: str
    payload: dict[str, Any]
    received_at: datetime


def _call(row: Any) -> TriggerCall:
    return TriggerCall(
        row.id,
        row.trigger,
        row.org,
        row.subject,
        row.idempotency_key,
        row.payload,
        row.received_at,
    )


def record_call(
    engine: sa.Engine,
    *,
    trigger: str,
    org: str,
    subject: str,
    idempotency_key: str,
    payload: dict[str, Any],
) -> tuple[TriggerCall, bool]:
    """Record a call, or find the one recorded under the same key; (call, whether new)."""
    with engine.begin() as conn:
        inserted = conn.execute(
            pg_insert(trigger_calls)
            .values(
                trigger=trigger,
                org=org,
                subject=subject,
                idempotency_key=idempotency_key,
                payload=payload,
            )
            .on_conflict_do_nothing(constraint="uq_trace_trigger_calls_key")
            .returning(*trigger_calls.c)
        ).first()
        if inserted is not None:
            call = _call(inserted)
            record_hops(  # the origin of the work the call requests (message history)
                conn,
                [
                    {
                        "correlation_id": call_correlation_id(call),
                        "hop": "trigger.called",
                        "process": process_name("query"),
                        "org": org,
                        "details": {
                            "trigger": trigger,
                            "call_id": call.id,
                            "idempotency_key": idempotency_key,
                            "subject": subject,
                        },
                    }
                ],
            )
            return call, True
        found = conn.execute(
            sa.select(trigger_calls).where(
                trigger_calls.c.trigger == trigger,
                trigger_calls.c.idempotency_key == idempotency_key,
            )
        ).one()
        return _call(found), False


def calls_after(
    engine: sa.Engine, trigger: str, after_id: int, limit: int = 100
) -> list[TriggerCall]:
    """The trigger's calls with an id above `after_id`, oldest first."""
    with engine.connect() as conn:
        rows = conn.execute(
            sa.select(trigger_calls)
            .where(trigger_calls.c.trigger == trigger, trigger_calls.c.id > after_id)
            .order_by(trigger_calls.c.id)
            .limit(limit)
        ).all()
    return [_call(r) for r in rows]


def seen_objects(engine: sa.Engine, trigger: str) -> set[tuple[str, str]]:
    """(key, version) of every object the trigger acted on."""
    with engine.connect() as conn:
        rows = conn.execute(
            sa.select(trigger_objects.c.object_key, trigger_objects.c.object_version).where(
                trigger_objects.c.trigger == trigger
            )
        ).all()
    return {(r.object_key, r.object_version) for r in rows}


def record_object(
    engine: sa.Engine,
    trigger: str,
    key: str,
    version: str,
    outcome: str,
    hop: dict[str, Any] | None = None,
) -> bool:
    """Record that the trigger acted on an object; False when it was recorded already.
    `hop`: the origin hop of the work it requested, recorded with it (message history)."""
    with engine.begin() as conn:
        done = conn.execute(
            pg_insert(trigger_objects)
            .values(trigger=trigger, object_key=key, object_version=version, outcome=outcome)
            .on_conflict_do_nothing()
            .returning(trigger_objects.c.trigger)
        ).first()
        if done is not None and hop is not None:
            record_hops(conn, [hop])
    return done is not None


def call_correlation_id(call: TriggerCall) -> str:
    """The correlation id of the work a webhook call requests: `trigger:<name>:<call id>`."""
    return f"trigger:{call.trigger}:{call.id}"
