"""The run coordinator's fast lane: a chain-head run launches at submission when a run slot is
free, and queues like any run when none is or when it is not a fast-lane run. Launching itself
is the instance's (recorded here; the real launch path runs in `make bench-alerts`)."""

from __future__ import annotations

from pathlib import Path

import dagster as dg
import pytest
import yaml
from dagster._core.remote_origin import (
    InProcessCodeLocationOrigin,
    RemoteJobOrigin,
    RemoteRepositoryOrigin,
)
from dagster._core.run_coordinator.base import SubmitRunContext
from dagster._core.types.loadable_target_origin import LoadableTargetOrigin
from dagster._core.utils import make_new_run_id

from trace_resources.instance.run_coordinator import FAST_LANE_TAG, TraceRunCoordinator

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def instance(tmp_path: Path) -> dg.DagsterInstance:
    (tmp_path / "dagster.yaml").write_text(
        "run_coordinator:\n"
        "  module: trace_resources.instance.run_coordinator\n"
        "  class: TraceRunCoordinator\n"
        "  config:\n"
        "    max_concurrent_runs: 1\n"
        "telemetry:\n  enabled: false\n"
    )
    with dg.DagsterInstance.from_config(str(tmp_path)) as inst:
        yield inst


def _run(instance: dg.DagsterInstance, tags: dict[str, str]) -> dg.DagsterRun:
    location = InProcessCodeLocationOrigin(LoadableTargetOrigin(module_name="trace_assets"))
    run = dg.DagsterRun(
        job_name="__ASSET_JOB",
        run_id=make_new_run_id(),
        status=dg.DagsterRunStatus.NOT_STARTED,
        remote_job_origin=RemoteJobOrigin(
            RemoteRepositoryOrigin(location, "__repository__"), "__ASSET_JOB"
        ),
    )
    run = run.with_tags(tags)
    instance.add_run(run)
    return run


def test_fast_lane_launches_at_once_only_with_a_free_slot(
    instance: dg.DagsterInstance, monkeypatch: pytest.MonkeyPatch
) -> None:
    coordinator = instance.run_coordinator
    assert isinstance(coordinator, TraceRunCoordinator)
    launched: list[str] = []

    def launch(run_id: str, workspace: object) -> dg.DagsterRun:
        launched.append(run_id)
        run = instance.get_run_by_id(run_id)
        assert run is not None
        instance.handle_run_event(
            run_id,
            dg.DagsterEvent(
                event_type_value=dg.DagsterEventType.RUN_START.value, job_name=run.job_name
            ),
        )
        return instance.get_run_by_id(run_id)  # type: ignore[return-value]

    monkeypatch.setattr(instance, "launch_run", launch)

    fresh = _run(instance, {FAST_LANE_TAG: "true"})
    coordinator.submit_run(SubmitRunContext(fresh, workspace=None))  # type: ignore[arg-type]
    assert launched == [fresh.run_id]
    assert instance.get_run_by_id(fresh.run_id).status == dg.DagsterRunStatus.STARTED

    # the only slot is taken: the next fresh range queues like any run
    second = _run(instance, {FAST_LANE_TAG: "true"})
    coordinator.submit_run(SubmitRunContext(second, workspace=None))  # type: ignore[arg-type]
    assert launched == [fresh.run_id]
    assert instance.get_run_by_id(second.run_id).status == dg.DagsterRunStatus.QUEUED

    # a run without the tag (a backfill) always queues
    instance.report_run_canceled(instance.get_run_by_id(fresh.run_id))
    other = _run(instance, {})
    coordinator.submit_run(SubmitRunContext(other, workspace=None))  # type: ignore[arg-type]
    assert launched == [fresh.run_id]
    assert instance.get_run_by_id(other.run_id).status == dg.DagsterRunStatus.QUEUED


def test_backfill_interval_is_set_from_the_config(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`backfill_interval_seconds` sets how often this process's backfill daemon ticks (Dagster's
    fixed 30 s otherwise); the deployment's dagster.yaml sets it."""
    from dagster._daemon import controller

    monkeypatch.setattr(controller, "DEFAULT_DAEMON_INTERVAL_SECONDS", 30)  # restored after
    deployed = yaml.safe_load((REPO / "dagster_home" / "dagster.yaml").read_text())
    config = deployed["run_coordinator"]
    assert config["config"]["backfill_interval_seconds"] == 1
    (tmp_path / "dagster.yaml").write_text(
        yaml.safe_dump({"run_coordinator": config, "telemetry": {"enabled": False}})
    )
    with dg.DagsterInstance.from_config(str(tmp_path)) as inst:
        assert isinstance(inst.run_coordinator, TraceRunCoordinator)
    assert controller.DEFAULT_DAEMON_INTERVAL_SECONDS == 1
