"""Compaction of open (append-mode) partitions: many small segments become one Parquet file.

An open partition's version lists its base files and a window of live segments (one row of
`trace_segments` per append). Reading it costs one object per segment, so a long-running
process (the head follower, or `trace compact`) calls `Compactor.compact_open` now and then:

1. resolve and pin the current version; nothing to do unless it is open and holds at least
   `min_segments` live segments;
2. read the live segments' files (and the base files too, once there are more than
   `max_base_files` of them, so the base list stays bounded) and write ONE merged Parquet
   file through the commit protocol's staging: its own append attempt (which takes no fence,
   so it never fences out a writer), under its own prefix, verified and kept alive by a lease;
3. commit a new version fenced like any other (`FencedCommits.commit_compaction`): under the
   fence row lock, refused if the partition is no longer open (sealed meanwhile: sealing wins)
   or another compaction changed its base; appends that landed after step 2 stay live.

The rows (and their order) of the partition are unchanged; superseded versions and the
segment files only they reference are removed by GC, like any superseded version's files.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.dataset as pads

from trace_resources.storage.commit import DatasetReader, DatasetWriter, PartitionData
from trace_resources.storage.object_store import ObjectStore
from trace_resources.storage.records import CompactionPlan
from trace_resources.storage.version_store import VersionStore

__all__ = ["CompactionReport", "Compactor", "DEFAULT_MIN_SEGMENTS", "MAX_BASE_FILES"]

log = logging.getLogger(__name__)

DEFAULT_MIN_SEGMENTS = 64
MAX_BASE_FILES = 8


@dataclass(frozen=True)
class CompactionReport:
    """What one `compact_open` call did: `compacted`, or why not (`reason`)."""

    dataset: str
    partition_key: str
    compacted: bool
    reason: str
    version: int | None = None  # the version the compaction committed
    segments: int = 0  # live segments merged
    files_before: int = 0  # files of the version read
    files_after: int = 0  # files of the version committed
    rows: int = 0

    def line(self) -> str:
        if self.compacted:
            return (
                f"compacted {self.dataset} {self.partition_key}: {self.segments} segment(s), "
                f"{self.files_before} -> {self.files_after} file(s), {self.rows:,} rows, "
                f"now v{self.version}"
            )
        return f"left {self.dataset} {self.partition_key} as it is: {self.reason}"


class Compactor:
    """Compacts open partitions through the commit protocol (see the module docstring)."""

    def __init__(
        self,
        store: ObjectStore,
        versions: VersionStore,
        *,
        max_base_files: int = MAX_BASE_FILES,
        writer: DatasetWriter | None = None,
    ) -> None:
        self.store = store
        self.versions = versions
        self.max_base_files = max(1, max_base_files)
        self._own_writer = writer is None
        self.writer = writer or DatasetWriter(store, versions)
        self.reader = DatasetReader(store, versions)

    def close(self) -> None:
        if self._own_writer:
            self.writer.close()

    def __enter__(self) -> Compactor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def compact_open(
        self, dataset: str, partition_key: str, *, min_segments: int = DEFAULT_MIN_SEGMENTS
    ) -> CompactionReport:
        """Merge the live segments of the partition's open version into one file, if it has
        at least `min_segments` of them (1: on demand). Never raises for a partition that is
        not open or lost a race; the report says what happened."""

        def skipped(reason: str, files: int = 0) -> CompactionReport:
            return CompactionReport(dataset, partition_key, False, reason, files_before=files)

        with self.reader.pinned(dataset, [partition_key]) as records:
            record = records.get(partition_key)
            if record is None:
                return skipped("no committed version")
            manifest = record.manifest
            if not manifest.is_open or manifest.through_seq is None:
                return skipped("not open (sealed, or never appended to)", len(manifest.files))
            live_from = manifest.live_from_seq or 0
            live = manifest.through_seq - live_from
            if live < max(1, min_segments):
                return skipped(
                    f"{live} live segment(s), fewer than {max(1, min_segments)}",
                    len(manifest.files),
                )
            count = manifest.base_files or 0
            base, segments = manifest.files[:count], manifest.files[count:]
            merges_base = count + 1 > self.max_base_files
            inputs = [*base, *segments] if merges_base else segments
            table = self._read([f.key for f in inputs])
        expected = sum(f.rows for f in inputs)
        if table.num_rows != expected:
            raise ValueError(
                f"compaction of {dataset}/{partition_key} read {table.num_rows} rows from "
                f"{len(inputs)} files whose manifests say {expected}: a file does not match its "
                "manifest; nothing was committed. Check the objects (tests.utils.invariants)"
            )
        plan = CompactionPlan(
            live_from_seq=live_from,
            through_seq=manifest.through_seq,
            base_keys=tuple(f.key for f in base),
            merges_base=merges_base,
            replaced_bytes=sum(f.size for f in inputs),
        )
        [staged] = self.writer.stage(dataset, {partition_key: PartitionData(table)}, mode="append")
        try:
            outcome = self.writer._retrying(
                f"compaction commit of attempt {staged.attempt.attempt_id}",
                lambda: self.versions.commits.commit_compaction(staged.attempt, staged.files, plan),
            )
        except BaseException:
            self.writer.abort([staged])
            raise
        if isinstance(outcome, str):
            self.writer.abort([staged])  # its files are left for `trace staging-cleanup`
            log.info("%s", outcome)
            return skipped(outcome, len(manifest.files))
        self.writer.leases.release(staged.attempt)
        log.info("compacted %s/%s: %d segment(s)", dataset, partition_key, live)
        return CompactionReport(
            dataset,
            partition_key,
            True,
            "compacted",
            version=outcome.version.version,
            segments=live,
            files_before=len(manifest.files),
            files_after=len(outcome.version.manifest.files),
            rows=outcome.version.manifest.rows,
        )

    def _read(self, keys: list[str]) -> pa.Table:
        """The files as one table, in order, under the union of their schemas (segments
        written before and after a registry drift, e.g. an added nullable column)."""
        dataset = pads.dataset(
            [self.store.path(k) for k in keys], format="parquet", filesystem=self.store.fs
        )
        schemas = [fragment.physical_schema for fragment in dataset.get_fragments()]
        schema = pa.unify_schemas(schemas, promote_options="permissive")
        return self.store.read_parquet(keys, schema=schema)
