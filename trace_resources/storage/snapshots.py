"""Query snapshots: the dataset versions a query read, kept under a content-addressed id so
the query can be run again on the same data (table `trace_query_snapshots`).

A snapshot belongs to one organisation; another organisation's id reads as absent.
"""

from __future__ import annotations

from datetime import datetime
from typing import NamedTuple

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.dialects.postgresql import insert as pg_insert

from trace_resources.storage.state import metadata

__all__ = ["snapshots", "Versions", "Snapshot", "record_snapshot", "org_snapshot"]

Versions = dict[str, dict[str, int]]  # {dataset: {partition_key: version}}
_now = sa.func.now()

snapshots = sa.Table(
    "trace_query_snapshots",
    metadata,
    sa.Column("id", sa.Text, primary_key=True),
    sa.Column("org", sa.Text, nullable=False),
    # {dataset: {partition_key: version}}
    sa.Column("versions", JSONB, nullable=False),
    sa.Column("created_at", sa.DateTime(timezone=True), server_default=_now, nullable=False),
)


class Snapshot(NamedTuple):
    versions: Versions
    created_at: datetime


def record_snapshot(engine: sa.Engine, snapshot_id: str, org: str, versions: Versions) -> None:
    """Store a snapshot; recording the same id again changes nothing (the id is its content)."""
    with engine.begin() as conn:
        conn.execute(
            pg_insert(snapshots)
            .values(id=snapshot_id, org=org, versions=versions)
            .on_conflict_do_nothing()
        )


def org_snapshot(engine: sa.Engine, org: str, snapshot_id: str) -> Snapshot | None:
    """The snapshot `snapshot_id` of organisation `org`, or None (unknown or another org's)."""
    with engine.connect() as conn:
        row = conn.execute(
            sa.select(snapshots.c.versions, snapshots.c.created_at)
            .where(snapshots.c.id == snapshot_id)
            .where(snapshots.c.org == org)
        ).first()
    return None if row is None else Snapshot(row.versions, row.created_at)
