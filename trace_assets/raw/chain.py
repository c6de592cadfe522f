"""Raw chain datasets: blocks, transactions and logs of finalized block ranges.

The three are extracted together because they are verified together: a range commits only
when every block is present, each block's transactions match its transaction count and its
logs match its logs bloom. Each range is committed as its own version of each dataset, the
three in one transaction, as soon as it is verified: a run over many ranges keeps the ranges
it committed if a later one fails, and a retry resumes from the first uncommitted range.

Their quality rules and schema checks are evaluated in the same step (no process or step of
their own): each range's row rules on its tables as committed, while the next range is
extracted; at the end, continuity across the ranges and their neighbours, and the results
recorded. A range committed by an earlier try, or again since, is read back.

`build_raw_chain(raw)` makes the multi-asset of one chain (`trace_resources.chains`): the
primary's is `raw_chain` (asset keys `blocks`, `transactions`, `logs`, partitions
`block_ranges`, resource `chain`, as ever); another chain's is `raw_chain__<chain>` (asset keys
[<chain>, blocks] ..., datasets `<chain>.blocks` ..., partitions `block_ranges__<chain>`,
resource `chain__<chain>`). For now only the primary's has quality checks and the head tier's
agreement (they read the primary's datasets by name).
"""

import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import dagster as dg

from trace_assets.checks import (
    EvaluatedRange,
    evaluate_range,
    raw_check_results,
    raw_check_specs,
)
from trace_assets.head.agreement import HeadAgreement, compare_with_head
from trace_assets.partitions import ChainAssets, chain_partitions
from trace_assets.raw.boundary_repair import BoundaryRepair
from trace_resources.chain.extract import ChainClient, RangeData
from trace_resources.chain.ranges import BlockRange, parse_partition_key
from trace_resources.chain.schemas import RAW_DATASETS, RAW_DESCRIPTIONS, RAW_SCHEMAS, RawDataset
from trace_resources.failures import as_dagster_failure
from trace_resources.pushed_metrics import push_ingest_metrics
from trace_resources.registry import declarations
from trace_resources.resources import ChainResource
from trace_resources.settings import get_settings
from trace_resources.storage.commit import DatasetReader, PartitionData, StagedPartition
from trace_resources.storage.io_manager import (
    COMMIT_MODE_METADATA,
    DatasetIOManager,
    Staging,
    commit_metadata,
    data_version_tags,
    versioned_output,
)
from trace_resources.storage.records import CommitHook, CommitResult
from trace_resources.telemetry import Tracing

__all__ = ["raw_chain", "RAW_ASSET_KEYS", "RawChain", "build_raw_chain", "chain_partitions"]

RAW_ASSET_KEYS = [dg.AssetKey(name) for name in RAW_DATASETS]


@dataclass(frozen=True)
class RawChain(ChainAssets):
    """What one chain's raw multi-asset is called and writes (`ChainAssets`), and its resource."""

    @property
    def resource_key(self) -> str:
        return "chain" if self.chain is None else f"chain__{self.chain}"

    @property
    def asset_name(self) -> str:
        return "raw_chain" if self.chain is None else f"raw_chain__{self.chain}"


PRIMARY = RawChain()


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
    evaluated: dict[str, dict[str, EvaluatedRange]] | None = None,
    repair: BoundaryRepair | None = None,
    raw: RawChain = PRIMARY,
    within: CommitHook | None = None,
) -> dict[str, CommitResult]:
    """Stage the three datasets of one verified range (of `raw`'s chain), each under its own
    new attempt, and commit them in one transaction.

    The three upload at once (Parquet encoding and the S3 API calls release the GIL); if any
    fails, the error ends the staging block, which fails the others' attempts too: the range
    commits whole or not at all. If the head follower appended to the range, what it appended
    is compared with the sealed data first (`agreements`). Once committed, the datasets' row
    rules are evaluated on the tables just committed (`evaluated`, by dataset and range), so
    the checks at the end of the step need not read the range back.
    """
    if reader is not None and agreements is not None:
        agreement = compare_with_head(reader, data)
        if agreement is not None:
            agreements.append(agreement)

    def stage(name: RawDataset) -> StagedPartition:
        partition = PartitionData(data.tables[name], source=data.source)
        [staged] = staging.stage(raw.dataset(name), {data.block_range.key: partition})
        return staged

    with ThreadPoolExecutor(len(RAW_DATASETS), thread_name_prefix="stage-dataset") as pool:

        def stage_and_commit() -> list[CommitResult]:
            futures = {name: pool.submit(stage, name) for name in RAW_DATASETS}
            return staging.commit_together(
                [futures[name].result() for name in RAW_DATASETS], within
            )

        if repair is None:
            committed = stage_and_commit()
        else:  # a disagreement with the previous committed range: the wrong one is replaced
            committed = repair.commit(
                stage_and_commit,
                data,
                lambda previous, hook: _stage_range(staging, previous, raw=raw, within=hook),
            )
        results = dict(zip(RAW_DATASETS, committed, strict=True))
        if evaluated is not None:
            key = data.block_range.key

            def evaluate(name: RawDataset) -> EvaluatedRange | None:
                if results[name].already_committed:  # an earlier try's commit: not these tables
                    return None
                version = results[name].version.version
                try:
                    return evaluate_range(RAW_DECLARATIONS[name], key, version, data.tables[name])
                except Exception:  # the range is committed; the checks read it back instead
                    return None

            for name, done in zip(RAW_DATASETS, pool.map(evaluate, RAW_DATASETS), strict=True):
                if done is not None:
                    evaluated[name][key] = done
    return results


RAW_DECLARATIONS = {name: declarations()[name] for name in RAW_DATASETS}


def build_raw_chain(raw: RawChain = PRIMARY) -> dg.AssetsDefinition:
    """The raw multi-asset of one chain (see the module's docstring)."""
    primary = raw.chain is None

    @dg.multi_asset(
        name=raw.asset_name,
        outs={
            name: dg.AssetOut(
                key=raw.asset_key(name),
                io_manager_key="dataset_io_manager",
                description=RAW_DESCRIPTIONS[name] + ("" if primary else f" (chain {raw.chain})"),
                metadata={
                    "dagster/column_schema": _column_schema(name),
                    COMMIT_MODE_METADATA: "replace",
                },
                kinds={"parquet", "s3"},
                owners=[RAW_DECLARATIONS[name].owner],
                # a run of the checks alone yields none of them (`can_subset`)
                is_required=False,
            )
            for name in RAW_DATASETS
        },
        check_specs=[spec for decl in RAW_DECLARATIONS.values() for spec in raw_check_specs(decl)]
        if primary
        else None,
        partitions_def=raw.partitions,
        backfill_policy=dg.BackfillPolicy.single_run(),
        retry_policy=dg.RetryPolicy(max_retries=2, delay=5, backoff=dg.Backoff.EXPONENTIAL),
        group_name="raw" if primary else f"raw_{raw.chain}",
        # the checks alone can run (over what is committed); the datasets always come together
        can_subset=True,
        required_resource_keys={raw.resource_key, "dataset_io_manager"},
    )
    def _raw_chain(
        context: dg.AssetExecutionContext,
    ) -> Iterator[dg.Output[Any] | dg.AssetMaterialization | dg.AssetCheckResult]:
        """Extract, verify and commit the raw datasets of every block range in the run, range
        by range; then evaluate their checks.

        Each verified range is uploaded and committed while the next range is extracted, so
        memory stays flat however many ranges a backfill run covers, and a failure loses only
        the range it happened in. Selecting one of the three datasets materialises all three
        (they are verified together); the others are reported as materialised too.
        """
        chain: ChainResource = getattr(context.resources, raw.resource_key)
        io: DatasetIOManager = context.resources.dataset_io_manager
        yield from _raw_chain_step(context, raw, chain, io)

    return _raw_chain


def _raw_chain_step(
    context: dg.AssetExecutionContext,
    raw: RawChain,
    chain: ChainResource,
    dataset_io_manager: DatasetIOManager,
) -> Iterator[dg.Output[Any] | dg.AssetMaterialization | dg.AssetCheckResult]:
    selected = {key.path[-1] for key in context.selected_asset_keys}
    keys = _run_keys(context)
    evaluated: dict[str, dict[str, EvaluatedRange]] = {name: {} for name in RAW_DATASETS}
    if selected:
        committed: dict[str, dict[str, CommitResult]] = {name: {} for name in RAW_DATASETS}
        agreements: list[HeadAgreement] = []
        settings = get_settings()
        tracing = Tracing.configured("trace-ingest", settings.otlp_endpoint)
        started, succeeded = time.perf_counter(), False
        try:
            attributes = {"dagster.run_id": context.run.run_id, "partitions": keys}
            with tracing.span("ingest.run", attributes) as span:
                _ingest(context, chain, dataset_io_manager, committed, agreements, evaluated, raw)
                span.set_attribute("ranges", len(committed[RAW_DATASETS[0]]))
            succeeded = True
        except Exception:
            # what was committed stays committed: say so, in the log and in the asset graph
            done = sorted(committed[RAW_DATASETS[0]])
            if done:
                left = [k for k in keys or [] if k not in committed[RAW_DATASETS[0]]]
                context.log.error(
                    f"{len(done)} of {len(keys or [])} range(s) were committed before the "
                    f"failure ({done[0]}..{done[-1]}); a retry of this step resumes at "
                    f"{left[0] if left else 'the checks'}"
                )
            yield from _materialisations(dataset_io_manager, committed, RAW_DATASETS, raw)
            raise
        finally:
            tracing.shutdown()
            push_ingest_metrics(
                settings.metrics_pushgateway,
                chain.chain_id,
                ranges=len(committed[RAW_DATASETS[0]]),
                rows=sum(r.version.manifest.rows for c in committed.values() for r in c.values()),
                seconds=time.perf_counter() - started,
                succeeded=succeeded,
            )
        disagreements = [a for a in agreements if not a.ok]
        for agreement in disagreements:
            context.log.error(agreement.summary())
        ranges = [parse_partition_key(k) for k in keys or []]
        for name in RAW_DATASETS:
            if name not in selected:
                continue
            # the data version is the committed content's: an unchanged range (identical
            # data, kept as it was) does not re-trigger automation downstream
            yield versioned_output(
                committed[name],
                output_name=name,
                metadata={
                    "trace/ranges": len(ranges),
                    "trace/first_block": ranges[0].start,
                    "trace/last_block": ranges[-1].last,
                    "trace/head_appended_blocks": sum(a.appended_blocks for a in agreements),
                    # a sealed range that differs from what the head follower appended: an
                    # error in the run's log, and here (the sealed version replaces it)
                    "trace/head_agrees": not disagreements,
                    "trace/head_disagreements": dg.MetadataValue.json(
                        {a.partition_key: a.as_metadata() for a in disagreements}
                    ),
                },
            )
        unselected = [name for name in RAW_DATASETS if name not in selected]
        if unselected:
            context.log.info(
                f"{', '.join(unselected)} committed with {', '.join(sorted(selected))}: the "
                "three raw datasets of a range are extracted, verified and committed together"
            )
            yield from _materialisations(dataset_io_manager, committed, unselected, raw)
    checks = context.selected_asset_check_keys
    for name, decl in RAW_DECLARATIONS.items():
        names = {c.name for c in checks if c.asset_key.path[-1] == name}
        if names:
            yield from raw_check_results(
                decl,
                dataset_io_manager.state,
                dataset_io_manager.objects,
                names,
                keys,
                context.run.run_id,
                evaluated[name],
            )


def _run_keys(context: dg.AssetExecutionContext) -> list[str] | None:
    """The ranges of the run; None for a run of the checks that names no range (all)."""
    try:
        return list(context.partition_keys)
    except Exception:  # an unpartitioned run: the checks alone, over every committed range
        return None


def _materialisations(
    io: DatasetIOManager,
    committed: dict[str, dict[str, CommitResult]],
    names: list[str],
    raw: RawChain = PRIMARY,
) -> Iterator[dg.AssetMaterialization]:
    store = io.objects.datasets()
    for name in names:
        for key, result in sorted(committed[name].items()):
            yield dg.AssetMaterialization(
                asset_key=raw.asset_key(name),
                partition=key,
                metadata=commit_metadata(result, store),
                tags=data_version_tags(result.version),
            )


def _ingest(
    context: dg.AssetExecutionContext,
    chain: ChainResource,
    io: DatasetIOManager,
    committed: dict[str, dict[str, CommitResult]],
    agreements: list[HeadAgreement],
    evaluated: dict[str, dict[str, EvaluatedRange]] | None = None,
    raw: RawChain = PRIMARY,
) -> None:
    """Commit every range of the run into `committed` (by dataset, by range), in order:
    those an earlier try of this step committed first, then the others as they verify."""
    keys = list(context.partition_keys)
    with as_dagster_failure(), io.staging(context) as staging:
        datasets = {name: raw.dataset(name) for name in RAW_DATASETS}
        before = staging.committed_before(list(datasets.values()), keys)
        resumed = [k for k in keys if all((datasets[n], k) in before for n in RAW_DATASETS)]
        for key in resumed:
            for name in RAW_DATASETS:
                committed[name][key] = before[(datasets[name], key)]
        ranges = [parse_partition_key(k) for k in keys if k not in set(resumed)]
        if resumed:
            context.log.info(
                f"{len(resumed)} of {len(keys)} range(s) were committed by an earlier try of "
                f"this step; resuming with the {len(ranges)} other(s)"
            )
        if not ranges:
            return
        # the head tier and the checks are the primary chain's (for now)
        primary = raw.chain is None
        reader = io.state.reader(io.objects) if primary else None
        client = chain.client()
        repair = BoundaryRepair(client, io.state, raw.dataset("blocks"))
        started = time.monotonic()

        def log_quarantined() -> None:
            for record in repair.drain():
                context.log.warning(record.summary())

        total_blocks = sum(r.size for r in ranges)

        def progress(index: int, results: dict[str, CommitResult]) -> None:
            key = results[RAW_DATASETS[0]].version.partition_key
            for name, result in results.items():
                committed[name][key] = result
            done = ranges[: index + 1]
            seconds = time.monotonic() - started
            blocks = sum(r.size for r in done)
            parts = ", ".join(
                f"{name} v{r.version.version} {r.version.manifest.rows:,} rows"
                for name, r in results.items()
            )
            log_quarantined()
            context.log.info(
                f"range {index + 1}/{len(ranges)} {key} committed ({parts}); "
                f"{blocks:,}/{total_blocks:,} blocks in {seconds:.1f} s "
                f"({blocks / max(seconds, 1e-6):,.0f} blocks/s)"
            )

        try:
            head = client.preflight(ranges, RAW_DATASETS)
            context.log.info(
                f"extracting {len(ranges)} range(s) {ranges[0].key}..{ranges[-1].key}; "
                f"finalized head {head.finalized}"
            )
            _extract_and_stage(
                client,
                staging,
                ranges,
                chain.extract_concurrency,
                progress,
                reader,
                agreements if primary else None,
                evaluated if primary else None,
                repair,
                raw,
            )
        finally:
            log_quarantined()
            client.close()


def _extract_and_stage(
    client: ChainClient,
    staging: Staging,
    ranges: list[BlockRange],
    concurrency: int,
    on_committed: Callable[[int, dict[str, CommitResult]], None],
    reader: DatasetReader | None = None,
    agreements: list[HeadAgreement] | None = None,
    evaluated: dict[str, dict[str, EvaluatedRange]] | None = None,
    repair: BoundaryRepair | None = None,
    raw: RawChain = PRIMARY,
) -> None:
    """Extract ranges while verified ones upload and commit, in range order.

    The ranges are spread over the chain's healthy endpoints in turn (`Endpoints.assign`), each
    range's data from one endpoint. At most `concurrency` ranges are being collected from each
    endpoint at any time (`concurrency` times the endpoints in all), one more is verified
    meanwhile (its extraction thread waits for a collection slot only to collect,
    so the node is not idle while a range is verified), and one verified range uploads and
    commits: memory does not grow with the number of ranges in the run. `on_committed(index,
    results)` is called in this thread for every committed range, in order, also for those
    that committed before a failure ends the run.
    """
    # each endpoint collects `concurrency` ranges at once (its slots, in the client)
    concurrency *= len(client.endpoints.healthy())
    collect_slots = threading.BoundedSemaphore(concurrency)
    extracting: deque[Future[RangeData]] = deque()
    uploads: list[Future[dict[str, CommitResult]]] = []
    reported = 0

    def stage(data: RangeData) -> dict[str, CommitResult]:
        return _stage_range(staging, data, reader, agreements, evaluated, repair, raw)

    def report(wait: bool) -> None:
        nonlocal reported
        while reported < len(uploads):
            future = uploads[reported]
            if not wait and not future.done():
                return
            on_committed(reported, future.result())
            reported += 1

    try:
        with (
            ThreadPoolExecutor(concurrency + 1, thread_name_prefix="extract") as extractor,
            ThreadPoolExecutor(1, thread_name_prefix="stage") as uploader,
        ):
            try:
                for block_range in ranges:
                    extracting.append(
                        extractor.submit(
                            client.extract_verified,
                            block_range,
                            collect_slots,
                            client.endpoints.assign(),
                        )
                    )
                    while len(extracting) > concurrency:
                        data = extracting.popleft().result()
                        # one range uploads while the next is extracted: wait for the one before
                        report(wait=False)
                        if len(uploads) - reported > 1:
                            uploads[reported].result()
                            report(wait=False)
                        uploads.append(uploader.submit(stage, data))
                while extracting:
                    data = extracting.popleft().result()
                    uploads.append(uploader.submit(stage, data))
                report(wait=True)
            except BaseException:
                # verified ranges still upload and commit (at most two are queued): the work
                # done is kept, and a retry resumes after it
                for future in extracting:
                    future.cancel()
                raise
    except BaseException:
        # the uploads finished when the pools closed: report every range that committed, in
        # order, up to the first that did not
        for future in uploads[reported:]:
            if future.cancelled() or future.exception() is not None:
                break
            on_committed(reported, future.result())
            reported += 1
        raise


raw_chain = build_raw_chain(PRIMARY)
