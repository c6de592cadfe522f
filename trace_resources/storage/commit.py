"""The commit protocol: stage under the attempt's own prefix, verify, fenced commit.

    DatasetWriter.stage: begin attempts (take the fences) -> upload files -> verify them
    DatasetWriter.commit: one Postgres transaction (fence check, version + manifest,
        pointer, outbox event) for every staged partition -- or DatasetWriter.abort

A failure anywhere before the commit leaves only files under the attempt's prefix, which no
manifest references and which GC removes. Readers resolve files only through committed
manifests (`DatasetReader`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
import time
import uuid
import weakref
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from types import TracebackType
from typing import Any, TypeVar

import pyarrow as pa
import sqlalchemy as sa

from trace_resources.errors import DatasetError, StagedObjectError, StagingError
from trace_resources.storage.crash import crash_point
from trace_resources.storage.lease import LeaseKeeper
from trace_resources.storage.object_store import ObjectStore
from trace_resources.storage.paths import attempt_prefix, data_file_key
from trace_resources.storage.records import (
    Attempt,
    BatchItem,
    BatchNotCommitted,
    CommitHook,
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
    "StepIdentity",
    "DatasetWriter",
    "DatasetReader",
    "ReadCache",
    "UpstreamQualityError",
]

log = logging.getLogger(__name__)

MAX_ROWS_PER_FILE = 2_000_000
UPLOAD_CONCURRENCY = 8

_T = TypeVar("_T")


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
        if self.segment_keys is not None:
            return list(self.segment_keys)
        return None if self.segment_key is None else [self.segment_key]


@dataclass(frozen=True)
class StepIdentity:
    """Who makes an attempt, recorded with it: a Dagster step's run id, key and retry number
    (all unset outside Dagster)."""

    run_id: str | None = None
    step_key: str | None = None
    retry_number: int = 0


@dataclass
class StagedPartition:
    """A partition uploaded under its attempt's prefix, waiting for its commit."""

    attempt: Attempt
    files: list[FileEntry]
    schema: pa.Schema
    source: dict[str, Any] | None = None
    segment_keys: list[str] | None = None

    @property
    def rows(self) -> int:
        return sum(f.rows for f in self.files)

    def batch_item(self) -> BatchItem:
        manifest = Manifest(
            files=self.files, schema_hash=schema_fingerprint(self.schema), source=self.source
        )
        return BatchItem(self.attempt, manifest, self.schema, self.segment_keys)


class DatasetWriter:
    """Writes partitions of datasets through the commit protocol: `stage`, then `commit` (or
    `abort`); `write` does both for one partition.

    Dagster assets never call it: `DatasetIOManager` is the one caller that begins, commits
    and fails their attempts. While an attempt is between `stage` and its commit (or failure),
    a heartbeat thread keeps its lease alive (`LeaseKeeper`), however long the writer takes.
    Close the writer (or use it as a context manager) when done; it is also closed when
    garbage collected.
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

    def correlate(self, correlation_id: str | None, process: str = "writer") -> None:
        """Commit the versions of this writer under a unit of work's correlation id: each one's
        outbox event carries it and a `commit` hop is recorded in its transaction (message
        history, `trace_resources.event_history`). None: no history."""
        self.versions.commits.correlation = (
            None if correlation_id is None else (correlation_id, process)
        )

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
        commit_key: str | None = None,
    ) -> CommitResult:
        """Stage and commit one partition: one new version (or appended segment). For code
        outside Dagster (tests, benchmarks, the demo)."""
        staged = self.stage(dataset, {partition_key: data}, mode=mode)
        return self.commit(staged, commit_key=commit_key)[partition_key]

    def stage(
        self,
        dataset: str,
        partitions: Mapping[str, PartitionData],
        *,
        mode: CommitMode = "replace",
        step: StepIdentity | None = None,
    ) -> list[StagedPartition]:
        """Begin one attempt per partition (one transaction; a replace takes the fences), then
        upload and verify each one's files under its own prefix, concurrently. Nothing is
        visible yet; the attempts' leases are kept alive until they commit or are aborted. If
        any upload fails, every attempt begun here is failed. In partition key order."""
        step = step or StepIdentity()
        attempts = self.versions.attempts.begin_many(
            dataset,
            list(partitions),
            run_id=step.run_id,
            step_key=step.step_key,
            retry_number=step.retry_number,
            mode=mode,
        )
        for attempt in attempts:
            self.leases.track(attempt)
        try:
            uploaded = self._upload_all(attempts, partitions)
        except BaseException as exc:
            self._give_up(attempts, exc)
            raise
        crash_point("stage.after_upload")
        staged = []
        for attempt, files in zip(attempts, uploaded, strict=True):
            data = partitions[attempt.partition_key]
            staged.append(
                StagedPartition(attempt, files, data.table.schema, data.source, data.keys())
            )
        return staged

    def begin(
        self,
        dataset: str,
        partition_keys: Sequence[str],
        *,
        mode: CommitMode = "replace",
        step: StepIdentity | None = None,
    ) -> list[Attempt]:
        """Begin one attempt per partition (as `stage` does) whose files another process
        uploads under the attempt's prefix (a Python transform, with a task token); `adopt`
        each once its files are verified, or `fail` it. Leases are kept alive meanwhile."""
        step = step or StepIdentity()
        attempts = self.versions.attempts.begin_many(
            dataset,
            list(partition_keys),
            run_id=step.run_id,
            step_key=step.step_key,
            retry_number=step.retry_number,
            mode=mode,
        )
        for attempt in attempts:
            self.leases.track(attempt)
        return attempts

    def adopt(
        self, attempt: Attempt, files: Sequence[FileEntry], schema: pa.Schema
    ) -> StagedPartition:
        """An attempt begun by `begin` as staged: `files` (key, size, sha256 and rows of the
        bytes the caller verified) must lie under the attempt's own prefix."""
        prefix = attempt_prefix(attempt.dataset, attempt.partition_key, attempt.attempt_id)
        outside = [f.key for f in files if not f.key.startswith(prefix)]
        if outside:
            raise StagedObjectError(
                f"{outside[0]} is not under the attempt's prefix {prefix}; nothing was committed"
            )
        return StagedPartition(attempt, list(files), schema)

    def fail(self, attempts: Iterable[Attempt]) -> None:
        """Fail attempts begun by `begin` that will not be committed."""
        self._give_up(attempts, None)

    def commit(
        self, staged: Sequence[StagedPartition], *, commit_key: str | None = None
    ) -> dict[str, CommitResult]:
        """Commit staged partitions in one Postgres transaction, keyed by partition: fenced,
        and idempotent by attempt id (a retry of a commit that landed returns its version).

        Each partition keeps every guarantee of a commit of its own (fence, lease, commit key,
        schema registry, continuity, its own version and outbox event). If any of them would
        be refused, the batch changes nothing and the partitions are committed one by one in
        key order instead, so each outcome (committed, fenced, expired) is recorded exactly as
        without batching, and the first refusal is raised. Whatever is not committed when it
        raises is failed.
        """
        ordered = sorted(staged, key=lambda s: s.attempt.partition_key)
        if len(ordered) == 1:
            return {ordered[0].attempt.partition_key: self._commit_one(ordered[0], commit_key)}
        attempts = [s.attempt for s in ordered]
        try:
            mode = _one_mode(attempts)
            items = [s.batch_item() for s in ordered]
            results = self._retrying(
                f"batch commit of {len(items)} attempts",
                lambda: self.versions.commits.commit_many(items, mode=mode, commit_key=commit_key),
            )
        except BatchNotCommitted as exc:
            log.info(
                "batch commit of %d partitions refused (%s); committing one by one",
                len(ordered),
                exc,
            )
            return self._commit_one_by_one(ordered, commit_key)
        except BaseException as exc:
            self._give_up(attempts, exc)
            raise
        for attempt in attempts:
            self.leases.release(attempt)
        return {s.attempt.partition_key: r for s, r in zip(ordered, results, strict=True)}

    def commit_together(
        self,
        staged: Sequence[StagedPartition],
        *,
        commit_key: str | None = None,
        within: CommitHook | None = None,
        guard: Callable[[sa.Connection], None] | None = None,
    ) -> list[CommitResult]:
        """Commit staged partitions of several datasets in ONE transaction, all or nothing
        (a block's segment of every head dataset, a range of every raw dataset). A refusal of
        any of them raises `BatchNotCommitted` (its cause: the refusal) and fails every
        attempt; an unknown outcome is retried by the same attempt ids. With `commit_key`, a
        partition that writer already committed keeps that version (`already_committed`).
        `within` writes what commits with them, in their transaction (`commit_many`); `guard`
        runs first in it and may refuse it (a leader lease's fence). Results in the order
        given."""
        attempts = [s.attempt for s in staged]
        try:
            mode = _one_mode(attempts)
            items = [s.batch_item() for s in staged]
            results = self._retrying(
                f"commit of {len(items)} attempts together",
                lambda: self.versions.commits.commit_many(
                    items, mode=mode, commit_key=commit_key, within=within, guard=guard
                ),
            )
        except BaseException as exc:
            self._give_up(attempts, exc)
            raise
        for attempt in attempts:
            self.leases.release(attempt)
        return results

    def abort(self, staged: Iterable[StagedPartition]) -> None:
        """Fail staged partitions that will not be committed: their files are left for GC at
        once instead of when their leases run out. A partition that committed stays so."""
        self._give_up([s.attempt for s in staged], None)

    def _commit_one(self, staged: StagedPartition, commit_key: str | None) -> CommitResult:
        item = staged.batch_item()
        try:
            result = self._retrying(
                f"commit of attempt {staged.attempt.attempt_id}",
                lambda: self.versions.commits.commit(
                    item.attempt,
                    item.manifest,
                    item.schema,
                    mode=item.attempt.mode,
                    segment_keys=item.segment_keys,
                    commit_key=commit_key,
                ),
            )
        except BaseException as exc:
            self._give_up([staged.attempt], exc)
            raise
        self.leases.release(staged.attempt)
        return result

    def _commit_one_by_one(
        self, ordered: Sequence[StagedPartition], commit_key: str | None
    ) -> dict[str, CommitResult]:
        results: dict[str, CommitResult] = {}
        for index, s in enumerate(ordered):
            try:
                results[s.attempt.partition_key] = self._commit_one(s, commit_key)
            except BaseException as exc:
                self._give_up([rest.attempt for rest in ordered[index + 1 :]], exc)
                raise
        return results

    def _retrying(self, what: str, commit: Callable[[], _T]) -> _T:
        """Run a commit, retried by the same attempt ids when its outcome is unknown.

        A lost connection during COMMIT leaves the outcome unknown: the transaction may have
        landed or not. Retrying with the same attempt ids is safe either way: attempts that
        landed are 'committed' and the retry returns their versions; if not, the retry commits.
        """
        for retry in range(self.commit_retries):
            try:
                result = commit()
            except sa.exc.OperationalError as exc:  # connection lost: did the commit land?
                if retry == self.commit_retries - 1:
                    raise
                log.warning("%s had an unknown outcome (%s); retrying", what, exc)
                time.sleep(0.2 * 2**retry)
                continue
            crash_point("commit.after_pg_commit")
            return result
        raise AssertionError("unreachable")

    def _upload_all(
        self, attempts: Sequence[Attempt], partitions: Mapping[str, PartitionData]
    ) -> list[list[FileEntry]]:
        def upload(attempt: Attempt) -> list[FileEntry]:
            files = self._upload(attempt, partitions[attempt.partition_key].table)
            self._verify(files)
            return files

        if len(attempts) == 1:
            return [upload(attempts[0])]
        with ThreadPoolExecutor(
            max_workers=min(self.upload_concurrency, len(attempts) or 1),
            thread_name_prefix="trace-stage",
        ) as pool:
            return list(pool.map(upload, attempts))

    def _upload(self, attempt: Attempt, table: pa.Table) -> list[FileEntry]:
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

    def _verify(self, files: Iterable[FileEntry]) -> None:
        """Every staged object exists with the size the writer recorded."""
        for entry in files:
            size = self.store.size(entry.key)
            if size != entry.size:
                raise StagedObjectError(
                    f"staged object {self.store.uri(entry.key)} is "
                    f"{'missing' if size is None else f'{size} bytes'}, expected {entry.size} "
                    "bytes; the upload did not complete, so nothing was committed. Retry the run"
                )

    def _give_up(self, attempts: Iterable[Attempt], exc: BaseException | None) -> None:
        for attempt in attempts:
            self.leases.release(attempt)
            try:
                self.versions.attempts.mark_failed(attempt)
            except Exception:  # the original error matters more; GC treats expired leases alike
                log.exception("could not mark attempt %s failed after %r", attempt.attempt_id, exc)


def _one_mode(attempts: Sequence[Attempt]) -> CommitMode:
    modes = {a.mode for a in attempts}
    if len(modes) != 1:
        raise ValueError(
            f"one commit takes attempts of one mode, got {sorted(modes)}: commit replace and "
            "append partitions in separate calls"
        )
    return next(iter(modes))


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


class ReadCache:
    """Tables read by version, up to `max_bytes` in all (the oldest dropped first): one run's
    steps that read the same upstream versions read their files once. Safe across threads."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._tables: OrderedDict[Hashable, pa.Table] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, versions: Hashable) -> pa.Table | None:
        with self._lock:
            return self._tables.get(versions)

    def put(self, versions: Hashable, table: pa.Table) -> None:
        if table.nbytes > self.max_bytes:
            return
        with self._lock:
            self._tables[versions] = table
            while sum(t.nbytes for t in self._tables.values()) > self.max_bytes:
                self._tables.popitem(last=False)

    def clear(self) -> None:
        with self._lock:
            self._tables.clear()


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
        cache: ReadCache | None = None,
        read: dict[tuple[str, str], int] | None = None,
    ) -> pa.Table:
        """The current versions of the partitions (all if None) as one table; `read`, if
        given, gets the version read of each (dataset, partition key).

        With `refuse_failed_checks`, raise `UpstreamQualityError` instead if a blocking
        quality rule failed on any of those versions (what derived datasets read with).
        With a `cache`, a read of exactly the versions of an earlier read returns that read's
        table (versions are immutable: the same bytes) instead of reading the files again.
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
            if read is not None:
                read.update({(dataset, k): r.version for k, r in records.items()})
            if cache is None or schema is not None:
                return self.read_versions(records.values(), schema)
            versions = (dataset, tuple(sorted((k, r.version) for k, r in records.items())))
            table = cache.get(versions)
            if table is None:
                table = self.read_versions(records.values())
                cache.put(versions, table)
            return table

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
