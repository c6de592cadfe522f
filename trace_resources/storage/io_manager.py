"""The IO manager: config fields plus delegation to the commit protocol.

An asset returns a `pyarrow.Table` (one partition or an unpartitioned dataset), a
`PartitionData`, or a mapping `{partition_key: PartitionData}` when one run materialises many
partitions (a ranged backfill). Assets that handle many large partitions stream each one to
the object store as they go and return `StagedPartition`s instead, so a run's memory does not
grow with its number of partitions; the IO manager then only verifies and commits. Each
partition is committed as its own version.

Every commit carries a commit key naming the logical writer (`commit_key_for`): a step, its
retries within the run, and re-executions of the run from the failure, so a step whose
output committed and which then failed commits that output once, however it is retried.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import dagster as dg
import pyarrow as pa
from dagster._core.execution.stats import StepEventStatus

from trace_resources.failures import as_dagster_failure
from trace_resources.resources import ObjectStoreResource, StateStoreResource
from trace_resources.storage.commit import DatasetWriter, PartitionData, StagedPartition
from trace_resources.storage.paths import UNPARTITIONED
from trace_resources.storage.records import CommitMode, CommitResult

__all__ = ["DatasetIOManager", "COMMIT_MODE_METADATA", "commit_key_for"]

COMMIT_MODE_METADATA = "trace/commit_mode"


def commit_key_for(context: dg.OutputContext) -> str | None:
    """The logical writer of this output: `dagster:<anchor run id>:<step key>`.

    Step retries keep the run id; a re-execution gets a new run id with the old run as its
    parent. The anchor is the earliest run in the parent chain whose attempts at this step all
    failed since: a retry after a failure finds the version its earlier try committed and
    commits nothing new, while re-executing a step that had succeeded (a deliberate refresh)
    anchors on the new run and makes a new version.
    """
    try:
        step = context.step_context
    except Exception:  # outside a run (direct invocation): every write is its own writer
        return None
    run, instance, anchor = step.dagster_run, step.instance, step.dagster_run.run_id
    parent = run.parent_run_id
    while parent is not None:
        stats = instance.get_run_step_stats(parent, step_keys=[context.step_key])
        if any(s.status == StepEventStatus.SUCCESS for s in stats):
            break
        anchor = parent
        parent_run = instance.get_run_by_id(parent)
        parent = parent_run.parent_run_id if parent_run is not None else None
    return f"dagster:{anchor}:{context.step_key}"


def _retry_number(context: dg.OutputContext) -> int:
    try:
        return context.step_context.previous_attempt_count
    except Exception:  # outside a run (direct invocation) there is no step context
        return 0


def _expected_keys(context: dg.OutputContext | dg.InputContext) -> list[str]:
    return list(context.asset_partition_keys) if context.has_asset_partitions else [UNPARTITIONED]


def _as_partitions(
    context: dg.OutputContext, obj: object
) -> dict[str, PartitionData | StagedPartition]:
    expected = _expected_keys(context)
    if isinstance(obj, pa.Table):
        obj = PartitionData(obj)
    if isinstance(obj, PartitionData):
        if len(expected) != 1:
            raise dg.DagsterInvariantViolationError(
                f"{context.asset_key.to_user_string()} returned one table for {len(expected)} "
                "partitions: return a mapping {partition_key: PartitionData} when a run covers "
                "several partitions"
            )
        return {expected[0]: obj}
    if isinstance(obj, Mapping):
        if sorted(obj) != sorted(expected):
            raise dg.DagsterInvariantViolationError(
                f"{context.asset_key.to_user_string()} returned partitions {sorted(obj)[:3]}… "
                f"but the run materialises {expected[:3]}…; return exactly one entry per "
                "partition of the run"
            )
        return {
            k: v if isinstance(v, PartitionData | StagedPartition) else PartitionData(v)
            for k, v in obj.items()
        }
    raise dg.DagsterInvariantViolationError(
        f"{context.asset_key.to_user_string()} returned {type(obj).__name__}; the dataset IO "
        "manager stores a pyarrow.Table, a PartitionData or a mapping of them by partition key"
    )


def _metadata(results: dict[str, CommitResult], uri: str) -> dict[str, Any]:
    versions = {k: r.version.version for k, r in results.items()}
    rows = sum(r.version.manifest.rows for r in results.values())
    size = sum(r.version.manifest.bytes for r in results.values())
    drifts = {k: r.drift for k, r in results.items() if r.drift}
    schema_versions = sorted({r.schema_version for r in results.values()})
    # Dagster copies one output's metadata onto every partition of a ranged run, so the
    # per-partition row count is set only when the run has one partition.
    metadata: dict[str, Any] = {
        "trace/rows_in_run": rows,
        "trace/bytes_in_run": size,
        "trace/partitions_committed": len(results),
        "trace/versions": dg.MetadataValue.json(versions),
        "trace/schema_version": schema_versions[-1],
        "trace/uri": dg.MetadataValue.path(uri),
    }
    if len(results) == 1:
        metadata["trace/version"] = next(iter(versions.values()))
        metadata["dagster/row_count"] = rows
    # a retry whose output had committed already: the same version, nothing new written
    metadata["trace/already_committed"] = all(r.already_committed for r in results.values())
    if drifts:
        metadata["trace/schema_drift"] = dg.MetadataValue.json(drifts)
    return metadata


class DatasetIOManager(dg.ConfigurableIOManager):
    """Commits asset outputs as versioned Parquet datasets (staged, fenced, pointer swap)."""

    objects: ObjectStoreResource
    state: StateStoreResource

    def handle_output(self, context: dg.OutputContext, obj: object) -> None:
        dataset = context.asset_key.path[-1]
        mode = (context.definition_metadata or {}).get(COMMIT_MODE_METADATA, "replace")
        with self.state.writer(self.objects) as writer, as_dagster_failure():
            results = self._commit_all(context, writer, dataset, mode, obj)
        context.add_output_metadata(_metadata(results, writer.store.uri(f"{dataset}/")))

    @staticmethod
    def _commit_all(
        context: dg.OutputContext, writer: DatasetWriter, dataset: str, mode: str, obj: object
    ) -> dict[str, CommitResult]:
        """One partition: `write` / `commit_staged`. Several (a ranged run): the batched path,
        which begins, uploads (concurrently) and commits them in one transaction each, with
        the same guarantees per partition."""
        commit_mode: CommitMode = "append" if mode == "append" else "replace"
        commit_key = commit_key_for(context)
        partitions = _as_partitions(context, obj)
        staged: list[StagedPartition] = []
        tables: dict[str, PartitionData] = {}
        for key, data in sorted(partitions.items()):
            if isinstance(data, StagedPartition):  # the asset streamed it up already
                if (data.attempt.dataset, data.attempt.partition_key) != (dataset, key):
                    raise dg.DagsterInvariantViolationError(
                        f"staged {data.attempt.dataset}/{data.attempt.partition_key} was "
                        f"returned as {dataset}/{key}"
                    )
                staged.append(data)
            else:
                tables[key] = data
        if len(partitions) == 1 and tables:  # one partition: the plain protocol
            [(key, data)] = tables.items()
            result = writer.write(
                dataset,
                key,
                data,
                mode=commit_mode,
                run_id=context.run_id,
                step_key=context.step_key,
                retry_number=_retry_number(context),
                commit_key=commit_key,
            )
            return {key: result}
        if tables:
            staged += writer.stage_many(
                dataset,
                tables,
                mode=commit_mode,
                run_id=context.run_id,
                step_key=context.step_key,
                retry_number=_retry_number(context),
            )
        return writer.commit_staged_many(staged, mode=commit_mode, commit_key=commit_key)

    def load_input(self, context: dg.InputContext) -> pa.Table:
        dataset = context.asset_key.path[-1]
        with as_dagster_failure():
            # a version whose blocking quality rules failed is never read downstream, in this
            # run or any later one (the circuit breaker across runs)
            return self.state.reader(self.objects).read(
                dataset, _expected_keys(context), refuse_failed_checks=True
            )
