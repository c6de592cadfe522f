"""Open tables on the real Postgres and the S3 API on loopback: committed versions published as
Iceberg snapshots (pyiceberg's SQL catalog on the state database) read, through pyiceberg,
polars (over pyiceberg's arrow scan) and DuckDB (over that arrow), exactly the rows Trace's own
reader returns, now and at the previous snapshot; a fenced attempt never appears; a publisher
killed between its Iceberg commit and its record publishes no second snapshot; of two
publishers only the leader-lease holder publishes, and one that lost the lease mid-pass records
nothing (the next holder finds its snapshot and publishes none twice)."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import duckdb
import polars as pl
import pyarrow as pa
import pytest

from infra.local.services import MotoS3Server
from tests.utils.writes import commit_one, stage_one
from trace_resources.errors import AttemptFencedError, LeaseLostError
from trace_resources.leases import LeaderLease
from trace_resources.resources import ObjectStoreResource, StateStoreResource
from trace_resources.storage.commit import PartitionData
from trace_resources.storage.gc import GarbageCollector, GcPolicy
from trace_resources.storage.iceberg import (
    LEASE_NAME,
    IcebergPublisher,
    UnsignedRangeError,
    open_catalog,
    table_identifier,
)

A = "000000000000-000000000049"
B = "000000000050-000000000099"
OPEN = "000000000100-000000000149"  # an open range the head follower appends to


def data(first: int, n: int, tag: str, big: int = 0) -> PartitionData:
    numbers = list(range(first, first + n))
    return PartitionData(
        pa.table(
            {
                "block_number": pa.array(numbers, pa.uint64()),
                "gas_used": pa.array([b * 21_000 + big for b in numbers], pa.uint64()),
                "timestamp": pa.array([4_000_000_000 + b for b in numbers], pa.uint32()),
                "value": pa.array([str(2**255 + b) for b in numbers], pa.string()),
                "tag": pa.array([tag] * n, pa.string()),
            }
        )
    )


def rows(table: pa.Table) -> list[tuple[Any, ...]]:
    """Rows as plain values, order-free (integers compared by value, whatever their width)."""
    names = ["block_number", "gas_used", "timestamp", "value", "tag"]
    return sorted(zip(*(table.column(n).to_pylist() for n in names), strict=True))


@pytest.fixture
def publisher(
    state: StateStoreResource,
    objects: ObjectStoreResource,
    state_dsn: str,
    s3_server: MotoS3Server,
    s3_bucket: str,
) -> IcebergPublisher:
    catalog = open_catalog(
        state_dsn,
        f"s3://{s3_bucket}/_iceberg",
        endpoint_url=s3_server.endpoint_url,
        access_key="testing",
        secret_key="testing",
    )
    return IcebergPublisher(state.versions(), objects.datasets(), catalog)


def test_external_readers_see_exactly_the_committed_versions(
    state: StateStoreResource,
    objects: ObjectStoreResource,
    publisher: IcebergPublisher,
    cli: Callable[..., str],
) -> None:
    reader = state.reader(objects)
    with state.writer(objects) as writer:
        writer.write("blocks", A, data(0, 50, "a1"))
        writer.write("blocks", B, data(50, 50, "b1"))
        writer.write("blocks", OPEN, data(100, 3, "h1"), mode="append")
        writer.write("blocks", OPEN, data(103, 3, "h2"), mode="append")
        first = publisher.publish()
        # the open range's appends (the head tier's) wait for the range's sealed version
        assert [(p.partition_key, p.version, p.operation) for p in first.published] == [
            (A, 1, "append"),
            (B, 1, "append"),
            (OPEN, 1, "open"),
            (OPEN, 2, "open"),
        ]
        # a re-commit of range A, and a fenced attempt of it that must never appear
        stale = stage_one(writer, "blocks", A, data(0, 50, "fenced"))
        writer.write("blocks", A, data(0, 50, "a2"))
        with pytest.raises(AttemptFencedError):
            commit_one(writer, stale)
        # a publisher killed after its Iceberg commit, before its record: the next pass
        # finds its snapshot and only records it
        killed = publisher.publish(record=False)
        assert [(p.version, p.operation) for p in killed.published] == [(2, "overwrite")]
        again = publisher.publish()
        assert [(p.version, p.operation) for p in again.published] == [(2, "recovered")]
        assert again.published[0].snapshot_id == killed.published[0].snapshot_id
        assert publisher.publish().published == []

    table = publisher.catalog.load_table(table_identifier("blocks"))
    snapshots = table.snapshots()
    # one snapshot per committed version, none twice
    assert [s.summary["trace.version"] for s in snapshots] == ["1", "1", "2"]
    assert snapshots[-1].summary.operation.value == "overwrite"

    current = rows(reader.read("blocks", [A, B]))  # the sealed ranges
    previous = rows(
        pa.concat_tables([reader.read_version("blocks", A, 1), reader.read_version("blocks", B, 1)])
    )
    assert len(current) == len(previous) == 100
    assert "fenced" not in {r[4] for r in current + previous}
    previous_id = publisher.snapshot_of("blocks", B, 1)
    assert previous_id == snapshots[-2].snapshot_id
    for snapshot_id, expected in [(None, current), (previous_id, previous)]:
        scanned = table.scan(snapshot_id=snapshot_id).to_arrow()
        assert rows(scanned) == expected  # pyiceberg
        frame = pl.from_arrow(scanned)
        assert isinstance(frame, pl.DataFrame)
        assert rows(frame.to_arrow()) == expected  # polars over pyiceberg's arrow scan
        via_duckdb = duckdb.connect().sql("SELECT * FROM scanned").to_arrow_table()
        assert rows(via_duckdb) == expected  # DuckDB over that arrow
    # the uint32 column is a long: its values above 2**31 keep their value
    assert str(table.schema().find_field("timestamp").field_type) == "long"

    [info] = publisher.tables()
    assert (info.identifier, info.last_partition, info.last_version) == ("trace.blocks", A, 2)
    assert info.metadata_location is not None and info.metadata_location.startswith("s3://")
    # GC removes the superseded versions: the snapshots showing them expire, the current
    # one stays and still reads what Trace serves
    GarbageCollector(objects.datasets(), state.versions()).collect(
        GcPolicy(keep_last=1, older_than=timedelta(0)), apply=True
    )
    assert publisher.expire_unservable() == {
        "blocks": [s.snapshot_id for s in snapshots[:-1]]  # each showed A v1
    }
    table = publisher.catalog.load_table(table_identifier("blocks"))
    assert [s.snapshot_id for s in table.snapshots()] == [snapshots[-1].snapshot_id]
    assert rows(table.scan().to_arrow()) == current
    assert publisher.expire_unservable() == {}

    listed = json.loads(cli("tables", "--json"))
    assert listed["pending"] == 0
    assert [(t["identifier"], t["last_version"], t["published"]) for t in listed["tables"]] == [
        ("trace.blocks", 2, 3)
    ]
    assert listed["tables"][0]["metadata_location"] == table.metadata_location


def test_a_uint64_above_the_long_range_is_refused_clearly(
    state: StateStoreResource, objects: ObjectStoreResource, publisher: IcebergPublisher
) -> None:
    with state.writer(objects) as writer:
        writer.write("blocks", A, data(0, 5, "a", big=2**63))
    with pytest.raises(
        UnsignedRangeError, match="uint64 column 'gas_used' holds .* above 2\\*\\*63-1"
    ):
        publisher.publish()
    assert publisher.pending() != []  # nothing recorded: it is published once fixed


def test_the_sensor_publishes_what_was_committed_since_its_last_tick(
    state: StateStoreResource, objects: ObjectStoreResource
) -> None:
    import dagster as dg

    from trace_sensors.iceberg import build_iceberg_publish_sensor

    sensor = build_iceberg_publish_sensor()

    def tick() -> Any:
        resources = {"state": state, "objects": objects}
        with dg.build_sensor_context(resources=resources) as context:
            return sensor(context)

    assert isinstance(tick(), dg.SkipReason)  # nothing committed: nothing to publish
    with state.writer(objects) as writer:
        committed = writer.write("blocks", A, data(0, 5, "a"))
    result = tick()
    assert isinstance(result, dg.SensorResult)
    assert result.cursor is not None and int(result.cursor) >= 1
    assert "published 1 committed version(s) to Iceberg: 1 append" in str(result.skip_reason)
    publisher = state.iceberg(objects)
    assert publisher.pending() == []
    snapshot_id = publisher.snapshot_of("blocks", A, committed.version.version)
    table = publisher.catalog.load_table(table_identifier("blocks"))
    assert rows(table.scan(snapshot_id=snapshot_id).to_arrow()) == rows(
        state.reader(objects).read("blocks")
    )


def test_a_local_store_publishes_file_uris_and_a_new_column_evolves_the_table(
    state: StateStoreResource, tmp_path: Path
) -> None:
    """The local default (a folder for a bucket): the table's metadata and data are file://
    URIs; a column the dataset gains is added to the table with the same type mapping."""
    objects = ObjectStoreResource(kind="local", local_root=str(tmp_path))
    publisher = state.iceberg(objects)
    with state.writer(objects) as writer:
        writer.write("blocks", A, data(0, 5, "a"))
        wider = data(50, 5, "b").table.append_column("nonce", pa.array(range(5), pa.uint32()))
        writer.write("blocks", B, PartitionData(wider))
    assert [p.operation for p in publisher.publish().published] == ["append", "append"]
    table = publisher.catalog.load_table(table_identifier("blocks"))
    assert table.metadata_location.startswith("file://")
    assert str(table.schema().find_field("nonce").field_type) == "long"
    scanned = table.scan().to_arrow()
    assert rows(scanned) == rows(state.reader(objects).read("blocks", [A, B]))
    assert sorted(scanned.column("nonce").to_pylist(), key=str) == [0, 1, 2, 3, 4, *[None] * 5]


def test_an_open_range_reaches_the_table_once_sealed(
    state: StateStoreResource, objects: ObjectStoreResource, publisher: IcebergPublisher
) -> None:
    """The head tier's appends are not snapshots; the range's sealed version is one."""
    with state.writer(objects) as writer:
        writer.write("blocks", OPEN, data(100, 3, "h1"), mode="append")
        writer.write("blocks", OPEN, data(103, 3, "h2"), mode="append")
        assert [p.operation for p in publisher.publish().published] == ["open", "open"]
        assert publisher.snapshot_of("blocks", OPEN, 2) is None
        sealed = writer.write("blocks", OPEN, data(100, 50, "sealed"))
    [done] = publisher.publish().published
    assert (done.version, done.operation) == (sealed.version.version, "append")
    table = publisher.catalog.load_table(table_identifier("blocks"))
    assert len(table.snapshots()) == 1
    assert rows(table.scan().to_arrow()) == rows(state.reader(objects).read("blocks", [OPEN]))


def test_of_two_publishers_only_the_lease_holder_publishes_and_a_late_one_records_nothing(
    state: StateStoreResource,
    objects: ObjectStoreResource,
    publisher: IcebergPublisher,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    with state.writer(objects) as writer:
        writer.write("blocks", A, data(0, 5, "a"))
    engine = state.versions().engine

    def copy(holder: str, lease_s: float = 60.0) -> LeaderLease:
        return LeaderLease(engine, LEASE_NAME, lease_s=lease_s, holder=holder, background=False)

    first = copy("publisher-a")
    assert first.try_acquire() == 1
    standby = publisher.publish()  # a pass without a lease of its own: it takes one, or waits
    assert standby.busy and "publisher-a" in standby.summary()
    assert len(publisher.pending()) == 1

    # the leader stops; a second copy leads and stalls past its lease mid-pass; a third takes over
    first.release()
    late = copy("publisher-b", lease_s=0.5)
    assert late.try_acquire() == 2
    taker = copy("publisher-c")
    while taker.try_acquire() is None:  # until the stalled lease expires (half a second)
        time.sleep(0.05)
    monkeypatch.setattr(late, "lead", lambda: None)  # its pass began while it still led
    stalled = IcebergPublisher(publisher.versions, publisher.store, publisher.catalog, lease=late)
    with pytest.raises(LeaseLostError, match="now held by publisher-c with token 3"):
        stalled.publish()
    assert len(publisher.pending()) == 1  # its record was refused
    leader = IcebergPublisher(publisher.versions, publisher.store, publisher.catalog, lease=taker)
    outcome = leader.publish()
    assert [p.operation for p in outcome.published] == ["recovered"]  # no second snapshot
    assert publisher.pending() == []
    table = publisher.catalog.load_table(table_identifier("blocks"))
    assert len(table.snapshots()) == 1
