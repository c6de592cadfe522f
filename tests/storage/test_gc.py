"""`trace gc` and `trace staging-cleanup` on the real Postgres and S3 API: policies, dry runs,
pinned reads of old versions, in-flight attempts, append datasets, orphans, and both commands
running in a loop while writer processes and a reader work."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from datetime import timedelta

import pytest
import sqlalchemy as sa

from tests.storage.conftest import SpawnWriter
from tests.utils.invariants import InvariantReport, table_of, visible_ids
from tests.utils.writes import commit_one, stage_one
from trace_resources.errors import VersionRemovedError
from trace_resources.resources import ObjectStoreResource, StateStoreResource
from trace_resources.storage import state as t
from trace_resources.storage.commit import DatasetReader, DatasetWriter, PartitionData
from trace_resources.storage.gc import GarbageCollector, GcPolicy
from trace_resources.storage.object_store import ObjectStore
from trace_resources.storage.paths import UNPARTITIONED, attempt_prefix
from trace_resources.storage.state import engine_for
from trace_resources.storage.version_store import VersionStore

A = "000000000000-000000000049"
B = "000000000050-000000000099"
ALL_NOW = GcPolicy(keep_last=1, older_than=timedelta(0))


@pytest.fixture
def writer(state: StateStoreResource, objects: ObjectStoreResource) -> Iterator[DatasetWriter]:
    with state.writer(objects) as writer:
        yield writer


def kept_versions(versions: VersionStore) -> list[tuple[str, int]]:
    with versions.engine.connect() as conn:
        return [
            (r.partition_key, r.version)
            for r in conn.execute(
                sa.select(t.versions.c.partition_key, t.versions.c.version).order_by(
                    t.versions.c.partition_key, t.versions.c.version
                )
            )
        ]


def test_gc_dry_run_prints_and_apply_removes_beyond_the_policy(
    cli: Callable[..., str],
    writer: DatasetWriter,
    store: ObjectStore,
    versions: VersionStore,
    invariants: Callable[[], InvariantReport],
) -> None:
    results = {
        (key, n): writer.write("blocks", key, PartitionData(table_of([n * 10, n * 10 + 1])))
        for key in (A, B)
        for n in range(1, 5)
    }
    before = store.list_keys("blocks/")

    dry = cli("gc", "--keep-last", "2", "--older-than", "0s")
    assert f"would remove blocks {A} v1" in dry and f"would remove blocks {B} v2" in dry
    assert "gc: 4 version(s), 4 file(s)" in dry and "dry run" in dry
    assert store.list_keys("blocks/") == before and len(kept_versions(versions)) == 8

    assert "gc: 0 version(s)" in cli("gc", "--apply", "--keep-last", "2", "--older-than", "1h")
    assert len(kept_versions(versions)) == 8  # superseded moments ago: not older than 1h

    applied = cli("gc", "--apply", "--keep-last", "2", "--older-than", "0s")
    assert f"removed blocks {A} v1" in applied and "gc: 4 version(s), 4 file(s)" in applied
    assert kept_versions(versions) == [(A, 3), (A, 4), (B, 3), (B, 4)]
    gone = [f.key for (_, n), r in results.items() if n <= 2 for f in r.version.manifest.files]
    assert all(store.size(k) is None for k in gone)
    invariants()
    reader = DatasetReader(store, versions)
    assert visible_ids(reader, "blocks", A) == [40, 41]
    assert reader.read_version("blocks", A, 3).column("id").to_pylist() == [30, 31]
    with pytest.raises(FileNotFoundError, match="has no version 2"):
        reader.read_version("blocks", A, 2)


def test_gc_never_removes_the_old_version_a_reader_is_reading(
    cli: Callable[..., str],
    writer: DatasetWriter,
    store: ObjectStore,
    versions: VersionStore,
    invariants: Callable[[], InvariantReport],
) -> None:
    writer.write("blocks", A, PartitionData(table_of([1, 2, 3])))
    reader = DatasetReader(store, versions)
    with reader.pinned("blocks", [A]) as records:
        pinned = records[A]
        assert pinned.version == 1
        writer.write("blocks", A, PartitionData(table_of([4, 5])))
        writer.write("blocks", A, PartitionData(table_of([6])))
        # GC runs in another process while the read is in flight
        out = cli("gc", "--apply", "--keep-last", "1", "--older-than", "0s")
        assert f"removed blocks {A} v2" in out and f"{A} v1" not in out
        assert kept_versions(versions) == [(A, 1), (A, 3)]
        table = reader.read_versions([pinned])  # the pinned version is whole
        assert sorted(table.column("id").to_pylist()) == [1, 2, 3]
        invariants()
    # unpinned: the next GC may remove it
    again = cli("gc", "--apply", "--keep-last", "1", "--older-than", "0s")
    assert f"removed blocks {A} v1" in again
    assert kept_versions(versions) == [(A, 3)]
    with versions.engine.connect() as conn:
        assert conn.execute(sa.select(sa.func.count()).select_from(t.pins)).scalar() == 0
    invariants()


def test_gc_and_cleanup_leave_an_in_flight_attempt_alone(
    writer: DatasetWriter,
    store: ObjectStore,
    versions: VersionStore,
    invariants: Callable[[], InvariantReport],
) -> None:
    for n in range(3):
        writer.write("blocks", A, PartitionData(table_of([n])))
    in_flight = stage_one(writer, "blocks", A, PartitionData(table_of([7, 8, 9])))
    gc = GarbageCollector(store, versions)
    removed = gc.collect(ALL_NOW, apply=True)
    cleaned = gc.cleanup_staging(grace=timedelta(0), apply=True)
    assert [(v.partition_key, v.version) for v in removed.versions] == [(A, 1), (A, 2)]
    assert cleaned.kept_live == 1 and cleaned.removed == []
    assert all(store.size(f.key) == f.size for f in in_flight.files)
    assert commit_one(writer, in_flight).version.version == 4
    invariants()
    assert visible_ids(DatasetReader(store, versions), "blocks", A) == [7, 8, 9]


def test_gc_of_an_append_dataset_keeps_the_files_later_versions_share(
    writer: DatasetWriter,
    store: ObjectStore,
    versions: VersionStore,
    invariants: Callable[[], InvariantReport],
) -> None:
    for n in range(3):
        data = PartitionData(table_of([n * 10, n * 10 + 1]), segment_key=f"seg-{n}")
        writer.write("audit_log", UNPARTITIONED, data, mode="append")
    files = store.list_keys("audit_log/")
    report = GarbageCollector(store, versions).collect(ALL_NOW, apply=True)
    assert [v.version for v in report.versions] == [1, 2] and report.files == []
    assert store.list_keys("audit_log/") == files
    invariants()
    assert visible_ids(DatasetReader(store, versions), "audit_log", UNPARTITIONED) == [
        0,
        1,
        10,
        11,
        20,
        21,
    ]


def test_staging_cleanup_removes_orphans_only_after_the_grace_period(
    cli: Callable[..., str],
    writer: DatasetWriter,
    store: ObjectStore,
    invariants: Callable[[], InvariantReport],
) -> None:
    writer.write("blocks", A, PartitionData(table_of([1])))
    unknown_attempt = "00000000-0000-4000-8000-000000000000"
    orphan = attempt_prefix("blocks", A, unknown_attempt) + "part-00000.parquet"
    store.put_bytes(orphan, b"not a parquet file")  # e.g. a writer whose row was lost
    foreign = "blocks/README.txt"
    store.put_bytes(foreign, b"not Trace's")

    young = cli("staging-cleanup", "--apply", "--grace", "1h")
    assert "1 orphan(s) younger than the grace period" in young
    assert store.size(orphan) is not None
    dry = cli("staging-cleanup", "--grace", "0s")
    assert f"would remove {orphan}" in dry and "orphan: no attempt row knows it" in dry
    assert f"left alone {foreign}" in dry
    assert store.size(orphan) is not None
    applied = cli("staging-cleanup", "--apply", "--grace", "0s")
    assert f"removed {orphan}" in applied
    assert store.size(orphan) is None and store.size(foreign) is not None
    store.delete([foreign])
    invariants()


def test_gc_and_cleanup_in_a_loop_while_writers_and_a_reader_work(
    spawn_writer: SpawnWriter,
    state_dsn: str,
    store: ObjectStore,
    invariants: Callable[[], InvariantReport],
) -> None:
    versions = VersionStore(engine_for(state_dsn), lease_s=2.0)
    writes = 8
    procs = [
        spawn_writer(
            partition=key,
            lease_s=2.0,
            heartbeat_s=0.3,
            rows_per_file=3,
            writes=[{"ids": [n * 100, n * 100 + 7]} for n in range(writes)],
        )
        for key in (A, B)
    ]
    gc = GarbageCollector(store, versions)
    reader = DatasetReader(store, versions)
    stop = threading.Event()
    reads: list[int] = []
    failures: list[BaseException] = []

    def read_continuously() -> None:
        while not stop.is_set():
            try:
                table = reader.read("blocks")
                reads.append(table.num_rows)
            except FileNotFoundError as exc:  # only "nothing committed yet" is acceptable
                if "no files to read" not in str(exc):
                    failures.append(exc)
            except BaseException as exc:
                failures.append(exc)

    thread = threading.Thread(target=read_continuously)
    thread.start()
    rounds = 0
    try:
        while any(p.proc.poll() is None for p in procs) or rounds < 3:
            gc.collect(ALL_NOW, apply=True)
            gc.cleanup_staging(grace=timedelta(0), apply=True)
            rounds += 1
            time.sleep(0.05)
    finally:
        stop.set()
        thread.join()
    for proc in procs:
        code, events = proc.finish()
        assert code == 0, proc.stderr()
        outcomes = [e["event"] for e in events if e["event"] in ("committed", "refused")]
        assert outcomes == ["committed"] * writes, events  # GC never took a live attempt
    assert not failures, failures[:3]
    assert reads and rounds >= 3
    gc.collect(ALL_NOW, apply=True)
    gc.cleanup_staging(grace=timedelta(0), apply=True)
    report = invariants()
    assert report.versions == 2  # only the current version of each partition is left
    for key in (A, B):
        assert visible_ids(reader, "blocks", key) == list(range(700, 707))
    assert len(store.list_keys("blocks/")) == 2 * 3  # 7 rows in files of 3, per partition


def test_a_late_retry_of_a_writer_whose_version_gc_removed_commits_nothing(
    writer: DatasetWriter, store: ObjectStore, versions: VersionStore
) -> None:
    key = "dagster:run-1:step"
    first = stage_one(writer, "blocks", A, PartitionData(table_of([1])))
    assert commit_one(writer, first, commit_key=key).version.version == 1
    writer.write("blocks", A, PartitionData(table_of([2])))  # a newer run's version
    GarbageCollector(store, versions).collect(ALL_NOW, apply=True)
    assert kept_versions(versions) == [(A, 2)]
    # the same logical writer retries late (a new attempt, its commit key): no v3 of stale data
    with pytest.raises(VersionRemovedError, match=r"already committed blocks/\S+ as version 1"):
        writer.write("blocks", A, PartitionData(table_of([1])), commit_key=key)
    # the same attempt retries its commit (unknown outcome long ago): likewise
    with pytest.raises(VersionRemovedError, match="now v2"):
        commit_one(writer, first, commit_key=key)
    assert kept_versions(versions) == [(A, 2)]
    assert visible_ids(DatasetReader(store, versions), "blocks", A) == [2]


def test_a_late_retry_of_an_append_whose_version_gc_removed_returns_the_current_version(
    writer: DatasetWriter, store: ObjectStore, versions: VersionStore
) -> None:
    first = stage_one(
        writer,
        "audit_log",
        UNPARTITIONED,
        PartitionData(table_of([1]), segment_key="a"),
        mode="append",
    )
    assert commit_one(writer, first).version.version == 1
    later = PartitionData(table_of([2]), segment_key="b")
    writer.write("audit_log", UNPARTITIONED, later, mode="append")
    GarbageCollector(store, versions).collect(ALL_NOW, apply=True)
    again = commit_one(writer, first)  # v1 is gone; v2 carries segment "a"
    assert again.already_committed and again.version.version == 2
    assert versions.read.appended_keys("audit_log", UNPARTITIONED) == {"a", "b"}
    assert visible_ids(DatasetReader(store, versions), "audit_log", UNPARTITIONED) == [1, 2]
