"""The promotion log of an environment (table `trace_promotions`): every promotion applied
into this environment's state database, who applied it and when, and each touched item's state
before and after, which is what `trace promote rollback` restores.

The promotion itself (what is compared, validated and applied) is `trace_resources.promotion`.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import JSONB

from trace_resources.storage.state import metadata

__all__ = [
    "Promotion",
    "promotions",
    "record",
    "listed",
    "get",
    "lock",
    "unlock",
    "latest_unfinished",
    "later_than",
    "mark_completed",
    "mark_rolled_back",
]

promotions = sa.Table(
    "trace_promotions",
    metadata,
    sa.Column("id", sa.BigInteger, sa.Identity(), primary_key=True),
    sa.Column("source_env", sa.Text, nullable=False),
    sa.Column("target_env", sa.Text, nullable=False),
    sa.Column("actor", sa.Text, nullable=False),
    sa.Column(
        "created_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False
    ),
    # [{kind, key, action, before, after}]: before/after are the item's stored state, or null
    sa.Column("changes", JSONB, nullable=False),
    # the promotion is decided by its state commit; the writes that follow it (alert rules in
    # the data database, declaration files) are marked complete here when done
    sa.Column("completed_at", sa.DateTime(timezone=True), nullable=True),
    sa.Column("rolled_back_by", sa.Text, nullable=True),
    sa.Column("rolled_back_at", sa.DateTime(timezone=True), nullable=True),
    sa.Column("rollback_completed_at", sa.DateTime(timezone=True), nullable=True),
)

# serialises promotions into (and rollbacks of) one environment
_LOCK = 7260110030


@dataclass(frozen=True)
class Promotion:
    id: int
    source_env: str
    target_env: str
    actor: str
    created_at: datetime
    changes: list[dict[str, Any]]
    rolled_back_by: str | None
    rolled_back_at: datetime | None
    completed: bool  # its last step's rules and files are written (see `latest_unfinished`)


def _promotion(row: Any) -> Promotion:
    return Promotion(
        row.id,
        row.source_env,
        row.target_env,
        row.actor,
        row.created_at,
        row.changes,
        row.rolled_back_by,
        row.rolled_back_at,
        (row.completed_at if row.rolled_back_at is None else row.rollback_completed_at) is not None,
    )


def lock(conn: sa.Connection) -> None:
    """Take the environment's promotion lock for this session (`unlock` releases it): held
    from before a promotion's state commit until its rules and files are written."""
    conn.execute(sa.text("SELECT pg_advisory_lock(:k)"), {"k": _LOCK})
    conn.commit()


def unlock(conn: sa.Connection) -> None:
    conn.rollback()
    conn.execute(sa.text("SELECT pg_advisory_unlock(:k)"), {"k": _LOCK})
    conn.commit()


def latest_unfinished(conn: sa.Connection) -> tuple[Promotion, bool] | None:
    """The promotion whose last step (apply: False, rollback: True) was decided but not
    completed, if any: a process stopped between the state commit and the writes after it."""
    p = promotions.c
    row = conn.execute(
        sa.select(promotions).where(
            sa.or_(
                sa.and_(p.rolled_back_at.is_(None), p.completed_at.is_(None)),
                sa.and_(p.rolled_back_at.is_not(None), p.rollback_completed_at.is_(None)),
            )
        )
    ).first()
    if row is None:
        return None
    return _promotion(row), row.rolled_back_at is not None


def mark_completed(
    conn: sa.Connection, promotion_id: int, rollback: bool, changes: list[Any] | None = None
) -> None:
    """Mark the step complete (and store `changes`, e.g. without what only finishing it
    needed)."""
    column = "rollback_completed_at" if rollback else "completed_at"
    values: dict[str, Any] = {column: sa.func.now()}
    if changes is not None:
        values["changes"] = sa.cast(changes, JSONB)
    conn.execute(promotions.update().where(promotions.c.id == promotion_id).values(values))


def record(
    conn: sa.Connection, *, source_env: str, target_env: str, actor: str, changes: list[Any]
) -> Promotion:
    row = conn.execute(
        promotions.insert()
        .values(
            source_env=source_env,
            target_env=target_env,
            actor=actor,
            changes=sa.cast(changes, JSONB),
        )
        .returning(*promotions.c)
    ).one()
    return _promotion(row)


def listed(engine: sa.Engine) -> list[Promotion]:
    """Every promotion into this environment, newest first."""
    with engine.connect() as conn:
        rows = conn.execute(sa.select(promotions).order_by(promotions.c.id.desc())).all()
    return [_promotion(r) for r in rows]


def get(conn: sa.Connection, promotion_id: int) -> Promotion | None:
    row = conn.execute(
        sa.select(promotions).where(promotions.c.id == promotion_id).with_for_update()
    ).one_or_none()
    return None if row is None else _promotion(row)


def later_than(conn: sa.Connection, promotion_id: int) -> list[int]:
    """Promotions after this one that are still applied."""
    return list(
        conn.execute(
            sa.select(promotions.c.id)
            .where(promotions.c.id > promotion_id, promotions.c.rolled_back_at.is_(None))
            .order_by(promotions.c.id)
        ).scalars()
    )


def mark_rolled_back(conn: sa.Connection, promotion_id: int, actor: str) -> None:
    conn.execute(
        promotions.update()
        .where(promotions.c.id == promotion_id)
        .values(rolled_back_by=actor, rolled_back_at=sa.func.now())
    )
