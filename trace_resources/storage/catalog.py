"""Read-only summaries of what is committed, for the CLI, the demo and discovery."""

from __future__ import annotations

from dataclasses import dataclass

import sqlalchemy as sa

from trace_resources.storage import state as t

__all__ = ["DatasetSummary", "summarise_datasets", "version_history"]


@dataclass(frozen=True)
class DatasetSummary:
    dataset: str
    partitions: int
    rows: int
    bytes: int
    versions: int  # committed versions over all partitions, superseded ones included
    latest_commit: str | None


def summarise_datasets(engine: sa.Engine) -> list[DatasetSummary]:
    """Per dataset: current partitions, their rows and bytes, and all committed versions."""
    current = (
        sa.select(
            t.versions.c.dataset,
            sa.func.count().label("partitions"),
            sa.func.coalesce(sa.func.sum(t.versions.c.row_count), 0).label("rows"),
            sa.func.coalesce(sa.func.sum(t.versions.c.byte_count), 0).label("bytes"),
        )
        .join(
            t.pointers,
            (t.pointers.c.dataset == t.versions.c.dataset)
            & (t.pointers.c.partition_key == t.versions.c.partition_key)
            & (t.pointers.c.current_version == t.versions.c.version),
        )
        .group_by(t.versions.c.dataset)
        .subquery()
    )
    totals = (
        sa.select(
            t.versions.c.dataset,
            sa.func.count().label("versions"),
            sa.func.max(t.versions.c.created_at).label("latest"),
        )
        .group_by(t.versions.c.dataset)
        .subquery()
    )
    query = (
        sa.select(current, totals.c.versions, totals.c.latest)
        .join(totals, totals.c.dataset == current.c.dataset)
        .order_by(current.c.dataset)
    )
    with engine.connect() as conn:
        return [
            DatasetSummary(
                r.dataset,
                r.partitions,
                int(r.rows),
                int(r.bytes),
                r.versions,
                r.latest.isoformat() if r.latest else None,
            )
            for r in conn.execute(query)
        ]


def version_history(
    engine: sa.Engine, dataset: str, partition_key: str | None = None
) -> list[dict[str, object]]:
    """Every committed version of a dataset (optionally one partition), newest first."""
    query = (
        sa.select(
            t.versions.c.partition_key,
            t.versions.c.version,
            t.versions.c.commit_mode,
            t.versions.c.row_count,
            t.versions.c.byte_count,
            t.versions.c.created_at,
            t.versions.c.attempt_id,
            (t.pointers.c.current_version == t.versions.c.version).label("current"),
        )
        .join(
            t.pointers,
            (t.pointers.c.dataset == t.versions.c.dataset)
            & (t.pointers.c.partition_key == t.versions.c.partition_key),
        )
        .where(t.versions.c.dataset == dataset)
        .order_by(t.versions.c.partition_key, t.versions.c.version.desc())
    )
    if partition_key is not None:
        query = query.where(t.versions.c.partition_key == partition_key)
    with engine.connect() as conn:
        return [dict(r._mapping) for r in conn.execute(query)]
