"""The version store: attempts, fences, schema registry, versions, pointers, outbox.

Every state change of the commit protocol is one method here and one Postgres transaction.
The protocol's order of steps (stage, verify, commit) lives in `commit.py`.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal

import pyarrow as pa
import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.dialects.postgresql import insert as pg_insert

from trace_resources.chain.ranges import parse_partition_key
from trace_resources.errors import (
    AttemptFencedError,
    ChainContinuityError,
    CommitError,
    LeaseExpiredError,
    SchemaIncompatibleError,
    SegmentConflictError,
    VersionRemovedError,
)
from trace_resources.storage import state as t

__all__ = [
    "Attempt",
    "BatchItem",
    "BatchNotCommitted",
    "AttemptRow",
    "CommitMode",
    "CommitResult",
    "CommittedVersion",
    "FileEntry",
    "Manifest",
    "OutboxEvent",
    "RemovedVersion",
    "RuleResult",
    "StorageSnapshot",
    "VersionRecord",
    "VersionStore",
    "schema_fingerprint",
    "schema_drift",
]

CommitMode = Literal["replace", "append"]
COMMITTED_EVENT = "dataset_version_committed"

# pg_advisory_xact_lock(class, hashtext(dataset)): GC takes it exclusively while it chooses and
# removes versions, readers take it shared while they pin; so no version is removed between a
# reader resolving it and the reader's pin becoming visible.
_GC_LOCK_CLASS = 72601


def _seconds(value: float) -> sa.ColumnElement[Any]:
    return sa.func.make_interval(0, 0, 0, 0, 0, 0, float(value))


@dataclass(frozen=True)
class Attempt:
    """One writer's try at one (dataset, partition), with the fence it holds."""

    attempt_id: str
    dataset: str
    partition_key: str
    fence: int
    run_id: str | None = None
    step_key: str | None = None
    retry_number: int = 0
    # replace attempts take the fence; appends are blind (see `VersionStore.begin_attempt`)
    mode: CommitMode = "replace"


@dataclass(frozen=True)
class FileEntry:
    key: str
    size: int
    sha256: str
    rows: int

    def as_dict(self) -> dict[str, Any]:
        return {"key": self.key, "size": self.size, "sha256": self.sha256, "rows": self.rows}


@dataclass
class Manifest:
    """What a version is made of. Readers resolve files only from here."""

    files: list[FileEntry]
    schema_hash: str
    source: dict[str, Any] | None = None
    segments: list[dict[str, Any]] = field(default_factory=list)

    @property
    def rows(self) -> int:
        return sum(f.rows for f in self.files)

    @property
    def bytes(self) -> int:
        return sum(f.size for f in self.files)

    def as_dict(self) -> dict[str, Any]:
        return {
            "files": [f.as_dict() for f in self.files],
            "rows": self.rows,
            "bytes": self.bytes,
            "schema_hash": self.schema_hash,
            "source": self.source,
            "segments": self.segments,
        }

    def segment_keys(self) -> set[str]:
        """Every key appended so far (a segment may carry several)."""
        return {k for s in self.segments for k in s.get("keys") or [s["segment_key"]]}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Manifest:
        return cls(
            files=[FileEntry(**f) for f in data["files"]],
            schema_hash=data["schema_hash"],
            source=data.get("source"),
            segments=list(data.get("segments") or []),
        )


@dataclass(frozen=True)
class VersionRecord:
    dataset: str
    partition_key: str
    version: int
    attempt_id: str
    commit_mode: str
    schema_version: int
    manifest: Manifest


@dataclass(frozen=True)
class BatchItem:
    """One staged attempt of a batch commit (`VersionStore.commit_many`)."""

    attempt: Attempt
    manifest: Manifest
    schema: pa.Schema
    segment_keys: Sequence[str] | None = None


class BatchNotCommitted(CommitError):
    """A batch commit was rolled back as a whole because one of its attempts would have been
    refused or failed; nothing of the batch changed. Commit the attempts one by one."""


@dataclass(frozen=True)
class CommitResult:
    version: VersionRecord
    already_committed: bool
    schema_version: int
    drift: dict[str, Any] | None


@dataclass(frozen=True)
class CommittedVersion:
    """A committed version without its file list (history, audit)."""

    dataset: str
    partition_key: str
    version: int
    attempt_id: str
    run_id: str | None
    rows: int
    bytes: int
    source: dict[str, Any] | None
    created_at: datetime


@dataclass(frozen=True)
class RuleResult:
    """A quality rule's outcome on one committed version of a partition."""

    dataset: str
    partition_key: str
    version: int
    rule: str
    passed: bool
    blocking: bool
    failing_rows: int
    rows: int
    threshold: float
    examples: list[dict[str, Any]] = field(default_factory=list)

    def summary(self) -> str:
        rate = self.failing_rows / self.rows if self.rows else 0.0
        shown = "; ".join(str(e) for e in self.examples[:3])
        return (
            f"rule {self.rule!r} failed on {self.dataset} {self.partition_key} v{self.version}: "
            f"{self.failing_rows} of {self.rows} rows (error rate {rate:.4%} > threshold "
            f"{self.threshold:.4%})" + (f"; e.g. {shown}" if shown else "")
        )


@dataclass(frozen=True)
class OutboxEvent:
    id: int
    event_type: str
    dataset: str
    partition_key: str
    version: int
    payload: dict[str, Any]
    created_at: datetime


@dataclass(frozen=True)
class RemovedVersion:
    """A superseded version GC removes (or would remove), and the files only it referenced."""

    dataset: str
    partition_key: str
    version: int
    created_at: datetime
    files: list[FileEntry]

    @property
    def bytes(self) -> int:
        return sum(f.size for f in self.files)


@dataclass(frozen=True)
class AttemptRow:
    attempt_id: str
    dataset: str
    partition_key: str
    state: str
    lease_live: bool


@dataclass(frozen=True)
class StorageSnapshot:
    """One consistent view of a dataset's attempts and of every file its versions reference."""

    attempts: dict[str, AttemptRow]
    referenced: set[str]


def _schema_fields(schema: pa.Schema) -> list[dict[str, Any]]:
    return [{"name": f.name, "type": str(f.type), "nullable": f.nullable} for f in schema]


def schema_fingerprint(schema: pa.Schema) -> str:
    """Hash of names, types and nullability (not of documentation metadata)."""
    encoded = json.dumps(_schema_fields(schema), sort_keys=True).encode()
    return hashlib.sha256(encoded).hexdigest()[:16]


def schema_drift(old: list[dict[str, Any]], new: list[dict[str, Any]]) -> dict[str, Any]:
    """Columns added, removed and retyped between two registered schemas."""
    before = {f["name"]: f for f in old}
    after = {f["name"]: f for f in new}
    return {
        "added": [n for n in after if n not in before],
        "removed": [n for n in before if n not in after],
        "retyped": [
            {"column": n, "from": before[n]["type"], "to": after[n]["type"]}
            for n in after
            if n in before and before[n]["type"] != after[n]["type"]
        ],
        "nullability": [
            n for n in after if n in before and before[n]["nullable"] != after[n]["nullable"]
        ],
    }


class VersionStore:
    """SQL of the commit protocol against Postgres state."""

    def __init__(self, engine: sa.Engine, lease_s: float = 600.0) -> None:
        self.engine = engine
        self.lease_s = lease_s

    # -- attempts, fences and leases ----------------------------------------------------

    def begin_attempt(
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
                    lease_expires_at=sa.func.now() + _seconds(self.lease_s),
                )
            )
        return Attempt(
            attempt_id, dataset, partition_key, fence, run_id, step_key, retry_number, mode
        )

    def begin_attempts(
        self,
        dataset: str,
        partition_keys: Sequence[str],
        *,
        run_id: str | None = None,
        step_key: str | None = None,
        retry_number: int = 0,
        mode: CommitMode = "replace",
    ) -> list[Attempt]:
        """`begin_attempt` for many partitions of one dataset in one transaction (in key order,
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
                            "lease_expires_at": sa.func.now() + _seconds(self.lease_s),
                        }
                        for a in attempts
                    ]
                )
            )
        return attempts

    def extend_lease(self, attempt: Attempt) -> bool:
        return attempt.attempt_id in self.extend_leases([attempt])

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
                    lease_expires_at=sa.func.now() + _seconds(self.lease_s),
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

    # -- the commit ----------------------------------------------------------------------

    def commit(
        self,
        attempt: Attempt,
        manifest: Manifest,
        schema: pa.Schema,
        *,
        mode: CommitMode = "replace",
        segment_key: str | None = None,
        segment_keys: Sequence[str] | None = None,
        commit_key: str | None = None,
    ) -> CommitResult:
        """Fenced commit in one transaction: version, manifest, pointer and outbox event.

        Idempotent by attempt id: calling it again after an unknown outcome returns the
        version that landed. Idempotent by `commit_key` (one logical writer, e.g. a Dagster
        step and its retries): a key that already committed this partition returns that
        version. In append mode, segments already in the current version make it a no-op.
        Refused, with the reason recorded on the attempt: a stale replace attempt (a newer
        one holds the fence), an attempt whose lease expired, an attempt no longer staging.
        """
        keys = list(segment_keys) if segment_keys is not None else None
        if keys is None and segment_key is not None:
            keys = [segment_key]
        with self.engine.begin() as conn:
            outcome = self._commit_one(conn, attempt, manifest, schema, mode, keys, commit_key, {})
        if isinstance(outcome, CommitError):
            raise outcome  # its refusal was recorded on the attempt by the transaction
        return outcome

    def commit_many(
        self,
        items: Sequence[BatchItem],
        *,
        mode: CommitMode = "replace",
        commit_key: str | None = None,
    ) -> list[CommitResult]:
        """Commit many staged attempts in ONE transaction, each exactly as `commit` would.

        Every attempt goes through the same steps as a single commit (its attempt row and fence
        row locked, commit key, fence, schema registry, continuity, version, pointer, its own
        outbox event), in (dataset, partition) order so that concurrent batches lock rows in
        the same order. All or nothing: if any attempt would be refused or fails, the whole
        transaction rolls back and `BatchNotCommitted` is raised, with nothing changed, so the
        caller can commit the attempts one by one to record each outcome.
        """
        ordered = sorted(items, key=lambda i: (i.attempt.dataset, i.attempt.partition_key))
        registered: dict[str, tuple[str, int]] = {}
        results: dict[str, CommitResult] = {}
        try:
            with self.engine.begin() as conn:
                for item in ordered:
                    outcome = self._commit_one(
                        conn,
                        item.attempt,
                        item.manifest,
                        item.schema,
                        mode,
                        list(item.segment_keys) if item.segment_keys is not None else None,
                        commit_key,
                        registered,
                    )
                    if isinstance(outcome, CommitError):
                        raise BatchNotCommitted(str(outcome)) from outcome
                    results[item.attempt.attempt_id] = outcome
        except (CommitError, ChainContinuityError) as exc:
            if isinstance(exc, BatchNotCommitted):
                raise
            raise BatchNotCommitted(str(exc)) from exc
        return [results[i.attempt.attempt_id] for i in items]

    def _commit_one(
        self,
        conn: sa.Connection,
        attempt: Attempt,
        manifest: Manifest,
        schema: pa.Schema,
        mode: CommitMode,
        keys: list[str] | None,
        commit_key: str | None,
        registered: dict[str, tuple[str, int]],
    ) -> CommitResult | CommitError:
        """One attempt's commit inside `conn`'s transaction: its result, or the refusal to raise
        once the transaction (which recorded the refusal on the attempt) has committed."""
        if mode != attempt.mode:
            raise CommitError(
                f"attempt {attempt.attempt_id} was begun for {attempt.mode!r} but is committed "
                f"as {mode!r}; stage it with mode={mode!r}"
            )
        row = conn.execute(
            sa.select(
                t.attempts.c.state,
                t.attempts.c.committed_version,
                t.attempts.c.lease_expires_at,
                (t.attempts.c.lease_expires_at < sa.func.now()).label("expired"),
            )
            .where(t.attempts.c.attempt_id == attempt.attempt_id)
            .with_for_update()
        ).one_or_none()
        if row is None:
            raise CommitError(f"attempt {attempt.attempt_id} is unknown to the version store")
        if row.state == "committed":
            who = f"attempt {attempt.attempt_id}"
            record = self._landed(conn, attempt, row.committed_version, who)
            return CommitResult(record, True, record.schema_version, None)
        if row.state != "staging":
            raise AttemptFencedError(
                f"attempt {attempt.attempt_id} of {attempt.dataset}/{attempt.partition_key} "
                f"is {row.state!r} and can no longer commit; its files are never "
                "referenced. Retry the run to write a new attempt"
            )
        if row.expired:
            # recorded (the transaction commits) before the refusal is raised
            self._set_state(conn, attempt, "abandoned")
            return LeaseExpiredError(
                f"attempt {attempt.attempt_id} of {attempt.dataset}/{attempt.partition_key} "
                f"let its lease expire at {row.lease_expires_at:%Y-%m-%d %H:%M:%S%z} (its "
                "writer stalled longer than the lease and stopped heartbeating), so a "
                "staging cleanup may have removed its files: the commit was refused and its "
                "files are never referenced. Retry the run; raise "
                "StateStoreResource.lease_s if writers legitimately stall this long"
            )
        # the fence row lock serialises every commit of this (dataset, partition)
        fence = conn.execute(
            sa.select(t.fences.c.fence)
            .where(t.fences.c.dataset == attempt.dataset)
            .where(t.fences.c.partition_key == attempt.partition_key)
            .with_for_update()
        ).scalar_one()
        landed = self._committed_by_key(conn, attempt, commit_key)
        if landed is not None:
            who = f"the writer with commit key {commit_key!r}"
            record = self._landed(conn, attempt, landed, who)
            self._set_state(conn, attempt, "committed", landed)
            return CommitResult(record, True, record.schema_version, None)
        if mode == "append" or fence == attempt.fence:
            result = self._commit_fenced(conn, attempt, manifest, schema, mode, keys, registered)
            if commit_key is not None and not result.already_committed:
                self._record_commit_key(conn, attempt, commit_key, result.version.version)
            return result
        self._set_state(conn, attempt, "fenced")
        return AttemptFencedError(
            f"attempt {attempt.attempt_id} of {attempt.dataset}/{attempt.partition_key} "
            f"holds fence {attempt.fence} but a newer attempt holds fence {fence}; "
            "this stale write was refused and its files are never referenced"
        )

    def _commit_fenced(
        self,
        conn: sa.Connection,
        attempt: Attempt,
        manifest: Manifest,
        schema: pa.Schema,
        mode: CommitMode,
        segment_keys: list[str] | None,
        registered: dict[str, tuple[str, int]],
    ) -> CommitResult:
        """The commit proper, once the attempt may commit (its row and the fence row locked).

        `registered` remembers, per dataset, the schema this transaction last checked against
        the registry (fingerprint, version): a batch of partitions with the same schema checks
        it once (holding the registry row lock until it commits); any other schema goes
        through the registry as it would alone."""
        fingerprint = schema_fingerprint(schema)
        known = registered.get(attempt.dataset)
        if known is not None and known[0] == fingerprint:  # the registry's current schema
            schema_version, drift = int(known[1]), None
        else:
            schema_version, drift = self._register_schema(conn, attempt.dataset, schema, mode)
            registered[attempt.dataset] = (fingerprint, schema_version)
        current = self._current(conn, attempt.dataset, attempt.partition_key)
        if mode == "append":
            manifest, duplicate = self._appended(current, manifest, segment_keys, attempt)
            if duplicate and current is not None:
                self._set_state(conn, attempt, "committed", current.version)
                return CommitResult(current, True, current.schema_version, None)
        if manifest.source is not None:
            self._check_continuity(conn, attempt.dataset, attempt.partition_key, manifest.source)
        number = (
            conn.execute(
                sa.select(sa.func.max(t.versions.c.version))
                .where(t.versions.c.dataset == attempt.dataset)
                .where(t.versions.c.partition_key == attempt.partition_key)
            ).scalar()
            or 0
        ) + 1
        conn.execute(
            t.versions.insert().values(
                dataset=attempt.dataset,
                partition_key=attempt.partition_key,
                version=number,
                attempt_id=attempt.attempt_id,
                commit_mode=mode,
                schema_version=schema_version,
                manifest=manifest.as_dict(),
                row_count=manifest.rows,
                byte_count=manifest.bytes,
            )
        )
        conn.execute(
            pg_insert(t.pointers)
            .values(
                dataset=attempt.dataset, partition_key=attempt.partition_key, current_version=number
            )
            .on_conflict_do_update(
                index_elements=["dataset", "partition_key"],
                set_={"current_version": number, "updated_at": sa.func.now()},
            )
        )
        self._set_state(conn, attempt, "committed", number)
        conn.execute(
            t.outbox.insert().values(
                event_type=COMMITTED_EVENT,
                dataset=attempt.dataset,
                partition_key=attempt.partition_key,
                version=number,
                payload={
                    "attempt_id": attempt.attempt_id,
                    "run_id": attempt.run_id,
                    "step_key": attempt.step_key,
                    "mode": mode,
                    "rows": manifest.rows,
                    "bytes": manifest.bytes,
                    "schema_version": schema_version,
                },
            )
        )
        record = VersionRecord(
            attempt.dataset,
            attempt.partition_key,
            number,
            attempt.attempt_id,
            mode,
            schema_version,
            manifest,
        )
        return CommitResult(record, False, schema_version, drift)

    @staticmethod
    def _committed_by_key(
        conn: sa.Connection, attempt: Attempt, commit_key: str | None
    ) -> int | None:
        """The version this logical writer already committed here, if any."""
        if commit_key is None:
            return None
        return conn.execute(
            sa.select(t.commit_keys.c.version)
            .where(t.commit_keys.c.dataset == attempt.dataset)
            .where(t.commit_keys.c.partition_key == attempt.partition_key)
            .where(t.commit_keys.c.commit_key == commit_key)
        ).scalar_one_or_none()

    def _landed(
        self, conn: sa.Connection, attempt: Attempt, version: int, who: str
    ) -> VersionRecord:
        """The version an earlier commit landed as. If GC has removed it since: for an append,
        the current version (which carries its segments forward); for a replace, a refusal."""
        row = conn.execute(
            sa.select(t.versions)
            .where(t.versions.c.dataset == attempt.dataset)
            .where(t.versions.c.partition_key == attempt.partition_key)
            .where(t.versions.c.version == version)
        ).one_or_none()
        if row is not None:
            return _record(row)
        if attempt.mode == "append":
            # later appends carried the segments forward: the current version holds them
            current_record = self._current(conn, attempt.dataset, attempt.partition_key)
            if current_record is not None:
                return current_record
        current = conn.execute(
            sa.select(t.pointers.c.current_version)
            .where(t.pointers.c.dataset == attempt.dataset)
            .where(t.pointers.c.partition_key == attempt.partition_key)
        ).scalar_one_or_none()
        raise VersionRemovedError(
            f"{who} already committed {attempt.dataset}/{attempt.partition_key} as version "
            f"{version}, which a newer version (now v{current}) has superseded and GC has "
            "removed since. Nothing was written again: the newer version stands"
        )

    @staticmethod
    def _record_commit_key(
        conn: sa.Connection, attempt: Attempt, commit_key: str, version: int
    ) -> None:
        conn.execute(
            pg_insert(t.commit_keys)
            .values(
                dataset=attempt.dataset,
                partition_key=attempt.partition_key,
                commit_key=commit_key,
                version=version,
                attempt_id=attempt.attempt_id,
            )
            .on_conflict_do_update(  # the key's earlier version was removed by GC
                index_elements=["dataset", "partition_key", "commit_key"],
                set_={"version": version, "attempt_id": attempt.attempt_id},
            )
        )

    # -- reads ---------------------------------------------------------------------------

    def current_versions(
        self, dataset: str, partition_keys: Sequence[str] | None = None
    ) -> dict[str, VersionRecord]:
        """Current version of each committed partition (all partitions if keys is None)."""
        with self.engine.connect() as conn:
            query = self._current_query(dataset, partition_keys)
            return {r.partition_key: _record(r) for r in conn.execute(query)}

    @staticmethod
    def _current_query(dataset: str, partition_keys: Sequence[str] | None) -> sa.Select[Any]:
        query = (
            sa.select(t.versions)
            .join(
                t.pointers,
                (t.pointers.c.dataset == t.versions.c.dataset)
                & (t.pointers.c.partition_key == t.versions.c.partition_key)
                & (t.pointers.c.current_version == t.versions.c.version),
            )
            .where(t.versions.c.dataset == dataset)
        )
        if partition_keys is not None:
            query = query.where(t.versions.c.partition_key.in_(list(partition_keys)))
        return query

    def version(self, dataset: str, partition_key: str, version: int) -> VersionRecord:
        with self.engine.connect() as conn:
            return self._version(conn, dataset, partition_key, version)

    def attempt_state(self, attempt_id: str) -> str | None:
        with self.engine.connect() as conn:
            return conn.execute(
                sa.select(t.attempts.c.state).where(t.attempts.c.attempt_id == attempt_id)
            ).scalar_one_or_none()

    def registered_schema(self, dataset: str) -> tuple[int, list[dict[str, Any]]] | None:
        with self.engine.connect() as conn:
            row = conn.execute(
                sa.select(t.dataset_schemas.c.schema_version, t.dataset_schemas.c.schema_json)
                .where(t.dataset_schemas.c.dataset == dataset)
                .order_by(t.dataset_schemas.c.schema_version.desc())
                .limit(1)
            ).one_or_none()
        return None if row is None else (row.schema_version, row.schema_json)

    def schema_history(self, dataset: str) -> list[tuple[int, str, dict[str, Any] | None]]:
        """Every registered schema version of a dataset: (version, hash, drift from previous)."""
        with self.engine.connect() as conn:
            rows = conn.execute(
                sa.select(
                    t.dataset_schemas.c.schema_version,
                    t.dataset_schemas.c.schema_hash,
                    t.dataset_schemas.c.drift,
                )
                .where(t.dataset_schemas.c.dataset == dataset)
                .order_by(t.dataset_schemas.c.schema_version)
            ).all()
        return [(r.schema_version, r.schema_hash, r.drift) for r in rows]

    def current_version_numbers(
        self, dataset: str, partition_keys: Iterable[str] | None = None
    ) -> dict[str, int]:
        query = sa.select(t.pointers.c.partition_key, t.pointers.c.current_version).where(
            t.pointers.c.dataset == dataset
        )
        if partition_keys is not None:
            query = query.where(t.pointers.c.partition_key.in_(list(partition_keys)))
        with self.engine.connect() as conn:
            return {r.partition_key: r.current_version for r in conn.execute(query)}

    def appended_keys(self, dataset: str, partition_key: str) -> set[str]:
        """Segment keys in the current version of an append-mode partition."""
        current = self.current_versions(dataset, [partition_key]).get(partition_key)
        return set() if current is None else current.manifest.segment_keys()

    def committed_versions(self, datasets: Sequence[str]) -> list[CommittedVersion]:
        """Every committed version of these datasets, superseded ones included, oldest first."""
        v, a = t.versions, t.attempts
        query = (
            sa.select(
                v.c.dataset,
                v.c.partition_key,
                v.c.version,
                v.c.attempt_id,
                a.c.run_id,
                v.c.row_count,
                v.c.byte_count,
                v.c.manifest["source"].label("source"),
                v.c.created_at,
            )
            .join(a, a.c.attempt_id == v.c.attempt_id, isouter=True)
            .where(v.c.dataset.in_(list(datasets)))
            .order_by(v.c.created_at, v.c.dataset, v.c.partition_key, v.c.version)
        )
        with self.engine.connect() as conn:
            return [
                CommittedVersion(
                    r.dataset,
                    r.partition_key,
                    r.version,
                    str(r.attempt_id),
                    r.run_id,
                    r.row_count,
                    r.byte_count,
                    r.source,
                    r.created_at,
                )
                for r in conn.execute(query)
            ]

    # -- quality rule outcomes of committed versions ------------------------------------------

    def record_rule_results(self, results: Sequence[RuleResult], run_id: str | None = None) -> None:
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

    def failed_blocking_rules(self, dataset: str, versions: Mapping[str, int]) -> list[RuleResult]:
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

    # -- reader pins -----------------------------------------------------------------------

    def pin_current(
        self,
        reader_id: str,
        dataset: str,
        partition_keys: Sequence[str] | None,
        ttl_s: float,
    ) -> dict[str, VersionRecord]:
        """Resolve the current versions and pin them, atomically with respect to GC."""
        with self.engine.begin() as conn:
            self._gc_lock(conn, dataset, shared=True)
            query = self._current_query(dataset, partition_keys)
            records = {r.partition_key: _record(r) for r in conn.execute(query)}
            self._insert_pins(conn, reader_id, dataset, records.values(), ttl_s)
        return records

    def pin_version(
        self, reader_id: str, dataset: str, partition_key: str, version: int, ttl_s: float
    ) -> VersionRecord:
        """Pin one (possibly superseded) version; FileNotFoundError if it is gone."""
        with self.engine.begin() as conn:
            self._gc_lock(conn, dataset, shared=True)
            row = conn.execute(
                sa.select(t.versions)
                .where(t.versions.c.dataset == dataset)
                .where(t.versions.c.partition_key == partition_key)
                .where(t.versions.c.version == version)
            ).one_or_none()
            if row is None:
                raise FileNotFoundError(
                    f"{dataset} partition {partition_key} has no version {version}: it was never "
                    "committed or GC removed it; `trace versions` lists what is kept"
                )
            record = _record(row)
            self._insert_pins(conn, reader_id, dataset, [record], ttl_s)
        return record

    def unpin(self, reader_id: str) -> None:
        with self.engine.begin() as conn:
            conn.execute(t.pins.delete().where(t.pins.c.reader_id == reader_id))

    @staticmethod
    def _insert_pins(
        conn: sa.Connection,
        reader_id: str,
        dataset: str,
        records: Iterable[VersionRecord],
        ttl_s: float,
    ) -> None:
        values = [
            {
                "reader_id": reader_id,
                "dataset": dataset,
                "partition_key": r.partition_key,
                "version": r.version,
                "expires_at": sa.func.now() + _seconds(ttl_s),
            }
            for r in records
        ]
        if values:
            statement = pg_insert(t.pins).values(values)
            conn.execute(
                statement.on_conflict_do_update(
                    index_elements=["reader_id", "dataset", "partition_key", "version"],
                    set_={"expires_at": statement.excluded.expires_at},
                )
            )

    @staticmethod
    def _gc_lock(conn: sa.Connection, dataset: str, *, shared: bool) -> None:
        lock = sa.func.pg_advisory_xact_lock_shared if shared else sa.func.pg_advisory_xact_lock
        conn.execute(sa.select(lock(_GC_LOCK_CLASS, sa.func.hashtext(dataset))))

    # -- the outbox ------------------------------------------------------------------------

    def unrelayed_events(self, limit: int = 500) -> list[OutboxEvent]:
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

    def mark_relayed(self, ids: Sequence[int]) -> None:
        if not ids:
            return
        with self.engine.begin() as conn:
            conn.execute(
                t.outbox.update()
                .where(t.outbox.c.id.in_(list(ids)))
                .values(relayed_at=sa.func.now())
            )

    # -- garbage collection ----------------------------------------------------------------

    def known_datasets(self) -> list[str]:
        """Datasets with a registry entry or with attempts (maybe never committed)."""
        with self.engine.connect() as conn:
            names = conn.execute(
                sa.union(
                    sa.select(t.datasets.c.name.label("name")),
                    sa.select(t.attempts.c.dataset.label("name")).distinct(),
                )
            ).scalars()
            return sorted(names)

    def remove_versions(
        self, dataset: str, *, keep_last: int, older_than_s: float, apply: bool
    ) -> list[RemovedVersion]:
        """Superseded versions to remove under the policy, and the files only they reference.

        A version is removed when it is not current, not among the `keep_last` newest of its
        partition, was superseded more than `older_than_s` ago and has no unexpired reader pin.
        With `apply`, one transaction holding the dataset's GC lock (so no reader pins a
        version while it is chosen) deletes the version rows and their commit keys and queues
        the files for deletion (`trace_gc_queue`); the caller deletes the objects afterwards.
        Without `apply` nothing changes.
        """
        keep_last = max(keep_last, 1)
        with self.engine.begin() as conn:
            if apply:
                self._gc_lock(conn, dataset, shared=False)
            chosen = conn.execute(self._removable_query(dataset, keep_last, older_than_s)).all()
            if not chosen:
                return []
            partitions = sorted({r.partition_key for r in chosen})
            doomed = [(r.partition_key, r.version) for r in chosen]
            kept = conn.execute(
                sa.select(t.versions.c.manifest)
                .where(t.versions.c.dataset == dataset)
                .where(t.versions.c.partition_key.in_(partitions))
                .where(sa.tuple_(t.versions.c.partition_key, t.versions.c.version).notin_(doomed))
            ).scalars()
            # append versions share files with their successors: delete only what no kept
            # version references, and each file once
            claimed = {f["key"] for manifest in kept for f in manifest["files"]}
            removed = []
            for r in chosen:
                files = [FileEntry(**f) for f in r.manifest["files"] if f["key"] not in claimed]
                claimed.update(f.key for f in files)
                removed.append(
                    RemovedVersion(dataset, r.partition_key, r.version, r.created_at, files)
                )
            if apply:
                # commit keys stay (tombstones): a late retry of the writer that committed a
                # removed version must not commit its superseded data again
                conn.execute(
                    t.versions.delete()
                    .where(t.versions.c.dataset == dataset)
                    .where(sa.tuple_(t.versions.c.partition_key, t.versions.c.version).in_(doomed))
                )
                queued = [
                    {"key": f.key, "dataset": dataset, "reason": f"{r.partition_key} v{r.version}"}
                    for r in removed
                    for f in r.files
                ]
                if queued:
                    conn.execute(pg_insert(t.gc_queue).on_conflict_do_nothing(), queued)
        return removed

    def _removable_query(self, dataset: str, keep_last: int, older_than_s: float) -> sa.Select[Any]:
        v = t.versions
        partition = (v.c.dataset, v.c.partition_key)
        ranked = (
            sa.select(
                v.c.dataset,
                v.c.partition_key,
                v.c.version,
                v.c.manifest,
                v.c.created_at,
                sa.func.row_number()
                .over(partition_by=partition, order_by=v.c.version.desc())
                .label("rank"),
                # when the next kept version landed: the moment this one stopped being current
                sa.func.lead(v.c.created_at)
                .over(partition_by=partition, order_by=v.c.version)
                .label("superseded_at"),
            )
            .where(v.c.dataset == dataset)
            .subquery()
        )
        pinned = (
            sa.select(t.pins.c.version)
            .where(t.pins.c.dataset == ranked.c.dataset)
            .where(t.pins.c.partition_key == ranked.c.partition_key)
            .where(t.pins.c.version == ranked.c.version)
            .where(t.pins.c.expires_at > sa.func.now())
        )
        return (
            sa.select(ranked)
            .join(
                t.pointers,
                (t.pointers.c.dataset == ranked.c.dataset)
                & (t.pointers.c.partition_key == ranked.c.partition_key),
            )
            .where(ranked.c.version < t.pointers.c.current_version)
            .where(ranked.c.rank > keep_last)
            .where(ranked.c.superseded_at < sa.func.now() - _seconds(older_than_s))
            .where(~sa.exists(pinned))
            .order_by(ranked.c.partition_key, ranked.c.version)
        )

    def queued_files(
        self, datasets: Sequence[str] | None = None, limit: int = 10_000
    ) -> list[tuple[str, str]]:
        """(key, dataset) of files of removed versions still to delete."""
        query = sa.select(t.gc_queue.c.key, t.gc_queue.c.dataset)
        if datasets is not None:
            query = query.where(t.gc_queue.c.dataset.in_(list(datasets)))
        with self.engine.connect() as conn:
            rows = conn.execute(
                query.order_by(t.gc_queue.c.queued_at, t.gc_queue.c.key).limit(limit)
            ).all()
        return [(r.key, r.dataset) for r in rows]

    def dequeue_files(self, keys: Sequence[str]) -> None:
        if keys:
            with self.engine.begin() as conn:
                conn.execute(t.gc_queue.delete().where(t.gc_queue.c.key.in_(list(keys))))

    def drop_expired_pins(self) -> int:
        """Pins of readers that died without unpinning."""
        with self.engine.begin() as conn:
            return conn.execute(t.pins.delete().where(t.pins.c.expires_at < sa.func.now())).rowcount

    def storage_snapshot(self, dataset: str, attempt_ids: Iterable[str]) -> StorageSnapshot:
        """The given attempts' states and every file the dataset's versions reference, read in
        one REPEATABLE READ transaction so the two agree (an attempt seen committed has its
        version seen too)."""
        ids = sorted(set(attempt_ids))
        with self.engine.connect().execution_options(isolation_level="REPEATABLE READ") as conn:
            with conn.begin():
                found: dict[str, AttemptRow] = {}
                for offset in range(0, len(ids), 5_000):
                    rows = conn.execute(
                        sa.select(
                            t.attempts.c.attempt_id,
                            t.attempts.c.dataset,
                            t.attempts.c.partition_key,
                            t.attempts.c.state,
                            (t.attempts.c.lease_expires_at > sa.func.now()).label("live"),
                        ).where(t.attempts.c.attempt_id.in_(ids[offset : offset + 5_000]))
                    )
                    for r in rows:
                        found[str(r.attempt_id)] = AttemptRow(
                            str(r.attempt_id),
                            r.dataset,
                            r.partition_key,
                            r.state,
                            r.state == "staging" and bool(r.live),
                        )
                files = sa.func.jsonb_array_elements(t.versions.c.manifest["files"]).table_valued(
                    sa.column("value", JSONB)
                )
                referenced = set(
                    conn.execute(
                        sa.select(files.c.value["key"].astext)
                        .select_from(t.versions)
                        .join(files, sa.true())
                        .where(t.versions.c.dataset == dataset)
                        .distinct()
                    ).scalars()
                )
        return StorageSnapshot(found, referenced)

    # -- helpers -------------------------------------------------------------------------

    def _version(
        self, conn: sa.Connection, dataset: str, partition_key: str, version: int
    ) -> VersionRecord:
        row = conn.execute(
            sa.select(t.versions)
            .where(t.versions.c.dataset == dataset)
            .where(t.versions.c.partition_key == partition_key)
            .where(t.versions.c.version == version)
        ).one()
        return _record(row)

    def _current(
        self, conn: sa.Connection, dataset: str, partition_key: str
    ) -> VersionRecord | None:
        number = conn.execute(
            sa.select(t.pointers.c.current_version)
            .where(t.pointers.c.dataset == dataset)
            .where(t.pointers.c.partition_key == partition_key)
            .with_for_update()
        ).scalar_one_or_none()
        return None if number is None else self._version(conn, dataset, partition_key, number)

    @staticmethod
    def _set_state(
        conn: sa.Connection, attempt: Attempt, state: str, version: int | None = None
    ) -> None:
        conn.execute(
            t.attempts.update()
            .where(t.attempts.c.attempt_id == attempt.attempt_id)
            .values(state=state, committed_version=version, updated_at=sa.func.now())
        )

    @staticmethod
    def _appended(
        current: VersionRecord | None,
        manifest: Manifest,
        segment_keys: list[str] | None,
        attempt: Attempt,
    ) -> tuple[Manifest, bool]:
        """The current manifest plus this attempt's segment, or (current, True) if a retry.

        A segment's keys are all new (appended), all present (a retried append: a no-op) or
        mixed: refused, because a file can not be half referenced; the writer recomputes the
        batch without the keys that landed.
        """
        keys = segment_keys or [attempt.attempt_id]
        label = keys[0] if len(keys) == 1 else f"{keys[0]} (+{len(keys) - 1})"
        segment = {
            "segment_key": label,
            "keys": keys,
            "attempt_id": attempt.attempt_id,
            "files": [f.key for f in manifest.files],
        }
        if current is None:
            return Manifest(manifest.files, manifest.schema_hash, manifest.source, [segment]), False
        present = current.manifest.segment_keys()
        landed = [k for k in keys if k in present]
        if len(landed) == len(keys):
            return current.manifest, True
        if landed:
            raise SegmentConflictError(
                f"append to {attempt.dataset}/{attempt.partition_key} by attempt "
                f"{attempt.attempt_id} carries {len(landed)} segment key(s) already appended "
                f"(e.g. {landed[:3]}) next to {len(keys) - len(landed)} new one(s); nothing was "
                "committed. Recompute the batch without the keys already in the dataset "
                "(a concurrent writer appended them) and retry"
            )
        merged = Manifest(
            files=[*current.manifest.files, *manifest.files],
            schema_hash=manifest.schema_hash,
            source=manifest.source or current.manifest.source,
            segments=[*current.manifest.segments, segment],
        )
        return merged, False

    @staticmethod
    def _registered(
        conn: sa.Connection, dataset: str, lock: Literal["none", "share", "update"]
    ) -> tuple[int, sa.Row[Any] | None]:
        """The dataset's current schema version and its registered schema."""
        query = sa.select(t.datasets.c.current_schema_version).where(t.datasets.c.name == dataset)
        if lock != "none":
            query = query.with_for_update(read=lock == "share")
        current_version = conn.execute(query).scalar_one()
        registered = conn.execute(
            sa.select(t.dataset_schemas)
            .where(t.dataset_schemas.c.dataset == dataset)
            .where(t.dataset_schemas.c.schema_version == current_version)
        ).one_or_none()
        return current_version, registered

    def _register_schema(
        self, conn: sa.Connection, dataset: str, schema: pa.Schema, mode: CommitMode
    ) -> tuple[int, dict[str, Any] | None]:
        """Check the staged schema against the registry; keep every version; refuse breaks."""
        fields = _schema_fields(schema)
        fingerprint = schema_fingerprint(schema)
        conn.execute(
            pg_insert(t.datasets)
            .values(name=dataset, commit_mode=mode, current_schema_version=1)
            .on_conflict_do_nothing()
        )
        # Commits whose schema matches the registry (nearly all) share the registry row, so
        # commits of different partitions run concurrently; one that registers a schema
        # version takes the row exclusively. Which lock is decided by an unlocked look first,
        # so no transaction upgrades a share lock (two upgrades would deadlock), except when a
        # registration lands between the look and the lock (then Postgres may abort one and
        # the writer retries the commit by its attempt id).
        _, seen = self._registered(conn, dataset, "none")
        matches = seen is not None and seen.schema_hash == fingerprint
        current_version, registered = self._registered(
            conn, dataset, "share" if matches else "update"
        )
        if matches and (registered is None or registered.schema_hash != fingerprint):
            current_version, registered = self._registered(conn, dataset, "update")
        if registered is None:
            conn.execute(
                t.dataset_schemas.insert().values(
                    dataset=dataset,
                    schema_version=current_version,
                    schema_hash=fingerprint,
                    schema_json=fields,
                )
            )
            return current_version, None
        if registered.schema_hash == fingerprint:
            return current_version, None
        drift = schema_drift(registered.schema_json, fields)
        breaking = drift["removed"] + [r["column"] for r in drift["retyped"]]
        added_required = [
            f["name"] for f in fields if f["name"] in drift["added"] and not f["nullable"]
        ]
        if breaking or added_required or drift["nullability"]:
            raise SchemaIncompatibleError(
                f"the data staged for {dataset} does not match its registered schema "
                f"v{current_version}: removed columns {drift['removed'] or 'none'}, retyped "
                f"{[r['column'] for r in drift['retyped']] or 'none'}, new non-nullable "
                f"{added_required or 'none'}, nullability changed "
                f"{drift['nullability'] or 'none'}. "
                "Keep the old columns and types (new columns must be nullable), or declare a "
                "new dataset"
            )
        new_version = current_version + 1
        conn.execute(
            t.dataset_schemas.insert().values(
                dataset=dataset,
                schema_version=new_version,
                schema_hash=fingerprint,
                schema_json=fields,
                drift=drift,
            )
        )
        conn.execute(
            t.datasets.update()
            .where(t.datasets.c.name == dataset)
            .values(current_schema_version=new_version)
        )
        return new_version, drift

    def _check_continuity(
        self, conn: sa.Connection, dataset: str, partition_key: str, source: dict[str, Any]
    ) -> None:
        """A range must link to its committed neighbours by parent hash; else a fork: refuse."""
        this = parse_partition_key(partition_key)
        neighbour_keys = [k for k in (this.previous_key(), this.next_key()) if k]
        rows = conn.execute(
            sa.select(t.versions.c.partition_key, t.versions.c.manifest)
            .join(
                t.pointers,
                (t.pointers.c.dataset == t.versions.c.dataset)
                & (t.pointers.c.partition_key == t.versions.c.partition_key)
                & (t.pointers.c.current_version == t.versions.c.version),
            )
            .where(t.versions.c.dataset == dataset)
            .where(t.versions.c.partition_key.in_(neighbour_keys))
        ).all()
        for key, manifest in rows:
            other = manifest.get("source") or {}
            if not other:
                continue
            if (
                key == this.previous_key()
                and other["last"]["hash"] != source["first"]["parent_hash"]
            ):
                raise ChainContinuityError(
                    f"{dataset} range {partition_key} starts at block {source['first']['number']} "
                    f"whose parent hash {source['first']['parent_hash']} is not the hash "
                    f"{other['last']['hash']} of block {other['last']['number']} committed in "
                    f"{key}: the chain forked between the two extractions. Nothing was "
                    f"committed; re-materialise {key} and {partition_key} from a finalized head"
                )
            if key == this.next_key() and other["first"]["parent_hash"] != source["last"]["hash"]:
                raise ChainContinuityError(
                    f"{dataset} range {partition_key} ends at block {source['last']['number']} "
                    f"with hash {source['last']['hash']}, but the committed range {key} says its "
                    f"parent is {other['first']['parent_hash']}: the chain forked between the "
                    f"two extractions. Nothing was committed; re-materialise both ranges"
                )


def _record(row: sa.Row[Any]) -> VersionRecord:
    return VersionRecord(
        dataset=row.dataset,
        partition_key=row.partition_key,
        version=row.version,
        attempt_id=str(row.attempt_id),
        commit_mode=row.commit_mode,
        schema_version=row.schema_version,
        manifest=Manifest.from_dict(row.manifest),
    )
