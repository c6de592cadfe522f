"""A replace identical to the current version is a recorded no-op, on the real Postgres and the
S3 API: the version and pointer stay, no version row and no outbox event are written, the
attempt ends 'unchanged' naming the version it kept, and its staged files go to staging
cleanup. Other data, a replace of an open partition, and appends are changes as before; a
fenced attempt is refused even when its data equals the current version."""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta

import pyarrow as pa
import pytest
import sqlalchemy as sa

from tests.utils.invariants import InvariantReport
from tests.utils.writes import commit_one, stage_one
from trace_resources.errors import AttemptFencedError
from trace_resources.resources import ObjectStoreResource, StateStoreResource
from trace_resources.storage import state as t
from trace_resources.storage.commit import PartitionData
from trace_resources.storage.gc import GarbageCollector
from trace_resources.storage.object_store import ObjectStore
from trace_resources.storage.version_store import VersionStore

KEY = "000000000000-000000000049"
OPEN = "000000000050-000000000099"


def data(n: int) -> PartitionData:
    source = {
        "range": KEY,
        "first": {"number": 0, "hash": f"0x{0:064x}", "parent_hash": f"0x{0:064x}"},
        "last": {"number": 49, "hash": f"0x{49:064x}", "parent_hash": f"0x{48:064x}"},
    }
    return PartitionData(pa.table({"block_number": pa.array(range(n), pa.uint64())}), source=source)


def version_rows(versions: VersionStore, dataset: str, key: str) -> list[int]:
    with versions.engine.connect() as conn:
        return list(
            conn.execute(
                sa.select(t.versions.c.version)
                .where(t.versions.c.dataset == dataset, t.versions.c.partition_key == key)
                .order_by(t.versions.c.version)
            ).scalars()
        )


def outbox(versions: VersionStore) -> list[tuple[str, str, int]]:
    with versions.engine.connect() as conn:
        rows = conn.execute(
            sa.select(t.outbox.c.dataset, t.outbox.c.partition_key, t.outbox.c.version).order_by(
                t.outbox.c.id
            )
        ).all()
    return [(r.dataset, r.partition_key, r.version) for r in rows]


def attempt_row(versions: VersionStore, attempt_id: str) -> tuple[str, int | None]:
    with versions.engine.connect() as conn:
        row = conn.execute(
            sa.select(t.attempts.c.state, t.attempts.c.committed_version).where(
                t.attempts.c.attempt_id == attempt_id
            )
        ).one()
    return row.state, row.committed_version


def test_identical_data_keeps_the_version_and_other_data_makes_one(
    objects: ObjectStoreResource,
    state: StateStoreResource,
    versions: VersionStore,
    store: ObjectStore,
    invariants: Callable[[], InvariantReport],
) -> None:
    with state.writer(objects) as writer:
        first = writer.write("blocks", KEY, data(10))
        assert (first.version.version, first.unchanged) == (1, False)

        # the same rows again, by another writer (no commit key in common)
        staged = stage_one(writer, "blocks", KEY, data(10))
        same = commit_one(writer, staged, commit_key="run-2:raw_chain")
        assert same.unchanged and not same.already_committed
        assert same.version.version == 1 and same.version.attempt_id == first.version.attempt_id
        assert attempt_row(versions, staged.attempt.attempt_id) == ("unchanged", 1)
        assert version_rows(versions, "blocks", KEY) == [1]
        assert outbox(versions) == [("blocks", KEY, 1)]
        assert state.reader(objects).resolve("blocks")[KEY].version == 1

        # a retry after an unknown outcome, by the same attempt id: the same answer
        item = staged.batch_item()
        retried = versions.commits.commit(item.attempt, item.manifest, item.schema)
        assert (retried.unchanged, retried.already_committed, retried.version.version) == (
            True,
            True,
            1,
        )
        # the writer that kept it, retried (its commit key): the same version
        again = commit_one(
            writer, stage_one(writer, "blocks", KEY, data(10)), commit_key="run-2:raw_chain"
        )
        assert again.already_committed and again.version.version == 1

        # a fenced attempt never commits, even with the current version's data
        stale = stage_one(writer, "blocks", KEY, data(10))
        newer = stage_one(writer, "blocks", KEY, data(10))
        with pytest.raises(AttemptFencedError, match="newer attempt holds fence"):
            commit_one(writer, stale)
        assert attempt_row(versions, stale.attempt.attempt_id)[0] == "fenced"
        assert commit_one(writer, newer).unchanged

        # other data: a new version, its event, the pointer moved
        changed = writer.write("blocks", KEY, data(11))
        assert (changed.version.version, changed.unchanged) == (2, False)
        assert version_rows(versions, "blocks", KEY) == [1, 2]
        assert outbox(versions) == [("blocks", KEY, 1), ("blocks", KEY, 2)]
        assert state.reader(objects).read("blocks", [KEY]).num_rows == 11
        # back to the first data: a change from v2, so v3 (only the current version counts)
        assert writer.write("blocks", KEY, data(10)).version.version == 3

    invariants()
    # the unchanged attempts' files are never referenced: staging cleanup takes them
    cleaned = GarbageCollector(store, versions).cleanup_staging(grace=timedelta(0), apply=True)
    reasons = [item.reason for item in cleaned.removed]
    assert len(reasons) == 4, reasons  # two unchanged, the fenced one, the keyed retry's
    assert sum(r.startswith("attempt unchanged: identical") for r in reasons) == 2
    assert sum(r.startswith("attempt fenced") for r in reasons) == 1
    assert state.reader(objects).read("blocks", [KEY]).num_rows == 10
    invariants()


def test_appends_and_sealing_an_open_partition_are_changes(
    objects: ObjectStoreResource, state: StateStoreResource, versions: VersionStore
) -> None:
    rows = pa.table({"block_number": pa.array(range(50, 60), pa.uint64())})
    with state.writer(objects) as writer:
        # the same rows appended twice (two segment keys) are two appends
        writer.write("blocks", OPEN, PartitionData(rows, segment_key="a"), mode="append")
        second = writer.write("blocks", OPEN, PartitionData(rows, segment_key="b"), mode="append")
        assert not second.unchanged and second.version.version == 2
        # a replace with the open version's rows seals it: a change
        sealed = writer.write("blocks", OPEN, PartitionData(rows))
        assert not sealed.unchanged and sealed.version.version == 3
        # now sealed, the same replace again is a no-op
        assert writer.write("blocks", OPEN, PartitionData(rows)).unchanged
    assert version_rows(versions, "blocks", OPEN) == [1, 2, 3]
    assert [v for _, _, v in outbox(versions)] == [1, 2, 3]
