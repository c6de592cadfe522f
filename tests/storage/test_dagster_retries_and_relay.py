"""Through Dagster, on the real Postgres and S3 API: a step whose output commits and which then
fails, retried by its retry policy (same run id) and by a re-execution (new run id), commits
that output once; the outbox relay reports what a killed run committed but never recorded,
and nothing twice; of two relays only the leader-lease holder marks events relayed."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import dagster as dg
import pytest
import sqlalchemy as sa

from infra.local.services import MotoS3Server
from tests.storage.conftest import REPO
from tests.storage.dagster_jobs import (
    FIRST,
    SECOND,
    commit_then_fail,
    commit_then_fail_job,
    definitions,
    resources,
)
from tests.utils.invariants import InvariantReport, table_of
from trace_resources.errors import LeaseLostError
from trace_resources.leases import LeaderLease
from trace_resources.resources import ObjectStoreResource, StateStoreResource
from trace_resources.storage import state as t
from trace_resources.storage.commit import PartitionData
from trace_resources.storage.gc import GarbageCollector
from trace_resources.storage.object_store import ObjectStore
from trace_resources.storage.paths import UNPARTITIONED
from trace_resources.storage.version_store import VersionStore
from trace_sensors.outbox import LEASE_NAME, build_outbox_relay_sensor, relay_outbox

ALL = UNPARTITIONED


@pytest.fixture
def job_env(
    monkeypatch: pytest.MonkeyPatch, state_dsn: str, s3_server: MotoS3Server, s3_bucket: str
) -> None:
    monkeypatch.setenv("TRACE_STATE_DSN", state_dsn)
    monkeypatch.setenv("TRACE_S3_ENDPOINT_URL", s3_server.endpoint_url)
    monkeypatch.setenv("TRACE_BUCKET_DATASETS", s3_bucket)
    monkeypatch.delenv("TRACE_TEST_FAIL", raising=False)
    monkeypatch.delenv("TRACE_TEST_EXTRA_ID", raising=False)


def history(versions: VersionStore, dataset: str) -> list[int]:
    with versions.engine.connect() as conn:
        return list(
            conn.execute(
                sa.select(t.versions.c.version)
                .where(t.versions.c.dataset == dataset)
                .order_by(t.versions.c.version)
            ).scalars()
        )


def recorded_versions(instance: dg.DagsterInstance, dataset: str) -> list[int]:
    """trace/version of every materialization Dagster holds for the asset, oldest first."""
    records = instance.fetch_materializations(dg.AssetKey(dataset), limit=100, ascending=True)
    return [
        int(r.asset_materialization.metadata["trace/version"].value)  # type: ignore[union-attr]
        for r in records.records
    ]


def test_a_step_that_fails_after_its_output_committed_commits_it_once_across_retries(
    job_env: None,
    monkeypatch: pytest.MonkeyPatch,
    versions: VersionStore,
    store: ObjectStore,
    invariants: Callable[[], InvariantReport],
) -> None:
    monkeypatch.setenv("TRACE_TEST_FAIL", "first_try")
    instance = dg.DagsterInstance.ephemeral()
    result = dg.materialize([commit_then_fail], instance=instance, resources=resources())
    assert result.success
    restarts = [e for e in result.all_events if e.event_type == dg.DagsterEventType.STEP_RESTARTED]
    assert len(restarts) == 1  # the retry policy ran the step a second time
    assert history(versions, FIRST) == [1] and history(versions, SECOND) == [1]
    # both tries report version 1; the second says it was already committed
    assert recorded_versions(instance, FIRST) == [1, 1]
    first_mats = [m for m in result.asset_materializations_for_node("commit_then_fail")]
    already = [m.metadata["trace/already_committed"].value for m in first_mats]
    assert already.count(True) == 1
    invariants()
    # the retry staged a file no version references: cleanup removes just that one
    cleaned = GarbageCollector(store, versions).cleanup_staging(grace=timedelta(0), apply=True)
    assert len(cleaned.removed) == 1 and FIRST in cleaned.removed[0].key
    invariants()


def test_a_run_reexecuted_with_a_new_run_id_commits_the_output_once(
    job_env: None,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    versions: VersionStore,
    invariants: Callable[[], InvariantReport],
) -> None:
    monkeypatch.setenv("TRACE_TEST_FAIL", "first_run")
    job = dg.reconstructable(commit_then_fail_job)
    with dg.instance_for_test(temp_dir=str(tmp_path)) as instance:
        first = dg.execute_job(job, instance)
        assert not first.success
        assert history(versions, FIRST) == [1] and history(versions, SECOND) == []
        from_failure = dg.ReexecutionOptions.from_failure(first.run_id, instance)
        retried = dg.execute_job(job, instance, reexecution_options=from_failure)
        assert retried.success and retried.run_id != first.run_id
        assert history(versions, FIRST) == [1] and history(versions, SECOND) == [1]
        invariants()
        # re-executing a run whose step had succeeded is a deliberate refresh (its own commit
        # key): the same data keeps the versions, recorded as unchanged ...
        refreshed = dg.execute_job(
            job, instance, reexecution_options=dg.ReexecutionOptions(parent_run_id=retried.run_id)
        )
        assert refreshed.success
        assert history(versions, FIRST) == [1] and history(versions, SECOND) == [1]
        kept = refreshed.asset_materializations_for_node("commit_then_fail")
        assert [
            (m.metadata["trace/unchanged"].value, m.metadata["trace/version"].value) for m in kept
        ] == [(True, 1), (True, 1)]
        # ... and other data makes new versions
        monkeypatch.setenv("TRACE_TEST_EXTRA_ID", "6")
        changed = dg.execute_job(
            job,
            instance,
            reexecution_options=dg.ReexecutionOptions(parent_run_id=refreshed.run_id),
        )
        assert changed.success
        assert history(versions, FIRST) == [1, 2] and history(versions, SECOND) == [1, 2]
        made = changed.asset_materializations_for_node("commit_then_fail")
        assert {m.metadata["trace/unchanged"].value for m in made} == {False}
        invariants()


def test_the_relay_reports_a_commit_whose_run_was_killed_before_dagster_recorded_it(
    job_env: None,
    tmp_path: Path,
    state: StateStoreResource,
    versions: VersionStore,
    invariants: Callable[[], InvariantReport],
) -> None:
    home = tmp_path / "dagster_home"
    home.mkdir()
    (home / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    env = {**os.environ, "DAGSTER_HOME": str(home), "TRACE_CRASH_POINT": "commit.after_pg_commit"}
    done = subprocess.run(
        [sys.executable, "-m", "tests.storage.dagster_jobs"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert done.returncode == -9, done.stderr[-3000:]  # killed right after the first commit
    assert history(versions, FIRST) == [1]
    sensor = build_outbox_relay_sensor()
    with dg.DagsterInstance.from_config(str(home)) as instance:
        [run] = instance.get_runs()
        assert run.status == dg.DagsterRunStatus.STARTED  # nobody told Dagster
        assert recorded_versions(instance, FIRST) == []

        def tick() -> dg.SensorResult | dg.SkipReason:
            context = dg.build_sensor_context(
                instance=instance, resources={"state": state}, definitions=definitions()
            )
            return sensor(context)  # type: ignore[return-value]

        waiting = tick()  # the run still looks in progress: wait for it
        assert isinstance(waiting, dg.SkipReason) and "1 deferred" in (waiting.skip_message or "")
        instance.report_run_failed(run)  # what run monitoring does when the worker is gone
        relayed = tick()
        assert isinstance(relayed, dg.SensorResult) and relayed.cursor is not None
        assert recorded_versions(instance, FIRST) == [1]
        [record] = instance.fetch_materializations(dg.AssetKey(FIRST), limit=5).records
        metadata = record.asset_materialization.metadata  # type: ignore[union-attr]
        assert metadata["trace/relayed_from_outbox"].value == int(relayed.cursor)
        assert metadata["trace/committed_by_run"].value == run.run_id
        assert isinstance(tick(), dg.SkipReason)  # nothing twice

        # retrying the run (new run id) converges on the version that landed
        retried = dg.execute_job(
            dg.reconstructable(commit_then_fail_job),
            instance,
            reexecution_options=dg.ReexecutionOptions.from_failure(run.run_id, instance),
        )
        assert retried.success
        assert history(versions, FIRST) == [1] and history(versions, SECOND) == [1]
        settled = tick()  # the retry recorded SECOND v1 itself: only marked relayed
        assert isinstance(settled, dg.SensorResult) and settled.skip_reason is not None
        assert settled.skip_reason.skip_message.startswith("relayed 0 committed version(s)")
        assert "1 already recorded" in settled.skip_reason.skip_message
        assert set(recorded_versions(instance, FIRST)) == {1}
        assert recorded_versions(instance, SECOND) == [1]
    invariants()


def test_the_relay_skips_recorded_superseded_and_non_asset_versions(
    job_env: None,
    state: StateStoreResource,
    objects: ObjectStoreResource,
    versions: VersionStore,
) -> None:
    instance = dg.DagsterInstance.ephemeral()
    assert dg.materialize([commit_then_fail], instance=instance, resources=resources()).success
    with state.writer(objects) as writer:  # commits Dagster never hears of
        for ids in ([7], [8, 9]):
            writer.write(FIRST, ALL, PartitionData(table_of(ids)))
        writer.write("not_an_asset", ALL, PartitionData(table_of([1])))
    keys = definitions().resolve_asset_graph().get_all_asset_keys()
    outcome = relay_outbox(instance, versions, known_assets=keys)
    assert [(e.dataset, e.version) for e in outcome.relayed] == [(FIRST, 3)]
    assert (outcome.recorded, outcome.superseded, outcome.not_assets) == (1, 2, 1)
    assert recorded_versions(instance, FIRST) == [1, 3]
    assert recorded_versions(instance, SECOND) == [1]
    again = relay_outbox(instance, versions, known_assets=keys)
    assert again.relayed == [] and again.cursor is None
    with versions.engine.connect() as conn:
        unrelayed = conn.execute(
            sa.select(sa.func.count()).select_from(t.outbox).where(t.outbox.c.relayed_at.is_(None))
        ).scalar()
    assert unrelayed == 0


def unrelayed(versions: VersionStore) -> int:
    with versions.engine.connect() as conn:
        return int(
            conn.execute(
                sa.select(sa.func.count())
                .select_from(t.outbox)
                .where(t.outbox.c.relayed_at.is_(None))
            ).scalar_one()
        )


def test_of_two_relays_only_the_lease_holder_marks_and_a_late_one_is_refused(
    job_env: None,
    state: StateStoreResource,
    objects: ObjectStoreResource,
    versions: VersionStore,
) -> None:
    instance = dg.DagsterInstance.ephemeral()
    with state.writer(objects) as writer:  # a commit Dagster never hears of
        writer.write(FIRST, ALL, PartitionData(table_of([7])))
    keys = definitions().resolve_asset_graph().get_all_asset_keys()

    # another copy of the relay holds the lease: this process's sensor stands by
    other = LeaderLease(versions.engine, LEASE_NAME, lease_s=60, holder="relay-a", background=False)
    assert other.try_acquire() == 1
    context = dg.build_sensor_context(
        instance=instance, resources={"state": state}, definitions=definitions()
    )
    standby = build_outbox_relay_sensor()(context)
    assert isinstance(standby, dg.SkipReason)
    assert "standing by" in (standby.skip_message or "")
    assert "relay-a (token 1)" in (standby.skip_message or "")
    assert unrelayed(versions) == 1 and recorded_versions(instance, FIRST) == []

    # it stops; a second copy leads, stalls past its lease; a third takes over; the second
    # wakes up for a late tick
    other.release()
    late = LeaderLease(versions.engine, LEASE_NAME, lease_s=0.5, holder="relay-b", background=False)
    assert late.try_acquire() == 2
    taker = LeaderLease(versions.engine, LEASE_NAME, lease_s=60, holder="relay-c", background=False)
    deadline = time.monotonic() + 30  # against hangs only
    while taker.try_acquire() is None:
        assert time.monotonic() < deadline, "the stalled lease never expired"
        time.sleep(0.1)
    assert taker.token == 3
    with pytest.raises(LeaseLostError, match="now held by relay-c with token 3"):
        relay_outbox(instance, versions, known_assets=keys, lease=late)
    assert unrelayed(versions) == 1  # its marking was refused
    outcome = relay_outbox(instance, versions, known_assets=keys, lease=taker)
    # the late copy's report (Dagster's event log can not be fenced) is found, only marked
    assert (len(outcome.relayed), outcome.recorded) == (0, 1)
    assert unrelayed(versions) == 0
    assert recorded_versions(instance, FIRST) == [1]  # reported once
