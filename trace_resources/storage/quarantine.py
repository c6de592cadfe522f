"""Quarantined versions (table `trace_quarantine`): committed versions judged wrong.

When a committed range turns out to be wrong (its boundary hash contradicted by its
neighbour and by the chain, `trace_assets.raw.boundary_repair`), it is extracted again and
the new version replaces it as current; the wrong version is recorded here with the check that
caught it, the block, the endpoint that served it and when. Its files stay (it is history)
until GC removes them like any superseded version's. A commit of the same source again (the
same range's hashes as the quarantined version recorded) is refused by the caller
(`matches`), so the wrong data never becomes current again.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.dialects.postgresql import insert as pg_insert

from trace_resources.storage.state import metadata

__all__ = ["Quarantine", "QuarantineRecord", "quarantine"]

quarantine = sa.Table(
    "trace_quarantine",
    metadata,
    sa.Column("dataset", sa.Text, primary_key=True),
    sa.Column("partition_key", sa.Text, primary_key=True),
    sa.Column("version", sa.Integer, primary_key=True),
    sa.Column("replaced_by", sa.Integer, nullable=False),
    sa.Column("check_name", sa.Text, nullable=False),
    sa.Column("block_number", sa.BigInteger, nullable=False),
    sa.Column("endpoint", sa.Text, nullable=True),
    sa.Column("detail", sa.Text, nullable=False),
    sa.Column("source", JSONB, nullable=True),
    sa.Column(
        "created_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False
    ),
    sa.Index("trace_quarantine_created", "created_at"),
)


@dataclass(frozen=True)
class QuarantineRecord:
    """Version `version` of (dataset, partition) was wrong and `replaced_by` replaced it."""

    dataset: str
    partition_key: str
    version: int
    replaced_by: int
    check: str  # the check that caught it, e.g. "boundary_hash"
    block: int  # the block it recorded wrongly
    endpoint: str | None  # the endpoint that served it (None: not recorded then)
    detail: str
    source: dict[str, Any] | None = None
    created_at: datetime | None = None

    def summary(self) -> str:
        return (
            f"{self.dataset} {self.partition_key} v{self.version} quarantined ({self.check} at "
            f"block {self.block}, served by {self.endpoint or 'an unrecorded endpoint'}), "
            f"replaced by v{self.replaced_by}: {self.detail}"
        )


def _same_blocks(a: dict[str, Any] | None, b: dict[str, Any] | None) -> bool:
    """The same range's first and last blocks (number, hash, parent hash)."""
    if not a or not b:
        return False
    return all(a.get(end) == b.get(end) for end in ("first", "last"))


class Quarantine:
    """Records of quarantined versions, and the check that keeps their data from returning."""

    def __init__(self, engine: sa.Engine) -> None:
        self.engine = engine

    def record(
        self, records: Sequence[QuarantineRecord], conn: sa.Connection | None = None
    ) -> None:
        """Record `records` (again: nothing changes; a version is quarantined once), in the
        transaction of `conn` if given (the replacement's commit)."""
        if not records:
            return
        rows = [
            {
                "dataset": r.dataset,
                "partition_key": r.partition_key,
                "version": r.version,
                "replaced_by": r.replaced_by,
                "check_name": r.check,
                "block_number": r.block,
                "endpoint": r.endpoint,
                "detail": r.detail,
                "source": r.source,
            }
            for r in records
        ]
        insert = pg_insert(quarantine).values(rows).on_conflict_do_nothing()
        if conn is not None:
            conn.execute(insert)
            return
        with self.engine.begin() as own:
            own.execute(insert)

    def listed(
        self, datasets: Sequence[str] | None = None, partition_key: str | None = None
    ) -> list[QuarantineRecord]:
        """Every quarantined version (of `datasets`, of `partition_key`), newest first."""
        q = quarantine
        query = sa.select(q).order_by(
            q.c.created_at.desc(), q.c.dataset, q.c.partition_key, q.c.version
        )
        if datasets:
            query = query.where(q.c.dataset.in_(list(datasets)))
        if partition_key is not None:
            query = query.where(q.c.partition_key == partition_key)
        with self.engine.connect() as conn:
            rows = conn.execute(query).all()
        return [
            QuarantineRecord(
                r.dataset,
                r.partition_key,
                r.version,
                r.replaced_by,
                r.check_name,
                r.block_number,
                r.endpoint,
                r.detail,
                r.source,
                r.created_at,
            )
            for r in rows
        ]

    def matches(
        self, dataset: str, partition_key: str, source: dict[str, Any] | None
    ) -> QuarantineRecord | None:
        """The quarantined version of (dataset, partition) whose blocks `source` repeats."""
        for record in self.listed([dataset], partition_key):
            if _same_blocks(record.source, source):
                return record
        return None
