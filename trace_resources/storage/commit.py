"""The commit protocol: stage under the attempt's own prefix, verify, fenced commit.

    begin_attempt (take the fence) -> stage files -> verify staged objects -> commit
    (one Postgres transaction: fence check, version + manifest, pointer, outbox event)

A failure anywhere before the commit leaves only files under the attempt's prefix, which no
manifest references and which GC removes. Readers resolve files only through committed
manifests (`DatasetReader`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import sqlalchemy as sa

from trace_resources.errors import StagedObjectError
from trace_resources.storage.object_store import ObjectStore
from trace_resources.storage.paths import data_file_key
from trace_resources.storage.versions import (
    Attempt,
    CommitMode,
    CommitResult,
    FileEntry,
    Manifest,
    VersionRecord,
    VersionStore,
    schema_fingerprint,
)

__all__ = ["PartitionData", "StagedPartition", "DatasetWriter", "DatasetReader"]

log = logging.getLogger(__name__)

MAX_ROWS_PER_FILE = 2_000_000


@dataclass
class PartitionData:
    """One partition's table, with the source block hashes to record in its manifest."""

    table: pa.Table
    source: dict[str, Any] | None = None
    segment_key: str | None = None


@dataclass
class StagedPartition:
    """A partition uploaded under its attempt's prefix, waiting for its commit."""

    attempt: Attempt
    files: list[FileEntry]
    schema: pa.Schema
    source: dict[str, Any] | None = None
    segment_key: str | None = None

    @property
    def rows(self) -> int:
        return sum(f.rows for f in self.files)


class DatasetWriter:
    """Writes partitions of datasets through the commit protocol."""

    def __init__(self, store: ObjectStore, versions: VersionStore, commit_retries: int = 5) -> None:
        self.store = store
        self.versions = versions
        self.commit_retries = commit_retries

    def write(
        self,
        dataset: str,
        partition_key: str,
        data: PartitionData,
        *,
        mode: CommitMode = "replace",
        run_id: str | None = None,
        step_key: str | None = None,
        retry_number: int = 0,
    ) -> CommitResult:
        """Stage and commit one partition: one new version (or appended segment)."""
        staged = self.stage_partition(
            dataset,
            partition_key,
            data,
            run_id=run_id,
            step_key=step_key,
            retry_number=retry_number,
        )
        return self.commit_staged(staged, mode=mode)

    def stage_partition(
        self,
        dataset: str,
        partition_key: str,
        data: PartitionData,
        *,
        run_id: str | None = None,
        step_key: str | None = None,
        retry_number: int = 0,
    ) -> StagedPartition:
        """Take the fence with a new attempt and upload its files; nothing is visible yet."""
        attempt = self.versions.begin_attempt(
            dataset, partition_key, run_id=run_id, step_key=step_key, retry_number=retry_number
        )
        try:
            files = self.stage(attempt, data.table)
            self.verify_staged(files)
        except BaseException as exc:
            self._give_up(attempt, exc)
            raise
        return StagedPartition(attempt, files, data.table.schema, data.source, data.segment_key)

    def commit_staged(
        self, staged: StagedPartition, *, mode: CommitMode = "replace"
    ) -> CommitResult:
        """Commit staged (and verified) objects: fenced, idempotent by attempt id."""
        try:
            manifest = Manifest(
                files=staged.files,
                schema_hash=schema_fingerprint(staged.schema),
                source=staged.source,
            )
            return self.commit(
                staged.attempt, manifest, staged.schema, mode=mode, segment_key=staged.segment_key
            )
        except BaseException as exc:
            self._give_up(staged.attempt, exc)
            raise

    def stage(self, attempt: Attempt, table: pa.Table) -> list[FileEntry]:
        """Upload the table as Parquet under the attempt's own prefix (invisible to readers)."""
        files = []
        chunks = range(0, max(table.num_rows, 1), MAX_ROWS_PER_FILE)
        for index, offset in enumerate(chunks):
            key = data_file_key(attempt.dataset, attempt.partition_key, attempt.attempt_id, index)
            stored = self.store.write_parquet(key, table.slice(offset, MAX_ROWS_PER_FILE))
            files.append(FileEntry(stored.key, stored.size, stored.sha256, stored.rows))
        return files

    def verify_staged(self, files: Iterable[FileEntry]) -> None:
        """Every staged object exists with the size the writer recorded."""
        for entry in files:
            size = self.store.size(entry.key)
            if size != entry.size:
                raise StagedObjectError(
                    f"staged object {self.store.uri(entry.key)} is "
                    f"{'missing' if size is None else f'{size} bytes'}, expected {entry.size} "
                    "bytes; the upload did not complete, so nothing was committed. Retry the run"
                )

    def commit(
        self,
        attempt: Attempt,
        manifest: Manifest,
        schema: pa.Schema,
        *,
        mode: CommitMode,
        segment_key: str | None,
    ) -> CommitResult:
        """The fenced commit, retried by the same attempt id when its outcome is unknown."""
        for retry in range(self.commit_retries):
            try:
                return self.versions.commit(
                    attempt, manifest, schema, mode=mode, segment_key=segment_key
                )
            except sa.exc.OperationalError as exc:  # connection lost: did the commit land?
                if retry == self.commit_retries - 1:
                    raise
                log.warning(
                    "commit of attempt %s had an unknown outcome (%s); retrying",
                    attempt.attempt_id,
                    exc,
                )
                time.sleep(0.2 * 2**retry)
        raise AssertionError("unreachable")

    def _give_up(self, attempt: Attempt, exc: BaseException) -> None:
        try:
            self.versions.mark_failed(attempt)
        except Exception:  # the original error matters more; GC treats expired leases alike
            log.exception("could not mark attempt %s failed after %s", attempt.attempt_id, exc)


class DatasetReader:
    """Reads only what committed manifests reference, never by listing prefixes."""

    def __init__(self, store: ObjectStore, versions: VersionStore) -> None:
        self.store = store
        self.versions = versions

    def resolve(
        self, dataset: str, partition_keys: list[str] | None = None
    ) -> dict[str, VersionRecord]:
        return self.versions.current_versions(dataset, partition_keys)

    def read(
        self, dataset: str, partition_keys: list[str] | None = None, schema: pa.Schema | None = None
    ) -> pa.Table:
        records = self.resolve(dataset, partition_keys)
        if partition_keys is not None:
            missing = sorted(set(partition_keys) - set(records))
            if missing:
                raise FileNotFoundError(
                    f"{dataset} has no committed version for partition(s) {', '.join(missing[:5])}"
                    f"{' …' if len(missing) > 5 else ''}: materialise them first"
                )
        return self.read_versions(records.values(), schema)

    def read_versions(
        self, records: Iterable[VersionRecord], schema: pa.Schema | None = None
    ) -> pa.Table:
        ordered = sorted(records, key=lambda r: r.partition_key)
        keys = [f.key for r in ordered for f in r.manifest.files]
        return self.store.read_parquet(keys, schema=schema)
