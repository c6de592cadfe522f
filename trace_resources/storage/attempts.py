"""Attempts, fences and leases: a writer's try at one (dataset, partition), the fence that
fences out older replace attempts, and the lease that keeps its staged files safe from GC.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import insert as pg_insert

from trace_resources.storage import state as t
from trace_resources.storage.records import Attempt, AttemptRow, CommitMode, interval

__all__ = ["Attempts"]


class Attempts:
    """Begin attempts (taking the fence), heartbeat their leases, end them without a commit."""

    def __init__(self, engine: sa.Engine, lease_s: float = 600.0) -> None:
        self.engine = engine
        self.lease_s = lease_s

    def begin(
        self,
        dataset: str,
        partition_key: str,
        *,
        run_id: str | None = None,
        step_key: str | None = None,
        retry_number: int = 0,
        mode: CommitMode = "replace",
    ) -> Attempt:
        """Record a new attempt with a lease; a replace attempt also takes the fence.

        Taking the fence (incrementing it) means no older replace attempt of this
        (dataset, partition) can commit any more. Appends do not take it: they are blind and
        idempotent by segment key, so concurrent appenders need not fence each other out (as
        Delta's blind appends never conflict); they still serialise on the fence row at commit.
        """
        attempt_id = str(uuid.uuid4())
        bump = t.fences.c.fence + (1 if mode == "replace" else 0)
        with self.engine.begin() as conn:
            fence = conn.execute(
                pg_insert(t.fences)
                .values(dataset=dataset, partition_key=partition_key, fence=1)
                .on_conflict_do_update(
                    index_elements=["dataset", "partition_key"], set_={"fence": bump}
                )
                .returning(t.fences.c.fence)
            ).scalar_one()
            conn.execute(
                t.attempts.insert().values(
                    attempt_id=attempt_id,
                    dataset=dataset,
                    partition_key=partition_key,
                    fence=fence,
                    run_id=run_id,
                    step_key=step_key,
                    retry_number=retry_number,
                    state="staging",
                    lease_expires_at=sa.func.now() + interval(self.lease_s),
                )
            )
        return Attempt(
            attempt_id, dataset, partition_key, fence, run_id, step_key, retry_number, mode
        )

    def begin_many(
        self,
        dataset: str,
        partition_keys: Sequence[str],
        *,
        run_id: str | None = None,
        step_key: str | None = None,
        retry_number: int = 0,
        mode: CommitMode = "replace",
    ) -> list[Attempt]:
        """`begin` for many partitions of one dataset in one transaction (in key order,
        so concurrent writers take the fence rows in the same order)."""
        keys = sorted(set(partition_keys))
        if not keys:
            return []
        bump = t.fences.c.fence + (1 if mode == "replace" else 0)
        with self.engine.begin() as conn:
            statement = pg_insert(t.fences).values(
                [{"dataset": dataset, "partition_key": k, "fence": 1} for k in keys]
            )
            returned = conn.execute(
                statement.on_conflict_do_update(
                    index_elements=["dataset", "partition_key"], set_={"fence": bump}
                ).returning(t.fences.c.partition_key, t.fences.c.fence)
            )
            fences: dict[str, int] = {str(r.partition_key): int(r.fence) for r in returned}
            attempts = [
                Attempt(
                    str(uuid.uuid4()), dataset, k, fences[k], run_id, step_key, retry_number, mode
                )
                for k in keys
            ]
            conn.execute(
                t.attempts.insert().values(
                    [
                        {
                            "attempt_id": a.attempt_id,
                            "dataset": dataset,
                            "partition_key": a.partition_key,
                            "fence": a.fence,
                            "run_id": run_id,
                            "step_key": step_key,
                            "retry_number": retry_number,
                            "state": "staging",
                            "lease_expires_at": sa.func.now() + interval(self.lease_s),
                        }
                        for a in attempts
                    ]
                )
            )
        return attempts

    def extend_leases(self, attempts: Sequence[Attempt]) -> set[str]:
        """Heartbeat: keep live attempts' files safe from GC; returns the ids still live.

        An attempt that is no longer staging (committed, fenced, failed, or abandoned by a
        staging cleanup after its lease ran out) is not extended and not returned.
        """
        if not attempts:
            return set()
        with self.engine.begin() as conn:
            rows = conn.execute(
                t.attempts.update()
                .where(t.attempts.c.attempt_id.in_([a.attempt_id for a in attempts]))
                .where(t.attempts.c.state == "staging")
                .values(
                    lease_expires_at=sa.func.now() + interval(self.lease_s),
                    updated_at=sa.func.now(),
                )
                .returning(t.attempts.c.attempt_id)
            ).all()
        return {str(r.attempt_id) for r in rows}

    def mark_failed(self, attempt: Attempt, state: str = "failed") -> None:
        """Best-effort note that an attempt ended without committing (GC cleans its files).

        Only a staging attempt changes: a commit that landed is never undone by this.
        """
        with self.engine.begin() as conn:
            conn.execute(
                t.attempts.update()
                .where(t.attempts.c.attempt_id == attempt.attempt_id)
                .where(t.attempts.c.state == "staging")
                .values(state=state, updated_at=sa.func.now())
            )

    def expire_leases(
        self, *, apply: bool, datasets: Sequence[str] | None = None
    ) -> list[AttemptRow]:
        """Staging attempts whose lease ran out; with `apply`, mark them abandoned.

        Marking happens in its own transaction, under the attempts' row locks, BEFORE any of
        their files is deleted. A commit locks the same row and requires state 'staging', so
        either the commit lands first (the attempt is then 'committed' and not expired here) or
        the attempt is abandoned first (and its commit is refused): never both.
        """
        a = t.attempts
        condition = (a.c.state == "staging") & (a.c.lease_expires_at < sa.func.now())
        if datasets is not None:
            condition &= a.c.dataset.in_(list(datasets))
        columns = (a.c.attempt_id, a.c.dataset, a.c.partition_key)
        with self.engine.begin() as conn:
            if apply:
                rows = conn.execute(
                    a.update()
                    .where(condition)
                    .values(state="abandoned", updated_at=sa.func.now())
                    .returning(*columns)
                ).all()
            else:
                rows = conn.execute(sa.select(*columns).where(condition)).all()
        return [
            AttemptRow(str(r.attempt_id), r.dataset, r.partition_key, "abandoned", False)
            for r in rows
        ]

    def state(self, attempt_id: str) -> str | None:
        with self.engine.connect() as conn:
            return conn.execute(
                sa.select(t.attempts.c.state).where(t.attempts.c.attempt_id == attempt_id)
            ).scalar_one_or_none()
