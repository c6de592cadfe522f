"""SIGKILL at every named crash point, on the real Postgres and S3 API (and the local store),
each followed by a retry that converges on one version, with the invariants checked after the
crash, after the retry and after a cleanup."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from infra.local.services import MotoS3Server
from tests.storage.conftest import REPO, SpawnWriter
from tests.utils.invariants import InvariantReport, check_invariants, table_of
from tests.utils.writes import commit_one, stage_one
from trace_resources.resources import ObjectStoreResource, StateStoreResource
from trace_resources.storage import state as t
from trace_resources.storage.commit import DatasetReader, PartitionData
from trace_resources.storage.crash import CRASH_POINTS
from trace_resources.storage.gc import GarbageCollector
from trace_resources.storage.object_store import ObjectStore, local_store
from trace_resources.storage.paths import attempt_prefix
from trace_resources.storage.state import engine_for
from trace_resources.storage.version_store import VersionStore

KEY = "000000000000-000000000049"
SIGKILLED = -9
COMMIT_KEY = "dagster:run-1:raw_chain"  # what the IO manager passes for one step and its retries
WRITER_CRASH_POINTS = [
    "upload.mid_object",
    "stage.during_upload",
    "stage.after_upload",
    "commit.after_pg_commit",
]
exercised: set[str] = set()


def write_spec(**extra: Any) -> dict[str, Any]:
    # 10 rows in files of 4: three files, so a crash can fall between two uploads
    return {
        "rows_per_file": 4,
        "lease_s": 1.0,
        "writes": [{"ids": [0, 10], "commit_key": COMMIT_KEY}],
        **extra,
    }


@pytest.mark.parametrize("backend", ["s3", "local"])
@pytest.mark.parametrize("point", WRITER_CRASH_POINTS)
def test_writer_killed_at_crash_point_then_retried_converges_on_one_version(
    point: str,
    backend: str,
    spawn_writer: SpawnWriter,
    state_dsn: str,
    store: ObjectStore,
    tmp_path: Path,
    s3_bucket: str,
) -> None:
    versions = VersionStore(engine_for(state_dsn))
    extra: dict[str, Any] = {}
    if backend == "local":
        store = local_store(tmp_path, s3_bucket)
        extra["local_root"] = str(tmp_path)
    crashed = spawn_writer(crash_point=point, **write_spec(**extra))
    code, events = crashed.finish()
    assert code == SIGKILLED, f"{point}: exit {code}, {events}, {crashed.stderr()[-2000:]}"
    exercised.add(point)
    with versions.engine.connect() as conn:
        row = conn.execute(sa.select(t.attempts.c.attempt_id, t.attempts.c.state)).one()
    attempt_id, state = str(row.attempt_id), row.state
    leftovers = store.list_keys(attempt_prefix("blocks", KEY, attempt_id))
    check_invariants(versions, store)
    if point == "commit.after_pg_commit":
        assert state == "committed"
        assert versions.read.current_versions("blocks")[KEY].version == 1
    else:
        assert state == "staging" and versions.read.current_versions("blocks") == {}
        expected_files = {"upload.mid_object": 0, "stage.during_upload": 1}.get(point, 3)
        if point == "upload.mid_object" and backend == "local":
            expected_files = 1  # half an object on disk: never referenced
        assert len(leftovers) == expected_files, leftovers

    # the retry: a new process, a new attempt, the same logical writer (commit key)
    retry = spawn_writer(**write_spec(**extra))
    code, events = retry.finish()
    assert code == 0, retry.stderr()
    result = events[-1]
    assert result["event"] == "committed" and result["version"] == 1
    assert result["already"] == (point == "commit.after_pg_commit")
    check_invariants(versions, store)
    reader = DatasetReader(store, versions)
    assert sorted(reader.read("blocks", [KEY]).column("id").to_pylist()) == list(range(10))

    time.sleep(1.1)  # the crashed attempt's lease (1 s) runs out; nothing heartbeats it
    report = GarbageCollector(store, versions).cleanup_staging(grace=timedelta(0), apply=True)
    removed = {i.key for i in report.removed}
    assert set(leftovers) <= removed or point == "commit.after_pg_commit"
    if point == "commit.after_pg_commit":
        # the crashed attempt's files are the committed version's; the retry's are the orphans
        assert not removed & set(leftovers)
    assert store.list_keys(attempt_prefix("blocks", KEY, attempt_id)) == (
        leftovers if point == "commit.after_pg_commit" else []
    )
    check_invariants(versions, store)
    with versions.engine.connect() as conn:
        assert conn.execute(sa.select(sa.func.count()).select_from(t.versions)).scalar() == 1


def run_cli(
    args: list[str], env: dict[str, str], crash_point: str | None = None
) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in env.items() if k != "TRACE_CRASH_POINT"}
    if crash_point:
        env["TRACE_CRASH_POINT"] = crash_point
    return subprocess.run(
        [str(Path(sys.executable).with_name("trace")), *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.fixture
def cli_env(state_dsn: str, s3_server: MotoS3Server, s3_bucket: str) -> dict[str, str]:
    return {
        **os.environ,
        "TRACE_STATE_DSN": state_dsn,
        "TRACE_OBJECT_STORE": "s3",
        "TRACE_S3_ENDPOINT_URL": s3_server.endpoint_url,
        "TRACE_BUCKET_DATASETS": s3_bucket,
    }


@pytest.mark.parametrize("point", ["gc.after_versions_deleted", "gc.during_file_delete"])
def test_gc_killed_at_crash_point_finishes_on_its_next_run(
    point: str,
    cli_env: dict[str, str],
    state: StateStoreResource,
    objects: ObjectStoreResource,
    store: ObjectStore,
    versions: VersionStore,
    invariants: Callable[[], InvariantReport],
) -> None:
    with state.writer(objects) as writer:
        written = [
            writer.write("blocks", KEY, PartitionData(table_of(list(range(v * 10, v * 10 + 5)))))
            for v in range(3)
        ]
    old_files = [f.key for r in written[:2] for f in r.version.manifest.files]
    gc_args = ["gc", "--apply", "--keep-last", "1", "--older-than", "0s"]

    crashed = run_cli(gc_args, cli_env, crash_point=point)
    assert crashed.returncode == SIGKILLED, crashed.stderr
    exercised.add(point)
    with versions.engine.connect() as conn:
        kept = conn.execute(sa.select(t.versions.c.version)).scalars().all()
        queued = conn.execute(sa.select(t.gc_queue.c.key)).scalars().all()
    assert kept == [3]  # the rows went in one transaction, before any file
    existing = [k for k in old_files if store.size(k) is not None]
    assert len(existing) == (2 if point == "gc.after_versions_deleted" else 1)
    assert sorted(queued) == sorted(old_files)  # the write-ahead queue still lists both
    invariants()  # the current version is whole whatever the crash left

    finished = run_cli(gc_args, cli_env)
    assert finished.returncode == 0, finished.stderr
    assert all(store.size(k) is None for k in old_files)
    assert "gc: 0 version(s), 2 file(s)" in finished.stdout  # the files the crash left queued
    invariants()
    with versions.engine.connect() as conn:
        assert conn.execute(sa.select(sa.func.count()).select_from(t.gc_queue)).scalar() == 0
    assert state.reader(objects).read("blocks", [KEY]).column("id").to_pylist() == list(
        range(20, 25)
    )


def test_staging_cleanup_killed_after_abandoning_finishes_on_its_next_run(
    cli_env: dict[str, str],
    store: ObjectStore,
    state_dsn: str,
    invariants: Callable[[], InvariantReport],
) -> None:
    from trace_resources.storage.commit import DatasetWriter
    from trace_resources.storage.state import engine_for

    versions = VersionStore(engine_for(state_dsn), lease_s=0.5)
    with DatasetWriter(store, versions) as writer:
        staged = stage_one(writer, "blocks", KEY, PartitionData(table_of([1, 2])))
        writer.leases.release(staged.attempt)  # its writer "died": no more heartbeats
        time.sleep(0.7)
        crashed = run_cli(["staging-cleanup", "--apply"], cli_env, "cleanup.after_abandon")
        assert crashed.returncode == SIGKILLED
        exercised.add("cleanup.after_abandon")
        assert versions.attempts.state(staged.attempt.attempt_id) == "abandoned"
        assert all(store.size(f.key) == f.size for f in staged.files)  # not deleted yet
        # its writer wakes up: the commit is refused, so the files can safely go
        with pytest.raises(Exception, match="'abandoned' and can no longer commit"):
            commit_one(writer, staged)
    finished = run_cli(["staging-cleanup", "--apply"], cli_env)
    assert finished.returncode == 0, finished.stderr
    assert "attempt abandoned: never committed" in finished.stdout
    assert all(store.size(f.key) is None for f in staged.files)
    invariants()


# crash points whose SIGKILL is exercised by another module, and where
EXERCISED_ELSEWHERE = {"promote.after_state_commit": "tests/promote/test_promotion.py"}


def test_every_crash_point_was_exercised() -> None:
    """Runs last in this module: every named crash point took a SIGKILL above (or in the
    module EXERCISED_ELSEWHERE names)."""
    missing = set(CRASH_POINTS) - exercised - set(EXERCISED_ELSEWHERE)
    if missing:
        pytest.fail(f"crash points never exercised: {sorted(missing)}")
