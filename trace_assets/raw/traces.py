"""The raw call-trace dataset `geth_calls`: every call frame of every transaction of a range.

It is extracted apart from blocks, transactions and logs (`raw_chain`), in its own step:
many providers serve no `debug_*` namespace, and such an endpoint must not hold back the
other raw datasets nor the datasets derived from them. On such an endpoint the step fails
with `MethodUnsupportedError`, which names the endpoint and is not retried; nothing is
committed, so the ranges stay visibly unmaterialised in the UI. Recording an empty version
instead would tell the datasets derived from it that no contract moved value or created a
contract in the range: a silent lie.

Each range is verified (every block present, one top-level frame per transaction of the
block, every block hash equal to the range's committed `blocks`, so traces never come from
another fork than the range) and committed as soon as it is, so a failure loses only the
range it happened in; the dataset's rules and schema check run at the end of the step, as
for the other raw datasets.
"""

from collections.abc import Iterator
from typing import Any

import dagster as dg

from trace_assets.checks import (
    EvaluatedRange,
    evaluate_range,
    raw_check_results,
    raw_check_specs,
)
from trace_assets.partitions import block_ranges
from trace_resources.chain.ranges import parse_partition_key
from trace_resources.chain.schemas import GETH_CALLS, RAW_SCHEMAS, TRACE_DESCRIPTIONS
from trace_resources.chain.traces import TRACER_OPTIONS, check_same_blocks, extract_geth_calls
from trace_resources.failures import as_dagster_failure
from trace_resources.registry import declarations
from trace_resources.resources import ChainResource
from trace_resources.storage.commit import PartitionData
from trace_resources.storage.io_manager import (
    COMMIT_MODE_METADATA,
    DatasetIOManager,
    versioned_output,
)
from trace_resources.storage.records import CommitResult

__all__ = ["geth_calls", "GETH_CALLS_KEY"]

GETH_CALLS_KEY = dg.AssetKey("geth_calls")
_DECL = declarations()["geth_calls"]


def _column_schema() -> dg.TableSchema:
    return dg.TableSchema(
        columns=[
            dg.TableColumn(
                name=f.name,
                type=str(f.type),
                description=(f.metadata or {}).get(b"doc", b"").decode(),
                constraints=dg.TableColumnConstraints(nullable=f.nullable),
            )
            for f in GETH_CALLS
        ]
    )


@dg.multi_asset(
    name="geth_calls",
    outs={
        "geth_calls": dg.AssetOut(
            io_manager_key="dataset_io_manager",
            description=TRACE_DESCRIPTIONS["geth_calls"],
            metadata={
                "dagster/column_schema": _column_schema(),
                COMMIT_MODE_METADATA: "replace",
                "trace/trace_options": dg.MetadataValue.json(TRACER_OPTIONS),
            },
            owners=[_DECL.owner],
            kinds={"parquet", "s3"},
        )
    },
    check_specs=raw_check_specs(_DECL),
    # checked against the range's committed blocks (same fork), so they come first
    deps=[dg.AssetKey("blocks")],
    partitions_def=block_ranges,
    backfill_policy=dg.BackfillPolicy.single_run(),
    retry_policy=dg.RetryPolicy(max_retries=2, delay=5, backoff=dg.Backoff.EXPONENTIAL),
    group_name="raw",
)
def geth_calls(
    context: dg.AssetExecutionContext,
    chain: ChainResource,
    dataset_io_manager: dg.ResourceParam[DatasetIOManager],
) -> Iterator[Any]:
    """Trace, verify and commit the call frames of every block range of the run."""
    keys = list(context.partition_keys)
    committed: dict[str, CommitResult] = {}
    evaluated: dict[str, EvaluatedRange] = {}
    with as_dagster_failure(), dataset_io_manager.staging(context) as staging:
        before = staging.committed_before(["geth_calls"], keys)
        committed.update({k: r for (_, k), r in before.items()})
        ranges = [parse_partition_key(k) for k in keys if k not in committed]
        reader = dataset_io_manager.state.reader(dataset_io_manager.objects)
        client = chain.client()
        try:
            if ranges:
                client.preflight(ranges, ())
            for block_range in ranges:
                traced = extract_geth_calls(client.rpc, chain.chain_id, block_range)
                blocks = (
                    reader.read("blocks", [block_range.key], schema=RAW_SCHEMAS["blocks"])
                    if reader.resolve("blocks", [block_range.key])
                    else None
                )
                check_same_blocks(traced, blocks, chain.rpc_url)
                [staged] = staging.stage(
                    "geth_calls",
                    {block_range.key: PartitionData(traced.table, source=traced.source)},
                )
                result = staging.commit([staged])[block_range.key]
                committed[block_range.key] = result
                if not result.already_committed:
                    evaluated[block_range.key] = evaluate_range(
                        _DECL, block_range.key, result.version.version, traced.table
                    )
                context.log.info(
                    f"geth_calls {block_range.key} committed: v{result.version.version}, "
                    f"{traced.table.num_rows:,} call frames"
                )
        finally:
            client.close()
    yield versioned_output(
        committed, output_name="geth_calls", metadata={"trace/ranges": len(keys)}
    )
    yield from raw_check_results(
        _DECL,
        dataset_io_manager.state,
        dataset_io_manager.objects,
        {c.name for c in raw_check_specs(_DECL)},
        keys,
        context.run.run_id,
        evaluated,
    )
