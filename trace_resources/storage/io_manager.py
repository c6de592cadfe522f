"""The IO manager: config fields plus delegation to the commit protocol.

An asset returns a `pyarrow.Table` (one partition or an unpartitioned dataset), a
`PartitionData`, or a mapping `{partition_key: PartitionData}` when one run materialises many
partitions (a ranged backfill). Assets that handle many large partitions stream each one to
the object store as they go and return `StagedPartition`s instead, so a run's memory does not
grow with its number of partitions; the IO manager then only verifies and commits. Each
partition is committed as its own version.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import dagster as dg
import pyarrow as pa

from trace_resources.failures import as_dagster_failure
from trace_resources.resources import ObjectStoreResource, StateStoreResource
from trace_resources.storage.commit import DatasetWriter, PartitionData, StagedPartition
from trace_resources.storage.paths import UNPARTITIONED
from trace_resources.storage.versions import CommitResult

__all__ = ["DatasetIOManager", "COMMIT_MODE_METADATA"]

COMMIT_MODE_METADATA = "trace/commit_mode"


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
        writer = self.state.writer(self.objects)
        with as_dagster_failure():
            results = self._commit_all(context, writer, dataset, mode, obj)
        context.add_output_metadata(_metadata(results, writer.store.uri(f"{dataset}/")))

    @staticmethod
    def _commit_all(
        context: dg.OutputContext, writer: DatasetWriter, dataset: str, mode: str, obj: object
    ) -> dict[str, CommitResult]:
        results = {}
        for key, data in sorted(_as_partitions(context, obj).items()):
            if isinstance(data, StagedPartition):  # the asset streamed it up already
                if (data.attempt.dataset, data.attempt.partition_key) != (dataset, key):
                    raise dg.DagsterInvariantViolationError(
                        f"staged {data.attempt.dataset}/{data.attempt.partition_key} was "
                        f"returned as {dataset}/{key}"
                    )
                results[key] = writer.commit_staged(data, mode=mode)  # type: ignore[arg-type]
            else:
                results[key] = writer.write(
                    dataset,
                    key,
                    data,
                    mode=mode,  # type: ignore[arg-type]
                    run_id=context.run_id,
                    step_key=context.step_key,
                    retry_number=_retry_number(context),
                )
        return results

    def load_input(self, context: dg.InputContext) -> pa.Table:
        dataset = context.asset_key.path[-1]
        with as_dagster_failure():
            return self.state.reader(self.objects).read(dataset, _expected_keys(context))
