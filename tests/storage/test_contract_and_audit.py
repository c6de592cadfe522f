"""The data contract at commit (added, removed, retyped columns: recorded, shown as Dagster
metadata, or refused naming the columns; every schema version kept) and the append-mode
`ingest_audit` asset (each committed raw version exactly once, also under retries and races)."""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import dagster as dg
import pyarrow as pa
import pytest

from tests.conftest import RANGE_SIZE, Devnet
from tests.utils.invariants import InvariantReport
from tests.utils.writes import commit_one, stage_one
from trace_assets.audit import AUDIT_DATASET, audit_batch, ingest_audit
from trace_assets.definitions import build_resources
from trace_assets.partitions import block_ranges
from trace_assets.raw.chain import raw_chain
from trace_resources.chain.ranges import complete_ranges
from trace_resources.errors import SegmentConflictError
from trace_resources.resources import ObjectStoreResource, StateStoreResource
from trace_resources.settings import Settings
from trace_resources.storage.commit import DatasetReader, PartitionData
from trace_resources.storage.io_manager import DatasetIOManager
from trace_resources.storage.object_store import ObjectStore
from trace_resources.storage.paths import UNPARTITIONED
from trace_resources.storage.version_store import VersionStore

A = "000000000000-000000000049"
B = "000000000050-000000000099"


def evolving(table: pa.Table) -> dg.AssetsDefinition:
    @dg.asset(name="evolving", io_manager_key="dataset_io_manager")
    def _asset() -> pa.Table:
        return table

    return _asset


def materialize(
    asset: dg.AssetsDefinition, objects: ObjectStoreResource, state: StateStoreResource
) -> dg.ExecuteInProcessResult:
    return dg.materialize(
        [asset],
        resources={"dataset_io_manager": DatasetIOManager(objects=objects, state=state)},
        raise_on_error=False,
    )


def failure(result: dg.ExecuteInProcessResult) -> str:
    data = result.failure_data_for_node("evolving")
    assert data is not None and data.user_failure_data is not None
    return data.user_failure_data.description or ""


def test_schema_drift_is_recorded_shown_as_metadata_or_refused_naming_columns(
    objects: ObjectStoreResource, state: StateStoreResource, versions: VersionStore
) -> None:
    base = pa.table({"id": pa.array([1, 2], pa.int64()), "name": pa.array(["a", "b"])})
    assert materialize(evolving(base), objects, state).success

    added = base.append_column("extra", pa.array([None, 1.5], pa.float64()))
    result = materialize(evolving(added), objects, state)
    assert result.success
    [mat] = result.asset_materializations_for_node("evolving")
    drift = mat.metadata["trace/schema_drift"].value
    assert drift == {
        UNPARTITIONED: {"added": ["extra"], "removed": [], "retyped": [], "nullability": []}
    }
    assert mat.metadata["trace/schema_version"].value == 2

    removed = added.drop_columns(["name"])
    refused = materialize(evolving(removed), objects, state)
    assert not refused.success
    assert "removed columns ['name']" in failure(refused)
    assert "Keep the old columns and types" in failure(refused)

    retyped = added.set_column(0, "id", pa.array(["1", "2"], pa.string()))
    refused = materialize(evolving(retyped), objects, state)
    assert "retyped ['id']" in failure(refused) and "removed columns none" in failure(refused)

    required = added.append_column(
        pa.field("must", pa.int32(), nullable=False), pa.array([1, 2], pa.int32())
    )
    refused = materialize(evolving(required), objects, state)
    assert "new non-nullable ['must']" in failure(refused)

    # every schema version is kept, with the drift that made it; refusals made none
    history = versions.read.schema_history("evolving")
    assert [v for v, _, _ in history] == [1, 2]
    assert history[0][2] is None and history[1][2]["added"] == ["extra"]
    # and readers still see the last committed data
    assert DatasetReader(objects.datasets(), versions).read("evolving").num_rows == 2
    assert versions.read.current_versions("evolving")[UNPARTITIONED].version == 2


def raw_version(
    state: StateStoreResource, objects: ObjectStoreResource, dataset: str, key: str, n: int
) -> None:
    """A committed raw-dataset version with source block hashes, as the raw assets write."""
    first, last = int(key[:12]), int(key[13:])
    source = {
        "range": key,
        "first": {"number": first, "hash": f"0x{first:064x}", "parent_hash": f"0x{first - 1:064x}"},
        "last": {"number": last, "hash": f"0x{last:064x}", "parent_hash": f"0x{last - 1:064x}"},
    }
    table = pa.table({"block_number": pa.array(range(first, first + n), pa.uint64())})
    with state.writer(objects) as writer:
        writer.write(dataset, key, PartitionData(table, source=source))


def audit_rows(state: StateStoreResource, objects: ObjectStoreResource) -> list[dict[str, object]]:
    table = state.reader(objects).read(AUDIT_DATASET)
    return sorted(table.to_pylist(), key=lambda r: (r["dataset"], r["partition_key"], r["version"]))


def test_ingest_audit_appends_each_committed_raw_version_once(
    objects: ObjectStoreResource,
    state: StateStoreResource,
    versions: VersionStore,
    store: ObjectStore,
    invariants: Callable[[], InvariantReport],
) -> None:
    resources = {
        "state": state,
        "dataset_io_manager": DatasetIOManager(objects=objects, state=state),
    }
    raw_version(state, objects, "blocks", A, 50)
    raw_version(state, objects, "blocks", B, 50)
    raw_version(state, objects, "transactions", A, 7)
    raw_version(state, objects, "transactions", A, 9)  # re-run: version 2, also audited
    result = dg.materialize([ingest_audit], resources=resources)
    assert result.success
    rows = audit_rows(state, objects)
    assert [(r["dataset"], r["partition_key"], r["version"], r["rows"]) for r in rows] == [
        ("blocks", A, 1, 50),
        ("blocks", B, 1, 50),
        ("transactions", A, 1, 7),
        ("transactions", A, 2, 9),
    ]
    assert rows[1]["first_block"] == 50 and rows[1]["last_block_hash"] == f"0x{99:064x}"

    # nothing new: no materialization, no new version (the output is not required)
    again = dg.materialize([ingest_audit], resources=resources)
    assert again.success and again.asset_materializations_for_node("ingest_audit") == []
    assert versions.read.current_versions(AUDIT_DATASET)[UNPARTITIONED].version == 1

    raw_version(state, objects, "logs", A, 3)
    assert dg.materialize([ingest_audit], resources=resources).success
    rows = audit_rows(state, objects)
    assert len(rows) == 5 and rows[2]["dataset"] == "logs"

    # two audit runs racing: the same batch twice is a no-op; an overlapping one is refused
    raw_version(state, objects, "logs", B, 3)
    stale = audit_batch(versions.read)  # computed by a run that is slow to commit
    raw_version(state, objects, "blocks", A, 49)  # different data: a new version
    fresh = audit_batch(versions.read)
    assert stale is not None and fresh is not None
    with state.writer(objects) as writer:
        writer.write(AUDIT_DATASET, UNPARTITIONED, stale, mode="append")
        duplicate = writer.write(AUDIT_DATASET, UNPARTITIONED, stale, mode="append")
        assert duplicate.already_committed
        with pytest.raises(SegmentConflictError, match="already appended"):
            writer.write(AUDIT_DATASET, UNPARTITIONED, fresh, mode="append")
    assert dg.materialize([ingest_audit], resources=resources).success  # the loser's retry
    rows = audit_rows(state, objects)
    keys = [(r["dataset"], r["partition_key"], r["version"]) for r in rows]
    assert len(keys) == len(set(keys)) == 7
    assert keys == sorted(
        (v.dataset, v.partition_key, v.version)
        for v in versions.read.committed_versions(["blocks", "transactions", "logs"])
    )
    invariants()


def test_ingest_audit_downstream_of_the_real_raw_assets(
    devnet: Devnet, test_settings: Settings, objects: ObjectStoreResource, state: StateStoreResource
) -> None:
    keys = [r.key for r in complete_ranges(-1, devnet.finalized, RANGE_SIZE)][:2]
    instance = dg.DagsterInstance.ephemeral()
    instance.add_dynamic_partitions(block_ranges.name or "", keys)
    resources = build_resources(test_settings)
    for key in keys:
        assert dg.materialize(
            [raw_chain], instance=instance, resources=resources, partition_key=key
        ).success
    audited = dg.materialize(
        [raw_chain, ingest_audit], instance=instance, resources=resources, selection=[ingest_audit]
    )
    assert audited.success
    rows = audit_rows(state, objects)
    assert {(r["dataset"], r["partition_key"]) for r in rows} == {
        (d, k) for d in ("blocks", "transactions", "logs") for k in keys
    }
    for row in rows:
        block = devnet.node.rpc("eth_getBlockByNumber", [hex(row["first_block"]), False])
        assert row["first_block_hash"] == block["hash"]
        assert row["run_id"] is not None


def test_concurrent_first_commits_and_schema_changes_register_each_schema_once(
    objects: ObjectStoreResource,
    state: StateStoreResource,
    versions: VersionStore,
    invariants: Callable[[], InvariantReport],
) -> None:
    """Eight writers commit different partitions of a new dataset at once, then all add the
    same column at once: commits share the registry row, a registration takes it alone (a
    deadlock between two upgrades is retried), and each schema is registered exactly once."""
    keys = [f"{i * 50:012d}-{i * 50 + 49:012d}" for i in range(8)]
    base = pa.table({"id": pa.array([1, 2], pa.int64())})
    wider = base.append_column("note", pa.array([None, "x"], pa.string()))

    def commit_all(table: pa.Table) -> list[int]:
        start = threading.Barrier(len(keys))

        def commit(key: str) -> int:
            with state.writer(objects) as writer:
                staged = stage_one(writer, "racing", key, PartitionData(table))
                start.wait()
                return commit_one(writer, staged).schema_version

        with ThreadPoolExecutor(len(keys)) as pool:
            return list(pool.map(commit, keys))

    assert commit_all(base) == [1] * 8
    assert commit_all(wider) == [2] * 8
    assert [v for v, _, _ in versions.read.schema_history("racing")] == [1, 2]
    current = versions.read.current_versions("racing")
    assert sorted(current) == keys and {r.version for r in current.values()} == {2}
    invariants()
