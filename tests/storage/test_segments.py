"""Append mode with segments as rows: an append to an open block range inserts one segment
row and a version whose manifest lists only the base files and the live window, so its cost
does not grow with the partition; readers see every file; retries are no-ops, mixed keys are
refused; a replace seals the range (appends after it are refused); compaction merges live
segments without changing the rows and loses to a seal; GC and staging cleanup never delete a
file a kept or pinned version reads."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterator
from datetime import timedelta
from typing import Any

import pyarrow as pa
import pytest
import sqlalchemy as sa

from tests.utils.invariants import InvariantReport, table_of
from trace_resources.errors import PartitionSealedError, SegmentConflictError
from trace_resources.resources import ObjectStoreResource, StateStoreResource
from trace_resources.storage import state as t
from trace_resources.storage.commit import DatasetReader, DatasetWriter, PartitionData
from trace_resources.storage.compaction import Compactor
from trace_resources.storage.gc import GarbageCollector, GcPolicy
from trace_resources.storage.object_store import ObjectStore
from trace_resources.storage.records import BatchNotCommitted, CommitResult, CompactionPlan
from trace_resources.storage.version_store import VersionStore

OPEN = "000000000000-000000009999"  # the open block range the follower appends to
DATASETS = ["blocks", "transactions", "logs", "erc20_transfers", "native_transfers", "contracts"]
ALL_NOW = GcPolicy(keep_last=1, older_than=timedelta(0))


def block_hash(n: int) -> str:
    return f"0x{n:064x}"


def block_source(first: int, last: int | None = None) -> dict[str, Any]:
    last = first if last is None else last
    return {
        "range": OPEN,
        "first": {"number": first, "hash": block_hash(first), "parent_hash": block_hash(first - 1)},
        "last": {"number": last, "hash": block_hash(last), "parent_hash": block_hash(last - 1)},
    }


def block_data(first: int, last: int | None = None) -> PartitionData:
    last = first if last is None else last
    blocks = list(range(first, last + 1))
    return PartitionData(
        table_of(blocks),
        source=block_source(first, last),
        segment_keys=[f"block:{n}" for n in blocks],
    )


def append(
    writer: DatasetWriter, first: int, last: int | None = None, dataset: str = "blocks"
) -> CommitResult:
    staged = writer.stage(dataset, {OPEN: block_data(first, last)}, mode="append")
    return writer.commit(staged)[OPEN]


def ids(reader: DatasetReader, dataset: str = "blocks") -> list[int]:
    return reader.read(dataset, [OPEN]).column("id").to_pylist()


def version_count(versions: VersionStore, dataset: str = "blocks") -> int:
    with versions.engine.connect() as conn:
        return conn.execute(
            sa.select(sa.func.count()).where(t.versions.c.dataset == dataset)
        ).scalar_one()


def stored_manifest(versions: VersionStore, version: int, dataset: str = "blocks") -> Any:
    with versions.engine.connect() as conn:
        return conn.execute(
            sa.select(t.versions.c.manifest)
            .where(t.versions.c.dataset == dataset)
            .where(t.versions.c.partition_key == OPEN)
            .where(t.versions.c.version == version)
        ).scalar_one()


class Statements:
    """SQL statements this thread sends through the engine (what one commit costs)."""

    def __init__(self, engine: sa.Engine) -> None:
        self.engine = engine
        self.texts: list[str] = []
        self.thread = threading.get_ident()

    def _seen(
        self, conn: Any, cursor: Any, text: str, params: Any, context: Any, many: Any
    ) -> None:
        if threading.get_ident() == self.thread:
            self.texts.append(text)

    def __enter__(self) -> Statements:
        sa.event.listen(self.engine, "before_cursor_execute", self._seen)
        return self

    def __exit__(self, *exc: object) -> None:
        sa.event.remove(self.engine, "before_cursor_execute", self._seen)


@pytest.fixture
def writer(state: StateStoreResource, objects: ObjectStoreResource) -> Iterator[DatasetWriter]:
    with state.writer(objects) as writer:
        yield writer


@pytest.fixture
def reader(state: StateStoreResource, objects: ObjectStoreResource) -> DatasetReader:
    return state.reader(objects)


def test_a_retried_append_is_a_no_op_and_mixed_keys_are_refused(
    writer: DatasetWriter,
    reader: DatasetReader,
    versions: VersionStore,
    invariants: Callable[[], InvariantReport],
) -> None:
    append(writer, 1)
    [staged] = writer.stage("blocks", {OPEN: block_data(2, 3)}, mode="append")
    landed = writer.commit([staged])[OPEN]
    assert landed.version.version == 2 and landed.segment_seq == 2
    # the same attempt again (its commit's outcome was unknown): the version that landed
    again = writer.commit([staged])[OPEN]
    assert again.already_committed and again.version.version == 2
    # a new attempt with keys that all landed (a retried batch): a no-op
    retried = append(writer, 2, 3)
    assert retried.already_committed and retried.version.version == 2
    assert retried.version.manifest.rows == 3  # the whole current version
    # keys that landed next to new ones: refused, nothing changes
    with pytest.raises(SegmentConflictError, match=r"1 segment key\(s\) already appended"):
        append(writer, 3, 4)
    assert version_count(versions) == 2
    assert versions.read.appended_keys("blocks", OPEN) == {"block:1", "block:2", "block:3"}
    assert ids(reader) == [1, 2, 3]
    invariants()


def test_200_appends_read_as_every_segment_and_each_append_costs_the_same(
    writer: DatasetWriter,
    reader: DatasetReader,
    versions: VersionStore,
    store: ObjectStore,
    invariants: Callable[[], InvariantReport],
) -> None:
    statements: dict[int, list[str]] = {}
    appended: list[CommitResult] = []
    for n in range(200):
        if n in (1, 199):
            [staged] = writer.stage("blocks", {OPEN: block_data(n)}, mode="append")
            with Statements(versions.engine) as seen:
                appended.append(writer.commit([staged])[OPEN])
            statements[n] = seen.texts
        else:
            appended.append(append(writer, n))
    assert [r.version.version for r in appended] == list(range(1, 201))
    # the current version is every segment, in append order
    current = versions.read.current_versions("blocks")[OPEN]
    segment_files = [f for r in appended for f in r.version.manifest.files]
    assert current.manifest.files == segment_files
    assert current.manifest.rows == 200 and ids(reader) == list(range(200))
    [(_, _, _, files)] = versions.read.current_files({"blocks": [OPEN]})
    assert files == segment_files
    assert versions.read.newest_files("blocks") == segment_files
    # an append's cost does not grow: the same statements, the same manifest size
    assert statements[1] == statements[199]
    assert not any("trace_segments.files" in text for text in statements[199])
    first, last = stored_manifest(versions, 2), stored_manifest(versions, 200)
    assert first["files"] == last["files"] == []
    assert (first["live_from_seq"], first["through_seq"]) == (0, 2)
    assert (last["live_from_seq"], last["through_seq"]) == (0, 200)
    assert len(json.dumps(last)) - len(json.dumps(first)) <= 8  # a few more digits
    assert last["source"]["first"]["number"] == 0 and last["source"]["last"]["number"] == 199
    # an older version reads exactly what it held
    assert reader.read_version("blocks", OPEN, 50).column("id").to_pylist() == list(range(50))
    [(_, _, _, pinned)] = versions.read.pinned_files([("blocks", OPEN, 50)])
    assert pinned == segment_files[:50]
    # freshness and what a sealing run compares
    newest, committed_at = versions.read.heads(["blocks", "logs"])["blocks"]
    assert newest == 199 and committed_at is not None
    assert "logs" not in versions.read.heads(["blocks", "logs"])
    segments = versions.read.open_segments("blocks", OPEN)
    assert [(s.seq, s.first_block, s.last_block, s.rows) for s in segments] == [
        (n + 1, n, n, 1) for n in range(200)
    ]
    assert versions.read.is_open("blocks", OPEN)
    with versions.engine.connect() as conn:
        payload = conn.execute(
            sa.select(t.outbox.c.payload)
            .where(t.outbox.c.dataset == "blocks")
            .order_by(t.outbox.c.id.desc())
            .limit(1)
        ).scalar_one()
    assert payload["mode"] == "append"
    assert (payload["seq"], payload["first_block"], payload["last_block"]) == (200, 199, 199)
    invariants()
    assert all(store.size(f.key) == f.size for f in segment_files)


def test_compaction_keeps_the_rows_and_bounds_the_files_while_appends_land(
    writer: DatasetWriter,
    reader: DatasetReader,
    versions: VersionStore,
    store: ObjectStore,
    invariants: Callable[[], InvariantReport],
) -> None:
    compactor = Compactor(store, versions, max_base_files=3, writer=writer)
    n = 0
    for _ in range(5):
        for _ in range(20):
            append(writer, n)
            n += 1
        assert not compactor.compact_open("blocks", OPEN, min_segments=21).compacted
        report = compactor.compact_open("blocks", OPEN, min_segments=20)
        assert report.compacted and report.segments == 20, report.line()
        files = versions.read.current_versions("blocks")[OPEN].manifest.files
        assert len(files) <= 3 and report.files_after == len(files)
        assert ids(reader) == list(range(n))
    # an append lands between the compaction's read and its commit: it stays live
    for _ in range(5):
        append(writer, n)
        n += 1
    plan, staged = _read_and_stage(versions, writer, compactor)
    append(writer, n)
    n += 1
    outcome = versions.commits.commit_compaction(staged.attempt, staged.files, plan)
    assert isinstance(outcome, CommitResult), outcome
    writer.leases.release(staged.attempt)
    current = versions.read.current_versions("blocks")[OPEN]
    assert current.manifest.through_seq == n and current.manifest.live_from_seq == n - 1
    assert ids(reader) == list(range(n))
    assert versions.read.appended_keys("blocks", OPEN) == {f"block:{i}" for i in range(n)}
    # a retried append of a compacted block is still a no-op
    assert append(writer, 3).already_committed
    assert compactor.compact_open("blocks", OPEN, min_segments=1).compacted
    assert len(versions.read.current_versions("blocks")[OPEN].manifest.files) <= 3
    assert ids(reader) == list(range(n))
    invariants()


def _read_and_stage(
    versions: VersionStore, writer: DatasetWriter, compactor: Compactor
) -> tuple[CompactionPlan, Any]:
    """A compaction's first half (read the live segments, stage the merged file)."""
    current = versions.read.current_versions("blocks")[OPEN].manifest
    count = current.base_files or 0
    segments = current.files[count:]
    table = compactor.store.read_parquet([f.key for f in segments])
    plan = CompactionPlan(
        live_from_seq=current.live_from_seq or 0,
        through_seq=current.through_seq or 0,
        base_keys=tuple(f.key for f in current.files[:count]),
        merges_base=False,
        replaced_bytes=sum(f.size for f in segments),
    )
    [staged] = writer.stage("blocks", {OPEN: PartitionData(table)}, mode="append")
    return plan, staged


def test_a_seal_wins_over_compaction_and_refuses_later_appends(
    writer: DatasetWriter,
    reader: DatasetReader,
    versions: VersionStore,
    store: ObjectStore,
    invariants: Callable[[], InvariantReport],
) -> None:
    for n in range(10):
        append(writer, n)
    compactor = Compactor(store, versions, writer=writer)
    plan, staged = _read_and_stage(versions, writer, compactor)
    # the sealing run replaces the range meanwhile
    sealing = PartitionData(table_of(list(range(10)), "sealer"), source=block_source(0, 9))
    sealed = writer.write("blocks", OPEN, sealing)
    assert sealed.version.version == 11
    outcome = versions.commits.commit_compaction(staged.attempt, staged.files, plan)
    assert isinstance(outcome, str) and "sealed" in outcome
    assert versions.attempts.state(staged.attempt.attempt_id) == "failed"
    assert versions.read.current_version_numbers("blocks") == {OPEN: 11}
    report = compactor.compact_open("blocks", OPEN, min_segments=1)
    assert not report.compacted and "not open" in report.reason
    assert not versions.read.is_open("blocks", OPEN)
    assert versions.read.appended_keys("blocks", OPEN) == set()
    assert len(versions.read.open_segments("blocks", OPEN)) == 10  # until GC
    assert versions.read.heads(["blocks"])["blocks"][0] == 9
    # an append after the seal: refused, nothing appended
    with pytest.raises(PartitionSealedError, match="the range is sealed"):
        append(writer, 10)
    # in a batch, the whole batch is refused and says why
    staged_blocks = writer.stage("blocks", {OPEN: block_data(11)}, mode="append")
    staged_logs = writer.stage("logs", {OPEN: block_data(11)}, mode="append")
    items = [s.batch_item() for s in [*staged_blocks, *staged_logs]]
    with pytest.raises(BatchNotCommitted) as refused:
        versions.commits.commit_many(items, mode="append")
    assert isinstance(refused.value.__cause__, PartitionSealedError)
    assert versions.read.current_version_numbers("logs") == {}
    writer.abort([*staged_blocks, *staged_logs])
    assert versions.read.current_version_numbers("blocks") == {OPEN: 11}
    table = reader.read("blocks", [OPEN])
    assert set(table.column("writer").to_pylist()) == {"sealer"}
    invariants()


def test_staging_cleanup_keeps_every_live_segment_file(
    writer: DatasetWriter,
    reader: DatasetReader,
    versions: VersionStore,
    store: ObjectStore,
    invariants: Callable[[], InvariantReport],
) -> None:
    for n in range(5):
        append(writer, n)
    before = store.list_keys("blocks/")
    assert len(before) == 5
    # the segments' attempts are committed and the open version's manifest row lists no file
    report = GarbageCollector(store, versions).cleanup_staging(grace=timedelta(0), apply=True)
    assert report.removed == []
    assert store.list_keys("blocks/") == before
    assert ids(reader) == list(range(5))
    invariants()


def test_gc_never_deletes_a_segment_file_a_kept_or_pinned_version_reads(
    writer: DatasetWriter,
    reader: DatasetReader,
    versions: VersionStore,
    store: ObjectStore,
    invariants: Callable[[], InvariantReport],
) -> None:
    gc = GarbageCollector(store, versions)
    for n in range(10):
        append(writer, n)
    compactor = Compactor(store, versions, writer=writer)
    with reader.pinned_version("blocks", OPEN, 3) as pinned:
        assert compactor.compact_open("blocks", OPEN, min_segments=1).compacted  # v11
        for n in range(10, 13):
            append(writer, n)  # v12..v14
        gc.collect(ALL_NOW, apply=True)
        gc.cleanup_staging(grace=timedelta(0), apply=True)
        # the pinned version still reads exactly what it held, the current one everything
        assert reader.read_versions([pinned]).column("id").to_pylist() == [0, 1, 2]
        assert ids(reader) == list(range(13))
        invariants()
    removed = gc.collect(ALL_NOW, apply=True)
    gc.cleanup_staging(grace=timedelta(0), apply=True)
    # the compacted segments' files are gone, the live ones and the merged file stay
    current = versions.read.current_versions("blocks")[OPEN]
    assert {f.key for f in current.manifest.files} == set(store.list_keys("blocks/"))
    assert len(current.manifest.files) == 4 and ids(reader) == list(range(13))
    assert sum(len(v.files) for v in removed.versions) == 3  # the pinned version's segments
    assert len(versions.read.open_segments("blocks", OPEN)) == 13  # still open: kept
    invariants()
    # sealed, and its open versions removed: the segments' rows and files go
    writer.write("blocks", OPEN, PartitionData(table_of(list(range(13)), "sealer")))
    gc.collect(ALL_NOW, apply=True)
    assert versions.read.open_segments("blocks", OPEN) == []
    assert len(store.list_keys("blocks/")) == 1
    assert ids(reader) == list(range(13))
    invariants()


def test_one_transaction_appends_to_six_datasets(
    writer: DatasetWriter,
    reader: DatasetReader,
    versions: VersionStore,
    invariants: Callable[[], InvariantReport],
) -> None:
    def stage_block(n: int) -> list[Any]:
        return [
            s
            for dataset in DATASETS
            for s in writer.stage(dataset, {OPEN: block_data(n)}, mode="append")
        ]

    for n in range(3):
        staged = stage_block(n)
        results = versions.commits.commit_many([s.batch_item() for s in staged], mode="append")
        assert [r.version.version for r in results] == [n + 1] * 6
        assert not any(r.already_committed for r in results)
        for s in staged:
            writer.leases.release(s.attempt)
    # the same attempts again (unknown outcome): the versions that landed, nothing new
    again = versions.commits.commit_many([s.batch_item() for s in staged], mode="append")
    assert all(r.already_committed and r.version.version == 3 for r in again)
    # a new batch whose keys all landed: a no-op in every dataset
    retried = stage_block(2)
    results = versions.commits.commit_many([s.batch_item() for s in retried], mode="append")
    assert all(r.already_committed for r in results)
    with versions.engine.connect() as conn:
        events = conn.execute(
            sa.select(t.outbox.c.dataset, sa.func.count()).group_by(t.outbox.c.dataset)
        ).all()
    assert dict(events) == {d: 3 for d in DATASETS}  # one per commit, none for the no-ops
    for dataset in DATASETS:
        assert ids(reader, dataset) == [0, 1, 2]
        assert versions.read.heads([dataset])[dataset][0] == 2
    invariants()


def test_compaction_merges_segments_of_any_schema_the_registry_accepted(
    writer: DatasetWriter,
    reader: DatasetReader,
    versions: VersionStore,
    store: ObjectStore,
) -> None:
    """Segments whose tables added a nullable column (registry drift) merge into one file."""
    append(writer, 0)
    wider = table_of([1]).append_column("extra", pa.array(["x"], pa.string()))
    data = PartitionData(wider, source=block_source(1), segment_keys=["block:1"])
    writer.commit(writer.stage("blocks", {OPEN: data}, mode="append"))
    report = Compactor(store, versions, writer=writer).compact_open("blocks", OPEN, min_segments=1)
    assert report.compacted, report.line()
    assert ids(reader) == [0, 1]


def test_trace_compact_compacts_the_open_partitions(
    cli: Callable[..., str], writer: DatasetWriter, reader: DatasetReader, versions: VersionStore
) -> None:
    for n in range(4):
        append(writer, n)
    assert versions.read.open_partitions("blocks") == [OPEN]
    out = cli("compact", "blocks", "--min-segments", "5")
    assert "fewer than 5" in out
    out = cli("compact", "blocks")
    assert f"compacted blocks {OPEN}: 4 segment(s), 4 -> 1 file(s)" in out
    assert ids(reader) == [0, 1, 2, 3]
