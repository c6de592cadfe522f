"""Raw chain datasets: blocks, transactions and logs of finalized block ranges.

The three are extracted together because they are verified together: a range commits only
when every block is present, each block's transactions match its transaction count and its
logs match its logs bloom. Each range is committed as its own version of each dataset.
"""

import threading
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor

import dagster as dg

from trace_assets.head.agreement import HeadAgreement, compare_with_head
from trace_assets.partitions import block_ranges
from trace_resources.chain.extract import ChainClient, RangeData
from trace_resources.chain.ranges import BlockRange, parse_partition_key
from trace_resources.chain.schemas import RAW_DATASETS, RAW_DESCRIPTIONS, RAW_SCHEMAS, RawDataset
from trace_resources.failures import as_dagster_failure
from trace_resources.registry import declarations
from trace_resources.resources import ChainResource
from trace_resources.storage.commit import DatasetReader, PartitionData, StagedPartition
from trace_resources.storage.io_manager import COMMIT_MODE_METADATA, DatasetIOManager, Staging

__all__ = ["raw_chain", "RAW_ASSET_KEYS"]

RAW_ASSET_KEYS = [dg.AssetKey(name) for name in RAW_DATASETS]


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


def _stage_range(
    staging: Staging,
    data: RangeData,
    reader: DatasetReader | None = None,
    agreements: list[HeadAgreement] | None = None,
) -> dict[str, StagedPartition]:
    """Stage the three datasets of one verified range, each under its own new attempt.

    The three upload at once (Parquet encoding and the S3 API calls release the GIL); if any
    fails, the error ends the staging block, which fails the others' attempts too: the range
    commits whole or not at all. If the head follower appended to the range, what it appended
    is compared with the sealed data first (`agreements`).
    """
    if reader is not None and agreements is not None:
        agreement = compare_with_head(reader, data)
        if agreement is not None:
            agreements.append(agreement)

    def stage(name: RawDataset) -> StagedPartition:
        partition = PartitionData(data.tables[name], source=data.source)
        [staged] = staging.stage(name, {data.block_range.key: partition})
        return staged

    with ThreadPoolExecutor(len(RAW_DATASETS), thread_name_prefix="stage-dataset") as pool:
        futures = {name: pool.submit(stage, name) for name in RAW_DATASETS}
    return {name: future.result() for name, future in futures.items()}


@dg.multi_asset(
    name="raw_chain",
    outs={
        name: dg.AssetOut(
            io_manager_key="dataset_io_manager",
            description=RAW_DESCRIPTIONS[name],
            metadata={
                "dagster/column_schema": _column_schema(name),
                COMMIT_MODE_METADATA: "replace",
            },
            kinds={"parquet", "s3"},
            owners=[declarations()[name].owner],
        )
        for name in RAW_DATASETS
    },
    partitions_def=block_ranges,
    backfill_policy=dg.BackfillPolicy.single_run(),
    retry_policy=dg.RetryPolicy(max_retries=2, delay=5, backoff=dg.Backoff.EXPONENTIAL),
    group_name="raw",
    can_subset=False,
)
def raw_chain(
    context: dg.AssetExecutionContext,
    chain: ChainResource,
    dataset_io_manager: dg.ResourceParam[DatasetIOManager],
) -> Iterator[dg.Output]:
    """Extract, verify and stage the raw datasets of every block range in the run.

    Each verified range is uploaded under its own attempts' prefixes while the next range is
    extracted, so memory stays flat however many ranges a backfill run covers; the IO manager
    commits every staged partition when the outputs are handed over (and fails them all if
    the run fails before).
    """
    staged: dict[str, dict[str, StagedPartition]] = {name: {} for name in RAW_DATASETS}
    agreements: list[HeadAgreement] = []
    with as_dagster_failure(), dataset_io_manager.staging(context) as staging:
        reader = dataset_io_manager.state.reader(dataset_io_manager.objects)
        ranges = [parse_partition_key(key) for key in context.partition_keys]
        client = chain.client()
        try:
            head = client.preflight(ranges, RAW_DATASETS)
            context.log.info(
                f"extracting {len(ranges)} range(s) {ranges[0].key}..{ranges[-1].key}; "
                f"finalized head {head.finalized}"
            )
            _extract_and_stage(
                client, staging, ranges, chain.extract_concurrency, staged, reader, agreements
            )
        finally:
            client.close()
    disagreements = [a for a in agreements if not a.ok]
    for agreement in disagreements:
        context.log.error(agreement.summary())
    for name in RAW_DATASETS:
        yield dg.Output(
            staged[name],
            output_name=name,
            metadata={
                "trace/ranges": len(ranges),
                "trace/first_block": ranges[0].start,
                "trace/last_block": ranges[-1].last,
                "trace/head_appended_blocks": sum(a.appended_blocks for a in agreements),
                # a sealed range that differs from what the head follower appended: an error in
                # the run's log, and here (the sealed version replaces the appended one)
                "trace/head_agrees": not disagreements,
                "trace/head_disagreements": dg.MetadataValue.json(
                    {a.partition_key: a.as_metadata() for a in disagreements}
                ),
            },
        )


def _extract_and_stage(
    client: ChainClient,
    staging: Staging,
    ranges: list[BlockRange],
    concurrency: int,
    staged: dict[str, dict[str, StagedPartition]],
    reader: DatasetReader | None = None,
    agreements: list[HeadAgreement] | None = None,
) -> None:
    """Extract ranges while verified ones upload, in range order.

    At most `concurrency` ranges are being collected from the node at any time, one more is
    verified meanwhile (its extraction thread waits for a collection slot only to collect,
    so the node is not idle while a range is verified), and one verified range uploads:
    memory does not grow with the number of ranges in the run.
    """
    collect_slots = threading.BoundedSemaphore(concurrency)
    extracting: deque[Future[RangeData]] = deque()
    uploading: deque[Future[dict[str, StagedPartition]]] = deque()
    with (
        ThreadPoolExecutor(concurrency + 1, thread_name_prefix="extract") as extractor,
        ThreadPoolExecutor(1, thread_name_prefix="stage") as uploader,
    ):
        try:
            for block_range in ranges:
                extracting.append(
                    extractor.submit(client.extract_verified, block_range, collect_slots)
                )
                while len(extracting) > concurrency:
                    data = extracting.popleft().result()
                    uploading.append(
                        uploader.submit(_stage_range, staging, data, reader, agreements)
                    )
                    while len(uploading) > 1:
                        _collect(uploading.popleft(), staged)
            while extracting:
                data = extracting.popleft().result()
                uploading.append(uploader.submit(_stage_range, staging, data, reader, agreements))
            while uploading:
                _collect(uploading.popleft(), staged)
        except BaseException:
            # the upload under way finishes before the pools close; the staging block then
            # fails every attempt it began
            for future in extracting:
                future.cancel()
            for upload in uploading:
                upload.cancel()
            raise


def _collect(
    future: Future[dict[str, StagedPartition]], staged: dict[str, dict[str, StagedPartition]]
) -> None:
    # the IO manager's writer keeps every staged attempt's lease alive until it commits,
    # however long the run: nothing to extend here
    for name, partition in future.result().items():
        staged[name][partition.attempt.partition_key] = partition
