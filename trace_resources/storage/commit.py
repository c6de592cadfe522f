"""The commit protocol: stage under the attempt's own prefix, verify, fenced commit.

    begin_attempt (take the fence) -> stage files -> verify staged objects -> commit
    (one Postgres transaction: fence check, version + manifest, pointer, outbox event)

A failure anywhere before the commit leaves only files under the attempt's prefix, which no
manifest references and which GC removes. Readers resolve files only through committed
manifests (`DatasetReader`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import time
import uuid
import weakref
from collections.abc import Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import pyarrow as pa
import sqlalchemy as sa

from trace_resources.errors import DatasetError, StagedObjectError, StagingError
from trace_resources.storage.crash import crash_point
from trace_resources.storage.lease import LeaseKeeper
from trace_resources.storage.object_store import ObjectStore
from trace_resources.storage.paths import data_file_key
from trace_resources.storage.records import (
    Attempt,
    BatchItem,
    BatchNotCommitted,
    CommitMode,
    CommitResult,
    FileEntry,
    Manifest,
    RuleResult,
    VersionRecord,
)
from trace_resources.storage.schemas import schema_fingerprint
from trace_resources.storage.version_store import VersionStore

__all__ = [
    "PartitionData",
    "StagedPartition",
    "DatasetWriter",
    "DatasetReader",
    "UpstreamQualityError",
]

log = logging.getLogger(__name__)

MAX_ROWS_PER_FILE = 2_000_000
UPLOAD_CONCURRENCY = 8


@dataclass
class PartitionData:
    """One partition's table, with the source block hashes to record in its manifest.

    In append mode `segment_key` (or several `segment_keys`, one per logical item the table
    holds) makes the append idempotent: keys already in the dataset make a retry a no-op.
    """

    table: pa.Table
    source: dict[str, Any] | None = None
    segment_key: str | None = None
    segment_keys: Sequence[str] | None = None

    def keys(self) -> list[str] | None:
        return _segment_keys(self.segment_key, self.segment_keys)


def _segment_keys(one: str | None, many: Sequence[str] | None) -> list[str] | None:
    if many is not None:
        return list(many)
    return None if one is None else [one]


@dataclass
class StagedPartition:
    """A partition uploaded under its attempt's prefix, waiting for its commit."""

    attempt: Attempt
    files: list[FileEntry]
    schema: pa.Schema
    source: dict[str, Any] | None = None
    segment_key: str | None = None
    segment_keys: Sequence[str] | None = None

    @property
    def rows(self) -> int:
        return sum(f.rows for f in self.files)


class DatasetWriter:
    """Writes partitions of datasets through the commit protocol.

    While an attempt is between `begin` and its commit (or failure), a heartbeat thread keeps
    its lease alive (`LeaseKeeper`), however long the writer takes. Close the writer (or use
    it as a context manager) when done; it is also closed when garbage collected.
    """

    def __init__(
        self,
        store: ObjectStore,
        versions: VersionStore,
        commit_retries: int = 5,
        *,
        max_rows_per_file: int = MAX_ROWS_PER_FILE,
        heartbeat_s: float | None = None,
        upload_concurrency: int = UPLOAD_CONCURRENCY,
    ) -> None:
        self.store = store
        self.versions = versions
        self.commit_retries = commit_retries
        self.max_rows_per_file = max_rows_per_file
        self.upload_concurrency = max(1, upload_concurrency)
        self.leases = LeaseKeeper(versions.attempts, heartbeat_s)
        weakref.finalize(self, self.leases.close)

    def close(self) -> None:
        self.leases.close()

    def __enter__(self) -> DatasetWriter:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

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
        commit_key: str | None = None,
    ) -> CommitResult:
        """Stage and commit one partition: one new version (or appended segment)."""
        staged = self.stage_partition(
            dataset,
            partition_key,
            data,
            run_id=run_id,
            step_key=step_key,
            retry_number=retry_number,
            mode=mode,
        )
        return self.commit_staged(staged, mode=mode, commit_key=commit_key)

    def stage_partition(
        self,
        dataset: str,
        partition_key: str,
        data: PartitionData,
        *,
        run_id: str | None = None,
        step_key: str | None = None,
        retry_number: int = 0,
        mode: CommitMode = "replace",
    ) -> StagedPartition:
        """Begin an attempt (a replace takes the fence) and upload its files; nothing is
        visible yet. The attempt's lease is kept alive until it commits or fails."""
        attempt = self.versions.attempts.begin(
            dataset,
            partition_key,
            run_id=run_id,
            step_key=step_key,
            retry_number=retry_number,
            mode=mode,
        )
        self.leases.track(attempt)
        try:
            files = self.stage(attempt, data.table)
            self.verify_staged(files)
        except BaseException as exc:
            self._give_up(attempt, exc)
            raise
        crash_point("stage.after_upload")
        return StagedPartition(
            attempt, files, data.table.schema, data.source, data.segment_key, data.segment_keys
        )

    def commit_staged(
        self,
        staged: StagedPartition,
        *,
        mode: CommitMode = "replace",
        commit_key: str | None = None,
    ) -> CommitResult:
        """Commit staged (and verified) objects: fenced, idempotent by attempt id."""
        try:
            manifest = Manifest(
                files=staged.files,
                schema_hash=schema_fingerprint(staged.schema),
                source=staged.source,
            )
            result = self.commit(
                staged.attempt,
                manifest,
                staged.schema,
                mode=mode,
                segment_keys=_segment_keys(staged.segment_key, staged.segment_keys),
                commit_key=commit_key,
            )
        except BaseException as exc:
            self._give_up(staged.attempt, exc)
            raise
        self.leases.release(staged.attempt)
        return result

    def write_many(
        self,
        dataset: str,
        partitions: Mapping[str, PartitionData],
        *,
        mode: CommitMode = "replace",
        run_id: str | None = None,
        step_key: str | None = None,
        retry_number: int = 0,
        commit_key: str | None = None,
    ) -> dict[str, CommitResult]:
        """Stage and commit many partitions of one dataset: one new version each.

        The same protocol as `write` for every partition, with the per-partition round trips
        batched: the attempts begin in one transaction, their files are uploaded and verified
        concurrently, and they commit in one transaction (`commit_staged_many`).
        """
        staged = self.stage_many(
            dataset,
            partitions,
            run_id=run_id,
            step_key=step_key,
            retry_number=retry_number,
            mode=mode,
        )
        return self.commit_staged_many(staged, mode=mode, commit_key=commit_key)

    def stage_many(
        self,
        dataset: str,
        partitions: Mapping[str, PartitionData],
        *,
        run_id: str | None = None,
        step_key: str | None = None,
        retry_number: int = 0,
        mode: CommitMode = "replace",
    ) -> list[StagedPartition]:
        """`stage_partition` for many partitions: one transaction begins every attempt (taking
        the fences), then the uploads and their verification run on a thread pool."""
        keys = sorted(partitions)
        attempts = self.versions.attempts.begin_many(
            dataset, keys, run_id=run_id, step_key=step_key, retry_number=retry_number, mode=mode
        )
        for attempt in attempts:
            self.leases.track(attempt)

        def upload(attempt: Attempt) -> list[FileEntry]:
            files = self.stage(attempt, partitions[attempt.partition_key].table)
            self.verify_staged(files)
            return files

        try:
            with ThreadPoolExecutor(
                max_workers=min(self.upload_concurrency, len(attempts) or 1),
                thread_name_prefix="trace-stage",
            ) as pool:
                uploaded = list(pool.map(upload, attempts))
        except BaseException as exc:
            for attempt in attempts:
                self._give_up(attempt, exc)
            raise
        crash_point("stage.after_upload")
        staged = []
        for attempt, files in zip(attempts, uploaded, strict=True):
            data = partitions[attempt.partition_key]
            staged.append(
                StagedPartition(
                    attempt,
                    files,
                    data.table.schema,
                    data.source,
                    data.segment_key,
                    data.segment_keys,
                )
            )
        return staged

    def commit_staged_many(
        self,
        staged: Sequence[StagedPartition],
        *,
        mode: CommitMode = "replace",
        commit_key: str | None = None,
    ) -> dict[str, CommitResult]:
        """Commit staged partitions in one Postgres transaction, keyed by partition.

        Each partition keeps every guarantee of `commit_staged` (fence, lease, commit key,
        schema registry, continuity, its own version and outbox event). If any of them would
        be refused, the batch changes nothing and the partitions are committed one by one in
        key order instead, so each outcome (committed, fenced, expired) is recorded exactly as
        without batching, and the first refusal is raised.
        """
        ordered = sorted(staged, key=lambda s: s.attempt.partition_key)
        if len(ordered) == 1:
            only = ordered[0]
            return {
                only.attempt.partition_key: self.commit_staged(
                    only, mode=mode, commit_key=commit_key
                )
            }
        items = [
            BatchItem(
                s.attempt,
                Manifest(files=s.files, schema_hash=schema_fingerprint(s.schema), source=s.source),
                s.schema,
                _segment_keys(s.segment_key, s.segment_keys),
            )
            for s in ordered
        ]
        try:
            results = self._commit_batch(items, mode=mode, commit_key=commit_key)
        except BatchNotCommitted as exc:
            log.info(
                "batch commit of %d partitions refused (%s); committing one by one", len(items), exc
            )
            return self._commit_one_by_one(ordered, mode=mode, commit_key=commit_key)
        except BaseException as exc:
            for s in ordered:
                self._give_up(s.attempt, exc)
            raise
        for s in ordered:
            self.leases.release(s.attempt)
        return {s.attempt.partition_key: r for s, r in zip(ordered, results, strict=True)}

    def _commit_one_by_one(
        self, ordered: Sequence[StagedPartition], *, mode: CommitMode, commit_key: str | None
    ) -> dict[str, CommitResult]:
        results: dict[str, CommitResult] = {}
        for index, s in enumerate(ordered):
            try:
                results[s.attempt.partition_key] = self.commit_staged(
                    s, mode=mode, commit_key=commit_key
                )
            except BaseException as exc:
                for rest in ordered[index + 1 :]:
                    self._give_up(rest.attempt, exc)
                raise
        return results

    def _commit_batch(
        self, items: Sequence[BatchItem], *, mode: CommitMode, commit_key: str | None
    ) -> list[CommitResult]:
        """`commit_many`, retried by the same attempt ids when its outcome is unknown (as
        `commit` is): attempts that landed return their versions on the retry."""
        for retry in range(self.commit_retries):
            try:
                results = self.versions.commits.commit_many(items, mode=mode, commit_key=commit_key)
            except sa.exc.OperationalError as exc:
                if retry == self.commit_retries - 1:
                    raise
                log.warning(
                    "batch commit of %d attempts had an unknown outcome (%s); retrying",
                    len(items),
                    exc,
                )
                time.sleep(0.2 * 2**retry)
                continue
            crash_point("commit.after_pg_commit")
            return results
        raise AssertionError("unreachable")

    def stage(self, attempt: Attempt, table: pa.Table) -> list[FileEntry]:
        """Upload the table as Parquet under the attempt's own prefix (invisible to readers)."""
        files = []
        step = self.max_rows_per_file
        chunks = range(0, max(table.num_rows, 1), step)
        for index, offset in enumerate(chunks):
            if index:
                crash_point("stage.during_upload")
            key = data_file_key(attempt.dataset, attempt.partition_key, attempt.attempt_id, index)
            try:
                stored = self.store.write_parquet(key, table.slice(offset, step))
            except OSError as exc:
                raise StagingError(
                    f"uploading {self.store.uri(key)} failed: {exc}. Nothing was committed; the "
                    "attempt's files are left for `trace staging-cleanup`. Retry the run once "
                    "the object store answers"
                ) from exc
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
        segment_keys: Sequence[str] | None = None,
        commit_key: str | None = None,
    ) -> CommitResult:
        """The fenced commit, retried by the same attempt id when its outcome is unknown.

        A lost connection during COMMIT leaves the outcome unknown: the transaction may have
        landed or not. Retrying with the same attempt id is safe either way: if it landed the
        attempt is 'committed' and the retry returns that version; if not, the retry commits.
        """
        for retry in range(self.commit_retries):
            try:
                result = self.versions.commits.commit(
                    attempt,
                    manifest,
                    schema,
                    mode=mode,
                    segment_keys=segment_keys,
                    commit_key=commit_key,
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
                continue
            crash_point("commit.after_pg_commit")
            return result
        raise AssertionError("unreachable")

    def _give_up(self, attempt: Attempt, exc: BaseException) -> None:
        self.leases.release(attempt)
        try:
            self.versions.attempts.mark_failed(attempt)
        except Exception:  # the original error matters more; GC treats expired leases alike
            log.exception("could not mark attempt %s failed after %s", attempt.attempt_id, exc)


class UpstreamQualityError(DatasetError):
    """A committed version failed a blocking quality rule: nothing downstream reads it."""

    def __init__(self, dataset: str, failures: Sequence[RuleResult]) -> None:
        self.dataset = dataset
        self.failures = list(failures)
        keys = sorted({f.partition_key for f in failures})
        super().__init__(
            f"{dataset} partition(s) {', '.join(keys)} failed blocking quality rule(s), so "
            "nothing downstream may read them (circuit breaker): "
            + " | ".join(f.summary() for f in failures)
            + f". Fix the data and re-materialise {dataset} for these partitions (a new "
            "version whose checks pass unblocks them), or relax the rule in its declaration"
        )


class DatasetReader:
    """Reads only what committed manifests reference, never by listing prefixes.

    Every read pins the versions it resolved (`trace_pins`) until it is done, so GC never
    removes a version while it is being read, however old it becomes meanwhile.
    """

    def __init__(
        self, store: ObjectStore, versions: VersionStore, *, pin_ttl_s: float = 3600.0
    ) -> None:
        self.store = store
        self.versions = versions
        self.pin_ttl_s = pin_ttl_s

    @staticmethod
    def new_reader_id() -> str:
        return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4()}"

    def resolve(
        self, dataset: str, partition_keys: list[str] | None = None
    ) -> dict[str, VersionRecord]:
        """Current versions, unpinned: for inspection, not for reading files."""
        return self.versions.read.current_versions(dataset, partition_keys)

    @contextlib.contextmanager
    def pinned(
        self, dataset: str, partition_keys: list[str] | None = None
    ) -> Iterator[dict[str, VersionRecord]]:
        """Resolve and pin the current versions for the duration of the block."""
        reader_id = self.new_reader_id()
        try:
            yield self.versions.pins.pin_current(reader_id, dataset, partition_keys, self.pin_ttl_s)
        finally:
            self.versions.pins.unpin(reader_id)

    @contextlib.contextmanager
    def pinned_version(
        self, dataset: str, partition_key: str, version: int
    ) -> Iterator[VersionRecord]:
        """Pin one version (e.g. a superseded one) for the duration of the block."""
        reader_id = self.new_reader_id()
        try:
            yield self.versions.pins.pin_version(
                reader_id, dataset, partition_key, version, self.pin_ttl_s
            )
        finally:
            self.versions.pins.unpin(reader_id)

    def read(
        self,
        dataset: str,
        partition_keys: list[str] | None = None,
        schema: pa.Schema | None = None,
        *,
        refuse_failed_checks: bool = False,
    ) -> pa.Table:
        """The current versions of the partitions (all if None) as one table.

        With `refuse_failed_checks`, raise `UpstreamQualityError` instead if a blocking
        quality rule failed on any of those versions (what derived datasets read with).
        """
        with self.pinned(dataset, partition_keys) as records:
            if partition_keys is not None:
                missing = sorted(set(partition_keys) - set(records))
                if missing:
                    raise FileNotFoundError(
                        f"{dataset} has no committed version for partition(s) "
                        f"{', '.join(missing[:5])}{' …' if len(missing) > 5 else ''}: "
                        "materialise them first"
                    )
            if refuse_failed_checks:
                self.refuse_failed(dataset, records)
            return self.read_versions(records.values(), schema)

    def refuse_failed(self, dataset: str, records: Mapping[str, VersionRecord]) -> None:
        """Raise `UpstreamQualityError` if a blocking rule failed on any of these versions."""
        failures = self.versions.quality.failed_blocking(
            dataset, {k: r.version for k, r in records.items()}
        )
        if failures:
            raise UpstreamQualityError(dataset, failures)

    def read_version(
        self, dataset: str, partition_key: str, version: int, schema: pa.Schema | None = None
    ) -> pa.Table:
        """One version, current or superseded (if GC kept it)."""
        with self.pinned_version(dataset, partition_key, version) as record:
            return self.read_versions([record], schema)

    def read_versions(
        self, records: Iterable[VersionRecord], schema: pa.Schema | None = None
    ) -> pa.Table:
        ordered = sorted(records, key=lambda r: r.partition_key)
        keys = [f.key for r in ordered for f in r.manifest.files]
        return self.store.read_parquet(keys, schema=schema)
