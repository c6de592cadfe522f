"""Automatic GC (B11) on the real Postgres and S3 API: the retention policies declared per
dataset, applied by the `retention_gc_job` of the daily schedule (run in process) and shown by
`trace gc --policy`; a bad policy is refused naming the file, line and field; of two runs only
the holder of the GC's leader lease removes anything."""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import dagster as dg
import pytest

from tests.utils.invariants import InvariantReport, table_of, visible_ids
from trace_assets.definitions import build_definitions
from trace_assets.retention import LEASE_NAME, build_retention_schedule, retention_gc_job
from trace_resources import auto_gc
from trace_resources.errors import LeaseLostError
from trace_resources.leases import LeaderLease
from trace_resources.registry import DATASETS_DIR, DeclarationError, load_declarations
from trace_resources.resources import ObjectStoreResource, StateStoreResource
from trace_resources.settings import Settings
from trace_resources.storage.commit import DatasetReader, PartitionData
from trace_resources.storage.gc import GarbageCollector, GcPolicy
from trace_resources.storage.object_store import ObjectStore
from trace_resources.storage.version_store import VersionStore

A = "000000000000-000000000049"
POLICY = "retention: {keep_last: 1, older_than: 0s}\n"


def declarations_with(tmp_path: Path, dataset: str, extra: str) -> tuple[Path, int]:
    """The shipped declarations with `extra` appended to one; the path and first added line."""
    shutil.copytree(DATASETS_DIR, tmp_path / "datasets")
    path = tmp_path / "datasets" / f"{dataset}.yaml"
    text = path.read_text().rstrip("\n") + "\n"
    path.write_text(text + extra)
    return path, text.count("\n") + 1


def step_metadata(result: dg.ExecuteInProcessResult) -> dict[str, Any]:
    outputs = [e for e in result.all_node_events if e.event_type_value == "STEP_OUTPUT"]
    return {k: v.value for k, v in outputs[0].step_output_data.metadata.items()}


def test_schedule_job_removes_beyond_the_policy_never_current_or_pinned(
    tmp_path: Path,
    cli: Callable[..., str],
    state: StateStoreResource,
    objects: ObjectStoreResource,
    store: ObjectStore,
    versions: VersionStore,
    invariants: Callable[[], InvariantReport],
) -> None:
    declared, _ = declarations_with(tmp_path, "blocks", POLICY)
    reader = DatasetReader(store, versions)
    with state.writer(objects) as writer:
        v1 = writer.write("blocks", A, PartitionData(table_of([1])))
        writer.write("blocks", A, PartitionData(table_of([2])))
        # logs declares no policy: its superseded version stays
        writer.write("logs", A, PartitionData(table_of([10])))
        writer.write("logs", A, PartitionData(table_of([11])))
        with reader.pinned("blocks", [A]) as pins:  # a reader holds v2 while v3 lands
            assert pins[A].version == 2
            writer.write("blocks", A, PartitionData(table_of([3])))
            before = set(store.list_keys(""))

            dry = cli("gc", "--policy", "--declarations", str(declared.parent))
            assert store.list_keys("") == sorted(before)  # a dry run removes nothing
            assert "blocks (keep_last 1, older_than 0s):" in dry
            assert f"would remove blocks {A} v1" in dry and f"{A} v2" not in dry
            assert "logs" not in dry

            result = retention_gc_job.execute_in_process(
                resources={"objects": objects, "state": state},
                run_config={
                    "ops": {
                        "apply_retention_policies": {
                            "config": {"declarations_dir": str(declared.parent)}
                        }
                    }
                },
            )
            assert result.success
            out = result.output_for_node("apply_retention_policies")
            # the dry run reported exactly what the apply then removed
            assert [p["removed"] for p in out["plan"]] == [[f"{A} v1"]]
            assert out["applied"] == out["plan"]
            metadata = step_metadata(result)
            assert "| blocks | keep_last 1, older_than 0s | 1 | 1 |" in metadata["plan"]
            assert metadata["planned_versions"] == metadata["removed_versions"] == 1
            assert metadata["planned_bytes"] == metadata["removed_bytes"] > 0

            gone = {f.key for f in v1.version.manifest.files}
            assert set(store.list_keys("")) == before - gone
            assert reader.read_versions([pins[A]]).column("id").to_pylist() == [2]
        assert visible_ids(reader, "blocks", A) == [3]
        assert [v["version"] for v in versions.read.version_history("blocks", A)] == [3, 2]
        assert len(versions.read.version_history("logs", A)) == 2
    invariants()


def test_apply_removes_only_the_reviewed_plan_when_versions_land_in_between(
    tmp_path: Path,
    state: StateStoreResource,
    objects: ObjectStoreResource,
    store: ObjectStore,
    versions: VersionStore,
) -> None:
    declared, _ = declarations_with(tmp_path, "blocks", POLICY)
    decls = load_declarations(declared.parent)
    collector = GarbageCollector(store, versions)
    with state.writer(objects) as writer:
        for n in range(2):
            writer.write("blocks", A, PartitionData(table_of([n])))
        planned = auto_gc.plan(collector, decls)
        assert [p.report.planned for p in planned] == [[("blocks", A, 1)]]
        writer.write("blocks", A, PartitionData(table_of([2])))  # v2 now beyond the policy too
    done = auto_gc.apply_plan(collector, planned)
    assert [p.report.planned for p in done] == [[("blocks", A, 1)]]
    assert [v["version"] for v in versions.read.version_history("blocks", A)] == [3, 2]
    assert [p.report.planned for p in auto_gc.plan(collector, decls)] == [[("blocks", A, 2)]]


def test_a_bad_policy_is_refused_naming_file_line_and_field(tmp_path: Path) -> None:
    path, line = declarations_with(
        tmp_path, "blocks", "retention:\n  keep_last: 0\n  older_than: 30 days\n"
    )
    with pytest.raises(DeclarationError) as caught:
        load_declarations(path.parent)
    message = str(caught.value)
    assert f"{path}:{line + 1}: retention.keep_last: " in message, message
    assert f"{path}:{line + 2}: retention.older_than: " in message, message
    assert "'30 days' is not a duration; use e.g. 90s, 30m, 12h or 7d" in message
    path.write_text(path.read_text().replace("keep_last: 0\n", "keep_last: 1\n  keep: 3\n"))
    with pytest.raises(DeclarationError, match=rf"{path}:{line + 2}: retention.keep: Extra"):
        load_declarations(path.parent)


def test_the_schedule_is_declared_daily_and_its_job_is_in_the_definitions() -> None:
    defs = build_definitions(Settings(sensors_running=False))
    schedules = {s.name: s for s in defs.schedules or ()}
    schedule = schedules["retention_gc_schedule"]
    assert isinstance(schedule, dg.ScheduleDefinition)
    assert schedule.cron_schedule == "0 3 * * *" and schedule.job_name == "retention_gc_job"
    assert schedule.default_status == dg.DefaultScheduleStatus.STOPPED
    assert build_retention_schedule().default_status == dg.DefaultScheduleStatus.RUNNING
    assert defs.resolve_job_def("retention_gc_job").name == "retention_gc_job"


def test_of_two_retention_runs_only_the_lease_holder_removes_anything(
    tmp_path: Path,
    state: StateStoreResource,
    objects: ObjectStoreResource,
    store: ObjectStore,
    versions: VersionStore,
) -> None:
    declared, _ = declarations_with(tmp_path, "blocks", POLICY)
    with state.writer(objects) as writer:
        writer.write("blocks", A, PartitionData(table_of([1])))
        writer.write("blocks", A, PartitionData(table_of([2])))

    def copy(holder: str, lease_s: float = 60.0) -> LeaderLease:
        return LeaderLease(versions.engine, LEASE_NAME, lease_s=lease_s, holder=holder)

    elsewhere = copy("gc-elsewhere")  # another deployment's run is removing
    assert elsewhere.try_acquire() == 1
    result = retention_gc_job.execute_in_process(
        resources={"objects": objects, "state": state},
        run_config={
            "ops": {
                "apply_retention_policies": {"config": {"declarations_dir": str(declared.parent)}}
            }
        },
    )
    assert result.success
    out = result.output_for_node("apply_retention_policies")
    assert out["applied"] == [] and "gc-elsewhere (token 1)" in out["standby"]
    assert len(versions.read.version_history("blocks", A)) == 2

    # that run stalls past its lease and another takes over: it removes nothing more
    elsewhere._stop_renewer()
    elsewhere.lease_s = 0.5
    elsewhere.renew()  # its last renewal: half a second left
    taker = copy("gc-taker")
    while taker.try_acquire() is None:
        time.sleep(0.05)
    stalled = GarbageCollector(store, versions, guard=elsewhere.check)
    with pytest.raises(LeaseLostError, match="now held by gc-taker with token 2"):
        stalled.collect(GcPolicy(keep_last=1, older_than=timedelta(0)), apply=True)
    assert len(versions.read.version_history("blocks", A)) == 2
    taker.release()
    elsewhere.release()  # closes its session (its stale token changes nothing)
