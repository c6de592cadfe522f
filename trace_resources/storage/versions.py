"""The version store: attempts, fences, schema registry, versions, pointers, outbox.

Every state change of the commit protocol is one method here and one Postgres transaction.
The protocol's order of steps (stage, verify, commit) lives in `commit.py`.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from dataclasses import dataclass, field
from typing import Any, Literal

import pyarrow as pa
import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import insert as pg_insert

from trace_resources.chain.ranges import parse_partition_key
from trace_resources.errors import (
    AttemptFencedError,
    ChainContinuityError,
    CommitError,
    SchemaIncompatibleError,
)
from trace_resources.storage import state as t

__all__ = [
    "Attempt",
    "CommitMode",
    "CommitResult",
    "FileEntry",
    "Manifest",
    "VersionRecord",
    "VersionStore",
    "schema_fingerprint",
    "schema_drift",
]

CommitMode = Literal["replace", "append"]
COMMITTED_EVENT = "dataset_version_committed"


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
class CommitResult:
    version: VersionRecord
    already_committed: bool
    schema_version: int
    drift: dict[str, Any] | None


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

    # -- attempts and fences -----------------------------------------------------------

    def begin_attempt(
        self,
        dataset: str,
        partition_key: str,
        *,
        run_id: str | None = None,
        step_key: str | None = None,
        retry_number: int = 0,
    ) -> Attempt:
        """Record a new attempt and take the fence: any older attempt can no longer commit."""
        attempt_id = str(uuid.uuid4())
        with self.engine.begin() as conn:
            fence = conn.execute(
                pg_insert(t.fences)
                .values(dataset=dataset, partition_key=partition_key, fence=1)
                .on_conflict_do_update(
                    index_elements=["dataset", "partition_key"],
                    set_={"fence": t.fences.c.fence + 1},
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
                    lease_expires_at=sa.func.now()
                    + sa.text(f"interval '{int(self.lease_s)} seconds'"),
                )
            )
        return Attempt(attempt_id, dataset, partition_key, fence, run_id, step_key, retry_number)

    def extend_lease(self, attempt: Attempt) -> None:
        self.extend_leases([attempt])

    def extend_leases(self, attempts: list[Attempt]) -> None:
        """Heartbeat: keep the staged files of live attempts safe from GC."""
        if not attempts:
            return
        with self.engine.begin() as conn:
            conn.execute(
                t.attempts.update()
                .where(t.attempts.c.attempt_id.in_([a.attempt_id for a in attempts]))
                .where(t.attempts.c.state == "staging")
                .values(
                    lease_expires_at=sa.func.now()
                    + sa.text(f"interval '{int(self.lease_s)} seconds'"),
                    updated_at=sa.func.now(),
                )
            )

    def mark_failed(self, attempt: Attempt, state: str = "failed") -> None:
        """Best-effort note that an attempt ended without committing (GC cleans its files)."""
        with self.engine.begin() as conn:
            conn.execute(
                t.attempts.update()
                .where(t.attempts.c.attempt_id == attempt.attempt_id)
                .where(t.attempts.c.state == "staging")
                .values(state=state, updated_at=sa.func.now())
            )

    # -- the commit ----------------------------------------------------------------------

    def commit(
        self,
        attempt: Attempt,
        manifest: Manifest,
        schema: pa.Schema,
        *,
        mode: CommitMode = "replace",
        segment_key: str | None = None,
    ) -> CommitResult:
        """Fenced commit in one transaction: version, manifest, pointer and outbox event.

        Idempotent by attempt id: calling it again after an unknown outcome returns the
        version that landed. In append mode a segment already in the current version is a
        no-op.
        """
        with self.engine.begin() as conn:
            row = conn.execute(
                sa.select(t.attempts)
                .where(t.attempts.c.attempt_id == attempt.attempt_id)
                .with_for_update()
            ).one_or_none()
            if row is None:
                raise CommitError(f"attempt {attempt.attempt_id} is unknown to the version store")
            if row.state == "committed":
                record = self._version(
                    conn, attempt.dataset, attempt.partition_key, row.committed_version
                )
                return CommitResult(record, True, record.schema_version, None)
            if row.state != "staging":
                raise AttemptFencedError(
                    f"attempt {attempt.attempt_id} of {attempt.dataset}/{attempt.partition_key} "
                    f"is {row.state!r} and can no longer commit; its files are never referenced"
                )
            fence = conn.execute(
                sa.select(t.fences.c.fence)
                .where(t.fences.c.dataset == attempt.dataset)
                .where(t.fences.c.partition_key == attempt.partition_key)
                .with_for_update()
            ).scalar_one()
            if fence == attempt.fence:
                return self._commit_fenced(conn, attempt, manifest, schema, mode, segment_key)
            # recorded (the transaction commits) before the refusal is raised
            self._set_state(conn, attempt, "fenced")
        raise AttemptFencedError(
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
        segment_key: str | None,
    ) -> CommitResult:
        """The commit proper, once the attempt is known to hold the fence (row locked)."""
        schema_version, drift = self._register_schema(conn, attempt.dataset, schema, mode)
        current = self._current(conn, attempt.dataset, attempt.partition_key)
        if mode == "append":
            manifest, duplicate = self._appended(current, manifest, segment_key, attempt)
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

    # -- reads ---------------------------------------------------------------------------

    def current_versions(
        self, dataset: str, partition_keys: list[str] | None = None
    ) -> dict[str, VersionRecord]:
        """Current version of each committed partition (all partitions if keys is None)."""
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
            query = query.where(t.versions.c.partition_key.in_(partition_keys))
        with self.engine.connect() as conn:
            return {r.partition_key: _record(r) for r in conn.execute(query)}

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
        current: VersionRecord | None, manifest: Manifest, segment_key: str | None, attempt: Attempt
    ) -> tuple[Manifest, bool]:
        key = segment_key or attempt.attempt_id
        segment = {
            "segment_key": key,
            "attempt_id": attempt.attempt_id,
            "files": [f.key for f in manifest.files],
        }
        if current is None:
            return Manifest(manifest.files, manifest.schema_hash, manifest.source, [segment]), False
        if any(s["segment_key"] == key for s in current.manifest.segments):
            return current.manifest, True
        merged = Manifest(
            files=[*current.manifest.files, *manifest.files],
            schema_hash=manifest.schema_hash,
            source=manifest.source or current.manifest.source,
            segments=[*current.manifest.segments, segment],
        )
        return merged, False

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
        current_version = conn.execute(
            sa.select(t.datasets.c.current_schema_version)
            .where(t.datasets.c.name == dataset)
            .with_for_update()
        ).scalar_one()
        registered = conn.execute(
            sa.select(t.dataset_schemas)
            .where(t.dataset_schemas.c.dataset == dataset)
            .where(t.dataset_schemas.c.schema_version == current_version)
        ).one_or_none()
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
