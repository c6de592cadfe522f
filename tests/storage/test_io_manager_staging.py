"""Streaming assets stage through `DatasetIOManager.staging`, the one call that begins their
attempts: run in process against the real Postgres and S3 API, each attempt carries the step's
identity, commits through `handle_output`, or is failed when the run does not commit it."""

from collections.abc import Iterator

import dagster as dg
import pyarrow as pa
import sqlalchemy as sa

from trace_resources.resources import ObjectStoreResource, StateStoreResource
from trace_resources.storage import state as t
from trace_resources.storage.commit import PartitionData, StagedPartition
from trace_resources.storage.io_manager import DatasetIOManager
from trace_resources.storage.paths import UNPARTITIONED
from trace_resources.storage.version_store import VersionStore

FIRST, SECOND = "streamed_first", "streamed_second"


def streamer(fail: str | None = None) -> dg.AssetsDefinition:
    """Stages both datasets inside the staging block, then hands them over as two outputs;
    `fail` makes it raise inside the block or between the outputs."""

    @dg.multi_asset(
        name="streamer",
        outs={name: dg.AssetOut(io_manager_key="dataset_io_manager") for name in (FIRST, SECOND)},
        can_subset=False,
    )
    def _streamer(
        context: dg.AssetExecutionContext, dataset_io_manager: dg.ResourceParam[DatasetIOManager]
    ) -> Iterator[dg.Output[dict[str, StagedPartition]]]:
        staged = {}
        with dataset_io_manager.staging(context) as staging:
            for name in (FIRST, SECOND):
                data = PartitionData(pa.table({"id": pa.array([1, 2, 3], pa.int64())}))
                [staged[name]] = staging.stage(name, {UNPARTITIONED: data})
                if fail == "while_staging":
                    raise RuntimeError("extraction failed after the first dataset was staged")
        for name in (FIRST, SECOND):
            yield dg.Output({UNPARTITIONED: staged[name]}, name)
            if fail == "between_outputs":
                raise RuntimeError("the step fails after its first output was committed")

    return _streamer


def run(
    asset: dg.AssetsDefinition, objects: ObjectStoreResource, state: StateStoreResource
) -> dg.ExecuteInProcessResult:
    return dg.materialize(
        [asset],
        resources={"dataset_io_manager": DatasetIOManager(objects=objects, state=state)},
        raise_on_error=False,
    )


def attempts(versions: VersionStore) -> dict[str, tuple[str, str | None, str | None]]:
    """(state, run id, step key) of every attempt, by dataset."""
    with versions.engine.connect() as conn:
        rows = conn.execute(
            sa.select(
                t.attempts.c.dataset, t.attempts.c.state, t.attempts.c.run_id, t.attempts.c.step_key
            )
        ).all()
    return {r.dataset: (r.state, r.run_id, r.step_key) for r in rows}


def test_staged_partitions_commit_through_handle_output_under_the_steps_identity(
    objects: ObjectStoreResource, state: StateStoreResource, versions: VersionStore
) -> None:
    result = run(streamer(), objects, state)

    assert result.success
    step = ("committed", result.run_id, "streamer")
    assert attempts(versions) == {FIRST: step, SECOND: step}
    for name in (FIRST, SECOND):
        assert versions.read.current_versions(name)[UNPARTITIONED].manifest.rows == 3


def test_an_error_in_the_staging_block_fails_every_attempt_it_began(
    objects: ObjectStoreResource, state: StateStoreResource, versions: VersionStore
) -> None:
    result = run(streamer(fail="while_staging"), objects, state)

    assert not result.success
    assert attempts(versions) == {FIRST: ("failed", result.run_id, "streamer")}
    assert versions.read.current_versions(FIRST) == {}


def test_partitions_handed_over_but_never_committed_are_failed_when_the_run_ends(
    objects: ObjectStoreResource, state: StateStoreResource, versions: VersionStore
) -> None:
    result = run(streamer(fail="between_outputs"), objects, state)

    assert not result.success
    assert attempts(versions) == {
        FIRST: ("committed", result.run_id, "streamer"),
        SECOND: ("failed", result.run_id, "streamer"),
    }
    assert versions.read.current_versions(SECOND) == {}


def test_a_partition_staged_outside_the_staging_block_is_refused(
    objects: ObjectStoreResource, state: StateStoreResource, versions: VersionStore
) -> None:
    @dg.asset(name=FIRST, io_manager_key="dataset_io_manager")
    def _bypass() -> dict[str, StagedPartition]:
        with state.writer(objects) as writer:
            data = PartitionData(pa.table({"id": pa.array([1], pa.int64())}))
            return {UNPARTITIONED: writer.stage(FIRST, {UNPARTITIONED: data})[0]}

    result = run(_bypass, objects, state)

    assert not result.success
    failure = result.failure_data_for_node(FIRST)
    assert failure is not None and "staged outside `DatasetIOManager.staging`" in str(failure.error)
    assert versions.read.current_versions(FIRST) == {}
