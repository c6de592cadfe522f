"""Raw chain datasets: blocks, transactions and logs of finalized block ranges.

The three are extracted together because they are verified together: a range commits only
when every block is present, each block's transactions match its transaction count and its
logs match its logs bloom. Each range is committed as its own version of each dataset.
"""


from collections.abc import Iterator

import dagster as dg

from trace_resources.failures import as_dagster_failure
from trace_assets.partitions import MAX_PARTITIONS_PER_RUN, block_ranges
from trace_resources.chain.ranges import parse_partition_key
from trace_resources.chain.schemas import RAW_DATASETS, RAW_SCHEMAS
from trace_resources.resources import ChainResource
from trace_resources.storage.commit import PartitionData
from trace_resources.storage.io_manager import COMMIT_MODE_METADATA

__all__ = ["raw_chain", "RAW_ASSET_KEYS"]

RAW_ASSET_KEYS = [dg.AssetKey(name) for name in RAW_DATASETS]

_DESCRIPTIONS = {
    "blocks": "One row per block of the chain: hashes, parent hash, timestamp, gas, proposer, "
    "transaction count and logs bloom. The backbone every other dataset joins to.",
    "transactions": "One row per transaction with its receipt outcome (gas used, success); "
    "values in wei kept exact as 32-byte big-endian and decimal string.",
    "logs": "One row per event log emitted by a transaction: emitting contract, topics and "
    "data. Decoded datasets such as ERC-20 transfers are derived from it.",
}


def _column_schema(dataset: str) -> dg.TableSchema:
    return dg.TableSchema(
        columns=[
            dg.TableColumn(
                name=f.name,
                type=str(f.type),
                description=(f.metadata or {}).get(b"doc", b"").decode(),
                constraints=dg.TableColumnConstraints(nullable=f.nullable),
            )
            for f in RAW_SCHEMAS[dataset]  # type: ignore[index]
        ]
    )


@dg.multi_asset(
    name="raw_chain",
    outs={
        name: dg.AssetOut(
            io_manager_key="dataset_io_manager",
            description=_DESCRIPTIONS[name],
            metadata={
                "dagster/column_schema": _column_schema(name),
                COMMIT_MODE_METADATA: "replace",
            },
            kinds={"parquet", "s3"},
        )
        for name in RAW_DATASETS
    },
    partitions_def=block_ranges,
    backfill_policy=dg.BackfillPolicy.multi_run(max_partitions_per_run=MAX_PARTITIONS_PER_RUN),
    retry_policy=dg.RetryPolicy(max_retries=2, delay=5, backoff=dg.Backoff.EXPONENTIAL),
    group_name="raw",
    can_subset=False,
)
def raw_chain(context: dg.AssetExecutionContext, chain: ChainResource) -> Iterator[dg.Output]:
    """Extract, verify and commit the raw datasets of every block range in the run."""
    with as_dagster_failure():
        ranges = [parse_partition_key(key) for key in context.partition_keys]
        client = chain.client()
        try:
            head = client.preflight(ranges, RAW_DATASETS)
            context.log.info(
                f"extracting {len(ranges)} range(s) {ranges[0].key}..{ranges[-1].key}; "
                f"finalized head {head.finalized}"
            )
            outputs: dict[str, dict[str, PartitionData]] = {name: {} for name in RAW_DATASETS}
            for block_range in ranges:
                data = client.extract_verified(block_range)
                for name in RAW_DATASETS:
                    outputs[name][block_range.key] = PartitionData(
                        data.tables[name], source=data.source
                    )
        finally:
            client.close()
    for name in RAW_DATASETS:
        yield dg.Output(
            outputs[name],
            output_name=name,
            metadata={
                "trace/ranges": len(ranges),
                "trace/first_block": ranges[0].start,
                "trace/last_block": ranges[-1].last,
            },
        )
