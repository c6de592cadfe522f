"""Leases and fences on the real Postgres and S3 API: zombie writers (SIGSTOP), heartbeats
during long steps, and the race between a commit and a staging cleanup."""

from __future__ import annotations

import os
import random
import signal
import threading
import time
from collections import Counter
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import pytest

from tests.storage.conftest import SpawnWriter
from tests.utils.invariants import InvariantReport, table_of, visible_ids
from tests.utils.writes import commit_one, stage_one
from trace_resources.errors import CommitError, LeaseExpiredError
from trace_resources.resources import ObjectStoreResource, StateStoreResource
from trace_resources.storage.commit import DatasetReader, DatasetWriter, PartitionData
from trace_resources.storage.gc import GarbageCollector
from trace_resources.storage.object_store import ObjectStore
from trace_resources.storage.paths import attempt_prefix
from trace_resources.storage.version_store import VersionStore

KEY = "000000000000-000000000049"


def process_state(pid: int) -> str:
    """The scheduler state letter of a process (T: stopped)."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    return stat.rsplit(")", 1)[1].split()[0]


def cleanup(store: ObjectStore, versions: VersionStore):  # type: ignore[no-untyped-def]
    return GarbageCollector(store, versions).cleanup_staging(grace=timedelta(0), apply=True)


def test_zombie_writer_paused_while_a_newer_attempt_commits_is_fenced(
    spawn_writer: SpawnWriter,
    state: StateStoreResource,
    objects: ObjectStoreResource,
    store: ObjectStore,
    versions: VersionStore,
    invariants: Callable[[], InvariantReport],
) -> None:
    zombie = spawn_writer(writes=[{"ids": [0, 10], "wait_after_stage": True}])
    zombie.expect("ready")
    staged = zombie.expect("staged")
    os.kill(zombie.pid, signal.SIGSTOP)
    time.sleep(0.1)
    assert process_state(zombie.pid) == "T"
    zombie.go()  # read only once it runs again

    with state.writer(objects) as newer:
        result = newer.write("blocks", KEY, PartitionData(table_of(list(range(100, 120)))))
    assert result.version.version == 1

    os.kill(zombie.pid, signal.SIGCONT)
    code, events = zombie.finish()
    assert code == 0
    refusal = events[-1]
    assert refusal["event"] == "refused" and refusal["error"] == "AttemptFencedError"
    assert f"holds fence {staged['fence']} but a newer attempt holds fence" in refusal["message"]
    assert "never referenced" in refusal["message"]
    assert versions.attempts.state(staged["attempt_id"]) == "fenced"

    reader = state.reader(objects)
    assert reader.resolve("blocks")[KEY].attempt_id == result.version.attempt_id
    assert visible_ids(reader, "blocks", KEY) == list(range(100, 120))
    invariants()
    zombie_files = store.list_keys(attempt_prefix("blocks", KEY, staged["attempt_id"]))
    assert zombie_files, "the zombie staged files (and they are simply never referenced)"
    report = cleanup(store, versions)
    assert {i.key for i in report.removed} == set(zombie_files)
    assert store.list_keys(attempt_prefix("blocks", KEY, staged["attempt_id"])) == []
    invariants()
    assert visible_ids(reader, "blocks", KEY) == list(range(100, 120))


def test_zombie_whose_lease_expired_is_abandoned_before_its_files_are_deleted(
    spawn_writer: SpawnWriter,
    store: ObjectStore,
    versions: VersionStore,
    invariants: Callable[[], InvariantReport],
) -> None:
    zombie = spawn_writer(
        lease_s=1.0, heartbeat_s=0.2, writes=[{"ids": [0, 10], "wait_after_stage": True}]
    )
    zombie.expect("ready")
    staged = zombie.expect("staged")
    os.kill(zombie.pid, signal.SIGSTOP)  # its heartbeat thread stops with it
    zombie.go()
    prefix = attempt_prefix("blocks", KEY, staged["attempt_id"])
    assert store.list_keys(prefix)

    time.sleep(1.5)
    report = cleanup(store, versions)
    assert [a.attempt_id for a in report.abandoned] == [staged["attempt_id"]]
    assert versions.attempts.state(staged["attempt_id"]) == "abandoned"
    assert store.list_keys(prefix) == []

    os.kill(zombie.pid, signal.SIGCONT)
    code, events = zombie.finish()
    assert code == 0
    assert events[-1]["event"] == "refused"
    assert "'abandoned' and can no longer commit" in events[-1]["message"]
    assert versions.read.current_versions("blocks") == {}
    invariants()


def test_heartbeat_keeps_a_long_step_alive_and_a_silent_writer_loses_its_lease(
    store: ObjectStore, state_dsn: str, invariants: Callable[[], InvariantReport]
) -> None:
    from trace_resources.storage.state import engine_for

    versions = VersionStore(engine_for(state_dsn), lease_s=1.0)
    with DatasetWriter(store, versions, heartbeat_s=0.2) as writer:
        staged = stage_one(writer, "blocks", KEY, PartitionData(table_of([1, 2, 3])))
        # a long step: the lease (1 s) runs out three times over while cleanups run
        for _ in range(3):
            time.sleep(1.0)
            report = cleanup(store, versions)
            assert report.abandoned == [] and report.removed == []
        assert writer.leases.beats >= 10
        assert commit_one(writer, staged).version.version == 1

        silent = stage_one(writer, "blocks", KEY, PartitionData(table_of([4])))
        writer.leases.release(silent.attempt)  # as if its heartbeat had died with its thread
        time.sleep(1.3)
        with pytest.raises(LeaseExpiredError, match="let its lease expire"):
            commit_one(writer, silent)
    assert versions.attempts.state(silent.attempt.attempt_id) == "abandoned"
    report = cleanup(store, versions)
    assert {i.key for i in report.removed} == {f.key for f in silent.files}
    invariants()


def test_a_commit_racing_a_staging_cleanup_never_both_win(
    store: ObjectStore, state_dsn: str, invariants: Callable[[], InvariantReport]
) -> None:
    """The lease ends just as the commit and the cleanup run at once, many times: either the
    commit lands and its files stay, or the attempt is abandoned and nothing is visible."""
    from trace_resources.storage.state import engine_for

    versions = VersionStore(engine_for(state_dsn), lease_s=0.4)
    reader = DatasetReader(store, versions)
    outcomes: Counter[str] = Counter()
    rng = random.Random(3)
    expected: list[int] = []
    with DatasetWriter(store, versions) as writer:
        for round_number in range(12):
            ids = list(range(round_number * 10, round_number * 10 + 5))
            staged = stage_one(writer, "blocks", KEY, PartitionData(table_of(ids)))
            writer.leases.release(staged.attempt)  # no heartbeat: the lease runs out
            time.sleep(0.4 + rng.uniform(-0.05, 0.05))
            start = threading.Barrier(2)
            result: dict[str, object] = {}

            def commit(staged=staged, start=start, result=result) -> None:  # type: ignore[no-untyped-def]
                start.wait()
                try:
                    result["commit"] = commit_one(writer, staged)
                except CommitError as exc:
                    result["commit"] = exc

            thread = threading.Thread(target=commit)
            thread.start()
            start.wait()
            report = cleanup(store, versions)
            thread.join()
            state = versions.attempts.state(staged.attempt.attempt_id)
            abandoned = staged.attempt.attempt_id in {a.attempt_id for a in report.abandoned}
            if isinstance(result["commit"], CommitError):
                assert state == "abandoned"
                if not abandoned:
                    # the lease ran out between the cleanup's look and the commit's: the commit
                    # refused and abandoned the attempt itself after the cleanup had kept its
                    # then-live files, which are never referenced; the next cleanup removes them
                    if expected:
                        assert visible_ids(reader, "blocks", KEY) == expected
                    cleanup(store, versions)
                assert all(store.size(f.key) is None for f in staged.files)
                outcomes["abandoned"] += 1
            else:
                assert state == "committed" and not abandoned
                assert all(store.size(f.key) == f.size for f in staged.files)
                expected = ids
                outcomes["committed"] += 1
            invariants()
            if expected:
                assert visible_ids(reader, "blocks", KEY) == expected
    assert sum(outcomes.values()) == 12
    print(f"commit vs cleanup at lease end: {dict(outcomes)}")
