"""The batched commit path (many partitions of a ranged run: attempts begun in one transaction,
uploads concurrent, one commit transaction) keeps every guarantee of the one-by-one path:
one version and one outbox event per partition, fences, commit keys, continuity, and, when
any partition would be refused, nothing committed by the batch and each partition then
committed or refused exactly as it would have been on its own."""

from __future__ import annotations

from collections.abc import Callable

import pyarrow as pa
import pytest
import sqlalchemy as sa

from tests.utils.invariants import InvariantReport
from trace_resources.errors import (
    AttemptFencedError,
    ChainContinuityError,
    SchemaIncompatibleError,
)
from trace_resources.resources import ObjectStoreResource, StateStoreResource
from trace_resources.storage import state as tables
from trace_resources.storage.commit import PartitionData
from trace_resources.storage.version_store import VersionStore

KEYS = [f"{i * 50:012d}-{i * 50 + 49:012d}" for i in range(4)]


def table(key: str, n: int = 5) -> pa.Table:
    first = int(key[:12])
    return pa.table({"block_number": pa.array(range(first, first + n), pa.uint64())})


def source(key: str, parent: str | None = None) -> dict[str, object]:
    first, last = int(key[:12]), int(key[13:])
    return {
        "range": key,
        "first": {
            "number": first,
            "hash": f"0x{first:064x}",
            "parent_hash": parent or f"0x{first - 1:064x}",
        },
        "last": {"number": last, "hash": f"0x{last:064x}", "parent_hash": f"0x{last - 1:064x}"},
    }


def outbox(versions: VersionStore, dataset: str) -> list[tuple[str, int]]:
    with versions.engine.connect() as conn:
        rows = conn.execute(
            sa.select(tables.outbox.c.partition_key, tables.outbox.c.version)
            .where(tables.outbox.c.dataset == dataset)
            .order_by(tables.outbox.c.partition_key, tables.outbox.c.version)
        ).all()
    return [(r.partition_key, r.version) for r in rows]


def test_a_batch_commits_one_version_and_one_event_per_partition(
    objects: ObjectStoreResource,
    state: StateStoreResource,
    versions: VersionStore,
    invariants: Callable[[], InvariantReport],
) -> None:
    data = {k: PartitionData(table(k), source=source(k)) for k in KEYS}
    with state.writer(objects) as writer:
        results = writer.commit(writer.stage("blocks", data), commit_key="run-1:step")
        assert sorted(results) == KEYS
        assert {r.version.version for r in results.values()} == {1}
        assert outbox(versions, "blocks") == [(k, 1) for k in KEYS]
        # the same logical writer again (a retried step): nothing new, the same versions
        again = writer.commit(writer.stage("blocks", data), commit_key="run-1:step")
        assert all(r.already_committed and r.version.version == 1 for r in again.values())
        # another writer with the same data: unchanged, the versions kept, no event
        same = writer.commit(writer.stage("blocks", data), commit_key="run-2:step")
        assert all(r.unchanged and r.version.version == 1 for r in same.values())
        assert outbox(versions, "blocks") == [(k, 1) for k in KEYS]
        # another writer with other data: a new version of each partition, each with its event
        changed = {k: PartitionData(table(k, 6), source=source(k)) for k in KEYS}
        writer.commit(writer.stage("blocks", changed), commit_key="run-3:step")
    assert {k: r.version for k, r in versions.read.current_versions("blocks").items()} == {
        k: 2 for k in KEYS
    }
    assert outbox(versions, "blocks") == sorted([(k, v) for k in KEYS for v in (1, 2)])
    assert state.reader(objects).read("blocks").num_rows == 6 * len(KEYS)
    report = invariants()
    # the retry's attempts landed as no-ops ('committed'); the same data's as 'unchanged'
    assert set(report.attempts) == {"committed", "unchanged"}


def test_a_refused_partition_commits_nothing_in_the_batch_then_each_alone(
    objects: ObjectStoreResource,
    state: StateStoreResource,
    versions: VersionStore,
    invariants: Callable[[], InvariantReport],
) -> None:
    with state.writer(objects) as writer:
        staged = writer.stage("blocks", {k: PartitionData(table(k)) for k in KEYS})
        # a newer writer takes the fence of the third partition: that stale attempt is refused
        writer.write("blocks", KEYS[2], PartitionData(table(KEYS[2], 9)))
        with pytest.raises(AttemptFencedError, match="holds fence 1 but a newer attempt"):
            writer.commit(staged)
        states = {
            s.attempt.partition_key: versions.attempts.state(s.attempt.attempt_id) for s in staged
        }
    # as one by one: the partitions before the refused one committed, it was fenced, the
    # rest given up (never referenced)
    assert states == {
        KEYS[0]: "committed",
        KEYS[1]: "committed",
        KEYS[2]: "fenced",
        KEYS[3]: "failed",
    }
    current = versions.read.current_versions("blocks")
    assert sorted(current) == KEYS[:3]
    assert current[KEYS[2]].manifest.rows == 9  # the newer writer's version stands
    assert outbox(versions, "blocks") == [(KEYS[0], 1), (KEYS[1], 1), (KEYS[2], 1)]
    invariants()


def test_continuity_is_checked_within_the_batch(
    objects: ObjectStoreResource,
    state: StateStoreResource,
    versions: VersionStore,
    invariants: Callable[[], InvariantReport],
) -> None:
    data = {k: PartitionData(table(k), source=source(k)) for k in KEYS}
    # the third range's first block does not link to the second range's last block: a fork
    data[KEYS[2]] = PartitionData(table(KEYS[2]), source=source(KEYS[2], parent="0x" + "ee" * 32))
    with state.writer(objects) as writer, pytest.raises(ChainContinuityError, match="forked"):
        writer.commit(writer.stage("blocks", data))
    assert sorted(versions.read.current_versions("blocks")) == KEYS[:2]
    invariants()


def test_every_schema_in_the_batch_goes_through_the_registry(
    objects: ObjectStoreResource,
    state: StateStoreResource,
    versions: VersionStore,
    invariants: Callable[[], InvariantReport],
) -> None:
    with state.writer(objects) as writer:
        writer.write("blocks", KEYS[0], PartitionData(table(KEYS[0])))  # registers v1
        wider = table(KEYS[1]).append_column(
            pa.field("note", pa.string(), nullable=True), pa.array(["x"] * 5, pa.string())
        )
        data = {
            KEYS[0]: PartitionData(table(KEYS[0], 6)),  # other rows: a new version
            KEYS[1]: PartitionData(wider),  # a compatible new schema: registered as v2
            KEYS[2]: PartitionData(table(KEYS[2])),  # v1 again: drops `note`, refused alone
        }
        with pytest.raises(SchemaIncompatibleError, match="removed columns \\['note'\\]"):
            writer.commit(writer.stage("blocks", data))
    assert [v for v, _, _ in versions.read.schema_history("blocks")] == [1, 2]
    current = versions.read.current_versions("blocks")
    assert {k: r.version for k, r in current.items()} == {KEYS[0]: 2, KEYS[1]: 1}
    invariants()
