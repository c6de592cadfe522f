"""Eight writer processes on one dataset partition at once, on the real Postgres and S3 API:
replace gives a linear history, append contains each range exactly once."""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta

import sqlalchemy as sa

from tests.storage.conftest import SpawnWriter
from tests.utils.invariants import InvariantReport, visible_ids
from trace_resources.resources import ObjectStoreResource, StateStoreResource
from trace_resources.storage import state as t
from trace_resources.storage.gc import GarbageCollector
from trace_resources.storage.object_store import ObjectStore
from trace_resources.storage.paths import UNPARTITIONED
from trace_resources.storage.version_store import VersionStore

KEY = "000000000000-000000000049"
WRITERS = 8


def run_all(spawn_writer: SpawnWriter, specs: list[dict[str, object]]) -> list[dict[str, object]]:
    """Start every writer, release them together, and collect all their events."""
    procs = [spawn_writer(wait_before_start=True, **spec) for spec in specs]
    for proc in procs:
        proc.expect("ready")
    for proc in procs:
        proc.go()
    events = []
    for proc in procs:
        code, seen = proc.finish(timeout=120)
        assert code == 0, proc.stderr()
        events += [e for e in seen if e["event"] in ("committed", "refused")]
    return events


def history(versions: VersionStore, dataset: str, partition: str) -> list[tuple[int, str]]:
    with versions.engine.connect() as conn:
        return [
            (r.version, str(r.attempt_id))
            for r in conn.execute(
                sa.select(t.versions.c.version, t.versions.c.attempt_id)
                .where(t.versions.c.dataset == dataset)
                .where(t.versions.c.partition_key == partition)
                .order_by(t.versions.c.version)
            )
        ]


def test_eight_concurrent_replace_writers_give_a_linear_history(
    spawn_writer: SpawnWriter,
    state: StateStoreResource,
    objects: ObjectStoreResource,
    store: ObjectStore,
    versions: VersionStore,
    invariants: Callable[[], InvariantReport],
) -> None:
    specs = [
        {
            "name": f"w{i}",
            "writes": [{"ids": [i * 1000 + j * 10, i * 1000 + j * 10 + 5]} for j in range(4)],
        }
        for i in range(WRITERS)
    ]
    events = run_all(spawn_writer, specs)
    assert len(events) == WRITERS * 4
    committed = sorted((e for e in events if e["event"] == "committed"), key=lambda e: e["version"])
    refused = [e for e in events if e["event"] == "refused"]
    assert committed, "at least the last fence holder commits"
    assert all(e["error"] == "AttemptFencedError" for e in refused)
    # linear: versions 1..n with no gaps, one per successful commit, fences rising with them
    assert [e["version"] for e in committed] == list(range(1, len(committed) + 1))
    assert all(not e["already"] for e in committed)
    fences = [e["fence"] for e in committed]
    assert fences == sorted(fences) and len(set(fences)) == len(fences)
    assert history(versions, "blocks", KEY) == [(e["version"], e["attempt_id"]) for e in committed]
    current = versions.read.current_versions("blocks")[KEY]
    assert current.version == len(committed)
    last = committed[-1]["ids"]
    assert visible_ids(state.reader(objects), "blocks", KEY) == list(range(last[0], last[1]))
    report = invariants()
    assert report.attempts["committed"] == len(committed)
    assert report.attempts["fenced"] == len(refused)
    # the losers' files were never referenced; cleanup removes exactly those
    cleaned = GarbageCollector(store, versions).cleanup_staging(grace=timedelta(0), apply=True)
    assert len(cleaned.removed) == len(refused)
    invariants()
    print(f"replace: {len(committed)} committed, {len(refused)} fenced of {len(events)} attempts")


def test_eight_concurrent_appenders_add_each_range_exactly_once(
    spawn_writer: SpawnWriter,
    state: StateStoreResource,
    objects: ObjectStoreResource,
    store: ObjectStore,
    versions: VersionStore,
    invariants: Callable[[], InvariantReport],
) -> None:
    # writer i appends ranges 4i .. 4i+5: each overlaps its neighbour by two (retried appends)
    def ids(r: int) -> list[int]:
        return [r * 100, r * 100 + 3]

    specs = [
        {
            "name": f"w{i}",
            "dataset": "audit_log",
            "partition": UNPARTITIONED,
            "mode": "append",
            "writes": [
                {"ids": ids(r), "segment_keys": [f"range-{r}"]} for r in range(4 * i, 4 * i + 6)
            ],
        }
        for i in range(WRITERS)
    ]
    events = run_all(spawn_writer, specs)
    ranges = {r for i in range(WRITERS) for r in range(4 * i, 4 * i + 6)}
    assert len(events) == WRITERS * 6 and all(e["event"] == "committed" for e in events)
    new = sorted((e for e in events if not e["already"]), key=lambda e: e["version"])
    assert len(new) == len(ranges)
    assert len(events) - len(new) == WRITERS * 6 - len(ranges)  # retries were no-ops
    assert [e["version"] for e in new] == list(range(1, len(ranges) + 1))
    current = versions.read.current_versions("audit_log")[UNPARTITIONED]
    assert current.version == len(ranges)
    keys = versions.read.appended_keys("audit_log", UNPARTITIONED)
    assert sorted(keys) == sorted(f"range-{r}" for r in ranges)
    assert current.manifest.through_seq == len(ranges)  # one segment row per new append
    expected = sorted(n for r in ranges for n in range(*ids(r)))
    assert visible_ids(state.reader(objects), "audit_log", UNPARTITIONED) == expected
    invariants()
    cleaned = GarbageCollector(store, versions).cleanup_staging(grace=timedelta(0), apply=True)
    assert len(cleaned.removed) == WRITERS * 6 - len(ranges)  # the no-op retries' files
    invariants()
    assert visible_ids(state.reader(objects), "audit_log", UNPARTITIONED) == expected
