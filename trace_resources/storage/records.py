"""The version store's records: what an attempt, a manifest, a version, a rule outcome, an
outbox event and a GC removal are, as plain values; and the two small SQL helpers every
concern of the version store shares (a row as a `VersionRecord`, seconds as an interval).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal

import pyarrow as pa
import sqlalchemy as sa

from trace_resources.errors import CommitError

__all__ = [
    "COMMITTED_EVENT",
    "CommitHook",
    "Attempt",
    "AttemptRow",
    "BatchItem",
    "BatchNotCommitted",
    "CommitMode",
    "CommitResult",
    "CommittedVersion",
    "CompactionPlan",
    "DatasetSummary",
    "FileEntry",
    "Manifest",
    "OutboxEvent",
    "PartitionSummary",
    "RemovedVersion",
    "RuleResult",
    "StorageSnapshot",
    "VersionRecord",
    "interval",
    "version_record",
    "window",
    "SegmentInfo",
]

CommitMode = Literal["replace", "append"]
COMMITTED_EVENT = "dataset_version_committed"


def interval(seconds: float) -> sa.ColumnElement[Any]:
    """An SQL interval of `seconds` (leases, pin lifetimes, GC ages)."""
    return sa.func.make_interval(0, 0, 0, 0, 0, 0, float(seconds))


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
    # replace attempts take the fence; appends are blind (see `Attempts.begin`)
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
    """What a version is made of. Readers resolve files only from here.

    `files` are every file of the version in read order. A version of an open (append-mode)
    partition stores only its base files in its manifest row (`"files"`: what compaction
    wrote, and segments of manifests from before segments were rows) and the window of live
    segments `live_from_seq < seq <= through_seq` of `trace_segments`, whose files follow the
    base files in seq order; `base_files` says how many of `files` are base files. The read
    model resolves the window (`read_model.expand`), so a `Manifest` from a `VersionRecord`
    always lists every file. `segments` is the pre-segment-row format (kept for old rows).
    """

    files: list[FileEntry]
    schema_hash: str
    source: dict[str, Any] | None = None
    segments: list[dict[str, Any]] = field(default_factory=list)
    live_from_seq: int | None = None
    through_seq: int | None = None
    base_files: int | None = None

    @property
    def rows(self) -> int:
        return sum(f.rows for f in self.files)

    @property
    def bytes(self) -> int:
        return sum(f.size for f in self.files)

    @property
    def is_open(self) -> bool:
        """A version of an open partition (append mode, segments as rows)."""
        return self.through_seq is not None

    def as_dict(self) -> dict[str, Any]:
        stored = self.files if self.base_files is None else self.files[: self.base_files]
        data: dict[str, Any] = {
            "files": [f.as_dict() for f in stored],
            "rows": self.rows,
            "bytes": self.bytes,
            "schema_hash": self.schema_hash,
            "source": self.source,
        }
        if self.segments:
            data["segments"] = self.segments
        if self.through_seq is not None:
            data["live_from_seq"] = self.live_from_seq or 0
            data["through_seq"] = self.through_seq
        return data

    def content_hash(self) -> str:
        """sha256 of the version's data: its files' checksums, rows and sizes in read order,
        its schema and source blocks (what an unchanged replace is compared on), and an open
        version's segment window. An unchanged replace keeps the version, so its hash."""
        content = {
            "files": [(f.sha256, f.rows, f.size) for f in self.files],
            "schema_hash": self.schema_hash,
            "source": self.source,
            "segments": self.segments,
            "window": (self.live_from_seq, self.through_seq),
        }
        encoded = json.dumps(content, sort_keys=True, separators=(",", ":"), default=str)
        return hashlib.sha256(encoded.encode()).hexdigest()

    def segment_keys(self) -> set[str]:
        """Keys of the pre-segment-row format's segments (`ReadModel.appended_keys` has all)."""
        return {k for s in self.segments for k in s.get("keys") or [s["segment_key"]]}

    @classmethod
    def from_dict(cls, data: dict[str, Any], segment_files: Sequence[FileEntry] = ()) -> Manifest:
        """A manifest row; `segment_files`: the files of its live window (see `window`)."""
        base = [FileEntry(**f) for f in data["files"]]
        through = data.get("through_seq")
        return cls(
            files=[*base, *segment_files],
            schema_hash=data["schema_hash"],
            source=data.get("source"),
            segments=list(data.get("segments") or []),
            live_from_seq=None if through is None else int(data.get("live_from_seq") or 0),
            through_seq=None if through is None else int(through),
            base_files=None if through is None else len(base),
        )


def window(manifest: Mapping[str, Any] | None) -> tuple[int, int] | None:
    """The live segment window (live_from_seq, through_seq] of a manifest row, if open."""
    if not manifest or manifest.get("through_seq") is None:
        return None
    return int(manifest.get("live_from_seq") or 0), int(manifest["through_seq"])


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
    """One staged attempt of a batch commit (`FencedCommits.commit_many`)."""

    attempt: Attempt
    manifest: Manifest
    schema: pa.Schema
    segment_keys: Sequence[str] | None = None


class BatchNotCommitted(CommitError):
    """A batch commit was rolled back as a whole because one of its attempts would have been
    refused or failed; nothing of the batch changed. Commit the attempts one by one."""


@dataclass(frozen=True)
class CommitResult:
    """A commit's outcome. For a new append, `version.manifest` lists the appended segment's
    files only (its `through_seq` is the segment's seq, `segment_seq`): listing the version's
    every file would make an append cost grow with the partition; the read model resolves
    them. Every other result (replace, a retry that had landed, an unchanged replace) carries
    the full version."""

    version: VersionRecord
    already_committed: bool
    schema_version: int
    drift: dict[str, Any] | None
    segment_seq: int | None = None
    # a replace whose staged files had the current sealed version's content (checksums,
    # rows, schema, source): recorded on the attempt as 'unchanged', `version` is the one kept
    # (no new version, no outbox event)
    unchanged: bool = False


# what must commit with a batch of attempts, written in their transaction: (the connection,
# their results in the order given) -> None (`FencedCommits.commit_many(within=...)`)
CommitHook = Callable[[sa.Connection, list[CommitResult]], None]


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


@dataclass(frozen=True)
class DatasetSummary:
    dataset: str
    partitions: int
    rows: int
    bytes: int
    versions: int  # committed versions over all partitions, superseded ones included
    latest_commit: str | None


@dataclass(frozen=True)
class CompactionPlan:
    """What a compaction read from an open version: its window's start (`live_from_seq`), the
    last seq it merged (`through_seq`), the version's base files, whether the merged file
    replaces them too (`merges_base`) and the bytes of the files it replaces."""

    live_from_seq: int
    through_seq: int
    base_keys: tuple[str, ...]
    merges_base: bool
    replaced_bytes: int


@dataclass(frozen=True)
class SegmentInfo:
    """One append to an open partition (`ReadModel.open_segments`)."""

    seq: int
    version: int  # the version the append made
    first_block: int | None
    last_block: int | None
    rows: int
    bytes: int
    source: dict[str, Any] | None
    files: list[FileEntry]
    created_at: datetime


@dataclass(frozen=True)
class PartitionSummary:
    """A partition's current version, without its file list (discovery)."""

    dataset: str
    partition_key: str
    version: int
    rows: int
    bytes: int
    committed_at: datetime


def version_record(row: sa.Row[Any], segment_files: Sequence[FileEntry] = ()) -> VersionRecord:
    """A version row as a record; an open version needs its live window's `segment_files`
    (`read_model.expand` reads them; use it rather than this)."""
    return VersionRecord(
        dataset=row.dataset,
        partition_key=row.partition_key,
        version=row.version,
        attempt_id=str(row.attempt_id),
        commit_mode=row.commit_mode,
        schema_version=row.schema_version,
        manifest=Manifest.from_dict(row.manifest, segment_files),
    )
