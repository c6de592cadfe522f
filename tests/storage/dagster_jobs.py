"""Dagster code for the retry and relay tests: a step that commits its first output and then
fails, run through the real `DatasetIOManager`.

It is a module (not test-local definitions) so that runs can be reconstructed: re-executed
with a new run id in the test process, or launched in a subprocess that a crash point kills
(`python -m tests.storage.dagster_jobs`, with `DAGSTER_HOME` and the `TRACE_*` variables set).
When the step fails is chosen by `TRACE_TEST_FAIL`:

- `first_try`: every run's first try of the step fails after the first output committed;
- `first_run`: every try of a run without a parent run fails (a re-execution succeeds);
- unset: the step succeeds.

`TRACE_TEST_EXTRA_ID` adds that id to both outputs (other data than the runs before).
"""

import os
from collections.abc import Iterator
from typing import Any

import dagster as dg
import pyarrow as pa

from trace_resources.resources import ObjectStoreResource, StateStoreResource
from trace_resources.storage.io_manager import DatasetIOManager

FIRST, SECOND = "first_output", "second_output"
JOB = "commit_then_fail_job"


def resources() -> dict[str, Any]:
    objects = ObjectStoreResource(
        kind="s3",
        endpoint_url=dg.EnvVar("TRACE_S3_ENDPOINT_URL"),
        access_key_id=dg.EnvVar("AWS_ACCESS_KEY_ID"),
        secret_access_key=dg.EnvVar("AWS_SECRET_ACCESS_KEY"),
        bucket_datasets=dg.EnvVar("TRACE_BUCKET_DATASETS"),
    )
    state = StateStoreResource(dsn=dg.EnvVar("TRACE_STATE_DSN"))
    return {
        "objects": objects,
        "state": state,
        "dataset_io_manager": DatasetIOManager(objects=objects, state=state),
    }


def _fails(context: dg.AssetExecutionContext) -> bool:
    mode = os.environ.get("TRACE_TEST_FAIL", "")
    if mode == "first_try":
        return context.retry_number == 0
    if mode == "first_run":
        return context.run.parent_run_id is None
    return False


@dg.multi_asset(
    outs={
        FIRST: dg.AssetOut(io_manager_key="dataset_io_manager"),
        SECOND: dg.AssetOut(io_manager_key="dataset_io_manager"),
    },
    retry_policy=dg.RetryPolicy(max_retries=2),
    can_subset=False,
)
def commit_then_fail(context: dg.AssetExecutionContext) -> Iterator[dg.Output[pa.Table]]:
    extra = [int(os.environ["TRACE_TEST_EXTRA_ID"])] if "TRACE_TEST_EXTRA_ID" in os.environ else []
    yield dg.Output(pa.table({"id": pa.array([1, 2, 3, *extra], pa.int64())}), FIRST)
    if _fails(context):
        raise RuntimeError("the step fails after its first output was committed")
    yield dg.Output(pa.table({"id": pa.array([4, 5, *extra], pa.int64())}), SECOND)


def definitions() -> dg.Definitions:
    return dg.Definitions(
        assets=[commit_then_fail],
        jobs=[dg.define_asset_job(JOB, executor_def=dg.in_process_executor)],
        resources=resources(),
    )


def commit_then_fail_job() -> dg.JobDefinition:
    return definitions().resolve_job_def(JOB)


def run_once() -> int:
    """Run the job once on the instance in $DAGSTER_HOME (the test finds the run there)."""
    with dg.DagsterInstance.get() as instance:
        result = dg.execute_job(dg.reconstructable(commit_then_fail_job), instance)
        return 0 if result.success else 1


if __name__ == "__main__":
    raise SystemExit(run_once())
