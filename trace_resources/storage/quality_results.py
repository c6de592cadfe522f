"""Quality rule outcomes of committed versions: recorded after the checks run, and read back
by the readers that refuse a version whose blocking rule failed.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import insert as pg_insert

from trace_resources.storage import state as t
from trace_resources.storage.records import RuleResult

__all__ = ["QualityResults"]


class QualityResults:
    """One row per (dataset, partition, version, rule)."""

    def __init__(self, engine: sa.Engine) -> None:
        self.engine = engine

    def record(self, results: Sequence[RuleResult], run_id: str | None = None) -> None:
        """Record (or overwrite, when re-evaluated) rule outcomes of committed versions."""
        if not results:
            return
        q = t.quality_results
        statement = pg_insert(q).values(
            [
                {
                    "dataset": r.dataset,
                    "partition_key": r.partition_key,
                    "version": r.version,
                    "rule": r.rule,
                    "passed": r.passed,
                    "blocking": r.blocking,
                    "failing_rows": r.failing_rows,
                    "rows": r.rows,
                    "threshold": r.threshold,
                    "examples": r.examples,
                    "run_id": run_id,
                }
                for r in results
            ]
        )
        updated = {
            c: statement.excluded[c]
            for c in ("passed", "blocking", "failing_rows", "rows", "threshold", "examples")
        }
        with self.engine.begin() as conn:
            conn.execute(
                statement.on_conflict_do_update(
                    index_elements=["dataset", "partition_key", "version", "rule"],
                    set_={**updated, "run_id": run_id, "evaluated_at": sa.func.now()},
                )
            )

    def failed_blocking(self, dataset: str, versions: Mapping[str, int]) -> list[RuleResult]:
        """The blocking rules that failed on these versions ({partition_key: version})."""
        if not versions:
            return []
        q = t.quality_results
        pairs = [(k, v) for k, v in versions.items()]
        with self.engine.connect() as conn:
            rows = conn.execute(
                sa.select(q)
                .where(q.c.dataset == dataset)
                .where(sa.tuple_(q.c.partition_key, q.c.version).in_(pairs))
                .where(q.c.blocking.is_(True))
                .where(q.c.passed.is_(False))
                .order_by(q.c.partition_key, q.c.rule)
            ).all()
        return [
            RuleResult(
                r.dataset,
                r.partition_key,
                r.version,
                r.rule,
                r.passed,
                r.blocking,
                r.failing_rows,
                r.rows,
                r.threshold,
                list(r.examples),
            )
            for r in rows
        ]
