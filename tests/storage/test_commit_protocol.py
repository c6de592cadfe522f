"""The commit protocol on the real Postgres and the S3 API on loopback."""

from __future__ import annotations

import pyarrow as pa
import pytest

from tests.utils.writes import commit_one, stage_one
from trace_resources.errors import AttemptFencedError, SchemaIncompatibleError
from trace_resources.resources import ObjectStoreResource, StateStoreResource
from trace_resources.storage.commit import PartitionData
from trace_resources.storage.paths import attempt_prefix

KEY = "000000000000-000000000049"


def table(n: int, offset: int = 0) -> pa.Table:
    return pa.table({"block_number": pa.array(range(offset, offset + n), pa.uint64())})


def test_staged_files_are_invisible_until_commit(
    objects: ObjectStoreResource, state: StateStoreResource, s3_client, s3_bucket: str
) -> None:
    writer = state.writer(objects)
    reader = state.reader(objects)
    staged = stage_one(writer, "blocks", KEY, PartitionData(table(10)))
    listed = [o["Key"] for o in s3_client.list_objects_v2(Bucket=s3_bucket)["Contents"]]
    assert listed == [
        f"{attempt_prefix('blocks', KEY, staged.attempt.attempt_id)}part-00000.parquet"
    ]
    assert reader.resolve("blocks") == {}
    with pytest.raises(FileNotFoundError, match="no committed version"):
        reader.read("blocks", [KEY])

    result = commit_one(writer, staged)
    assert result.version.version == 1
    assert reader.read("blocks", [KEY]).num_rows == 10


def test_rerun_makes_new_version_and_moves_pointer(
    objects: ObjectStoreResource, state: StateStoreResource
) -> None:
    writer = state.writer(objects)
    first = writer.write("blocks", KEY, PartitionData(table(10)))
    second = writer.write("blocks", KEY, PartitionData(table(7)))
    assert (first.version.version, second.version.version) == (1, 2)
    current = state.reader(objects).resolve("blocks")[KEY]
    assert current.version == 2 and current.attempt_id == second.version.attempt_id
    assert state.reader(objects).read("blocks", [KEY]).num_rows == 7
    # the superseded version's files are still there (only an explicit GC removes them)
    old = state.versions().read.version("blocks", KEY, 1)
    assert all(objects.datasets().size(f.key) == f.size for f in old.manifest.files)


def test_outbox_event_written_with_the_commit(
    objects: ObjectStoreResource, state: StateStoreResource
) -> None:
    import sqlalchemy as sa

    from trace_resources.storage import state as tables

    state.writer(objects).write("logs", KEY, PartitionData(table(3)))
    with state.versions().engine.connect() as conn:
        events = conn.execute(sa.select(tables.outbox)).all()
    assert [(e.event_type, e.dataset, e.partition_key, e.version) for e in events] == [
        ("dataset_version_committed", "logs", KEY, 1)
    ]
    assert events[0].payload["rows"] == 3


def test_stale_attempt_is_fenced_and_never_visible(
    objects: ObjectStoreResource, state: StateStoreResource
) -> None:
    writer = state.writer(objects)
    old = stage_one(writer, "blocks", KEY, PartitionData(table(5)))
    new = stage_one(writer, "blocks", KEY, PartitionData(table(8)))
    commit_one(writer, new)
    with pytest.raises(AttemptFencedError, match="newer attempt holds fence"):
        commit_one(writer, old)
    current = state.reader(objects).resolve("blocks")[KEY]
    assert current.attempt_id == new.attempt.attempt_id
    assert state.versions().attempts.state(old.attempt.attempt_id) == "fenced"


def test_commit_is_idempotent_by_attempt(
    objects: ObjectStoreResource, state: StateStoreResource
) -> None:
    writer = state.writer(objects)
    staged = stage_one(writer, "blocks", KEY, PartitionData(table(5)))
    first = commit_one(writer, staged)
    again = commit_one(writer, staged)  # e.g. the first commit's outcome was unknown
    assert again.already_committed and again.version.version == first.version.version == 1
    assert len(state.versions().read.current_versions("blocks")) == 1


def test_append_adds_segment_once(objects: ObjectStoreResource, state: StateStoreResource) -> None:
    writer = state.writer(objects)
    writer.write("alerts", "__all__", PartitionData(table(2), segment_key="a"), mode="append")
    writer.write("alerts", "__all__", PartitionData(table(3, 2), segment_key="b"), mode="append")
    retried = writer.write(
        "alerts", "__all__", PartitionData(table(3, 2), segment_key="b"), mode="append"
    )
    assert retried.already_committed
    assert state.reader(objects).read("alerts", ["__all__"]).num_rows == 5


def test_incompatible_schema_is_refused_naming_columns(
    objects: ObjectStoreResource, state: StateStoreResource
) -> None:
    writer = state.writer(objects)
    writer.write("blocks", KEY, PartitionData(table(3)))
    retyped = pa.table({"block_number": pa.array(["x"], pa.string())})
    with pytest.raises(SchemaIncompatibleError, match=r"retyped \['block_number'\]"):
        writer.write("blocks", KEY, PartitionData(retyped))
    assert state.reader(objects).read("blocks", [KEY]).num_rows == 3
    added = table(2).append_column("extra", pa.array([None, None], pa.string()))
    result = writer.write("blocks", KEY, PartitionData(added))
    assert result.schema_version == 2 and result.drift and result.drift["added"] == ["extra"]


def test_what_commits_with_a_batch_is_in_its_transaction(
    objects: ObjectStoreResource, state: StateStoreResource
) -> None:
    """`commit_together(within=...)` writes in the batch's own transaction: if it fails, the
    batch commits nothing; if it succeeds, it sees the batch's results (a quarantine record of
    the versions a replacement supersedes is written this way)."""
    import sqlalchemy as sa

    writer = state.writer(objects)
    key = "000000000100-000000000149"
    first = writer.write("blocks", key, PartitionData(table(10, 100)))
    staged = [stage_one(writer, "blocks", key, PartitionData(table(8, 100)))]

    def fails(conn: sa.Connection, results: list) -> None:
        raise RuntimeError("the record could not be written")

    with pytest.raises(RuntimeError, match="could not be written"):
        writer.commit_together(staged, within=fails)
    assert state.reader(objects).resolve("blocks")[key].version == first.version.version

    seen: list[int] = []
    retried = [stage_one(writer, "blocks", key, PartitionData(table(8, 100)))]
    [result] = writer.commit_together(
        retried, within=lambda conn, results: seen.extend(r.version.version for r in results)
    )
    assert seen == [result.version.version] == [first.version.version + 1]
    assert state.reader(objects).read("blocks", [key]).num_rows == 8
