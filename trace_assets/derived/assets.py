"""Derived assets, built from the declarations in `trace_assets/datasets/*.yaml`.

Each declaration gives the asset its description, `dagster/column_schema`,
`dagster/column_lineage`, commit mode and asset checks (one per quality rule, plus
`schema_matches_declaration`). The code here only says how rows are computed (`transforms`).

Partitioned datasets read the committed upstream ranges of the run (any number at once, one
run per backfill), transform them a chunk of consecutive ranges at a time (`derive_pipelined`:
each chunk's rules and staging beside the next chunk's transform), cut the result by range,
evaluate the quality rules of every range and commit only when no blocking rule tripped (the
circuit breaker; what was staged is then failed at once).

Every chain of TRACE_CHAINS derives the same datasets from its own raw ones (`DerivedChain`):
the primary's are `DERIVED_ASSETS` (asset keys `erc20_transfers` ..., partitions
`block_ranges`, as ever); another chain's (`build_chain_derived`) are [<chain>, <dataset>]
over `block_ranges__<chain>`, read [<chain>, transactions] ..., and are committed as
`<chain>.<dataset>`, with the same transforms, commit modes, gate and automation. Their blocking
rules still stop a commit; the Dagster asset checks, and the datasets derived from call traces
(`TRACE_DERIVED_ASSETS`), are the primary's.
"""

import contextlib
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import dagster as dg
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from dagster_shared.utils.warnings import BetaWarning

from trace_assets.automation import on_new_data
from trace_assets.derived import transforms
from trace_assets.partitions import ChainAssets
from trace_assets.quality import (
    QualityGateError,
    RuleOutcome,
    check_results,
    evaluate_rules,
    gate,
    merge_outcomes,
    rule_check_specs,
)
from trace_resources.chain.ranges import parse_partition_key
from trace_resources.chain.schemas import TRACE_DATASETS
from trace_resources.chains import SECONDARY_DERIVED_DATASETS
from trace_resources.failures import as_dagster_failure
from trace_resources.registry import DatasetDeclaration, arrow_schema, declarations
from trace_resources.resources import ObjectStoreResource, StateStoreResource
from trace_resources.storage.commit import DatasetReader, PartitionData, StagedPartition
from trace_resources.storage.io_manager import (
    COMMIT_MODE_METADATA,
    DatasetIOManager,
    versioned_output,
)
from trace_resources.storage.paths import UNPARTITIONED

__all__ = [
    "DERIVED_ASSETS",
    "TRACE_DERIVED_ASSETS",
    "DerivedChain",
    "build_chain_derived",
    "needs_traces",
    "PARTITIONED_TRANSFORMS",
    "build_derived_asset",
    "column_lineage",
    "column_schema",
    "dataset_metadata",
    "holders_update",
    "rollup_update",
    "ROLLUP_UPDATES",
    "SCHEMA_CHECK",
    "SCHEMA_CHECK_DESCRIPTION",
]

SCHEMA_CHECK = "schema_matches_declaration"
SCHEMA_CHECK_DESCRIPTION = (
    "The committed schema equals the declaration; shows every registered schema version and "
    "its drift (added, removed, retyped columns)"
)

# dataset -> transform over its upstream tables (passed by dataset name)
PARTITIONED_TRANSFORMS: dict[str, Callable[..., pa.Table]] = {
    "erc20_transfers": transforms.erc20_transfers,
    "native_transfers": transforms.native_transfers,
    "transaction_fees": transforms.transaction_fees,
    "contracts": transforms.contracts,
    "traced_native_transfers": transforms.traced_native_transfers,
    "traced_contracts": transforms.traced_contracts,
}


@dataclass(frozen=True)
class DerivedChain(ChainAssets):
    """What one chain's derived assets are called and read (`ChainAssets`), and their group."""

    @property
    def group(self) -> str:
        return "derived" if self.chain is None else f"derived_{self.chain}"

    def describe(self, description: str) -> str:
        return description if self.chain is None else f"{description} (chain {self.chain})"


PRIMARY = DerivedChain()


def column_schema(decl: DatasetDeclaration) -> dg.TableSchema:
    return dg.TableSchema(
        columns=[
            dg.TableColumn(
                name=c.name,
                type=c.type,
                description=c.doc,
                constraints=dg.TableColumnConstraints(nullable=c.nullable),
            )
            for c in decl.columns
        ]
    )


def column_lineage(
    decl: DatasetDeclaration, chain: DerivedChain = PRIMARY
) -> dg.TableColumnLineage:
    deps: dict[str, list[dg.TableColumnDep]] = {}
    for column in decl.column_names:
        deps[column] = [
            dg.TableColumnDep(
                asset_key=chain.asset_key(ref.split(".")[0]), column_name=ref.split(".")[1]
            )
            for ref in decl.column_deps(column)
        ]
    return dg.TableColumnLineage(deps_by_column=deps)


def dataset_metadata(decl: DatasetDeclaration, chain: DerivedChain = PRIMARY) -> dict[str, Any]:
    metadata: dict[str, Any] = {
        "dagster/column_schema": column_schema(decl),
        COMMIT_MODE_METADATA: decl.commit_mode,
        "trace/declaration": dg.MetadataValue.path(decl.source_file),
        "trace/quality_rules": dg.MetadataValue.json(
            [r.model_dump(mode="json") for r in decl.quality]
        ),
    }
    if decl.kind == "derived":
        metadata["dagster/column_lineage"] = column_lineage(decl, chain)
    if chain.chain is not None:
        metadata["trace/chain"] = chain.chain
    return metadata


def _quality_failure(exc: QualityGateError, outcomes: list[Any]) -> dg.Failure:
    tripped = [o for o in outcomes if o.blocking and not o.passed]
    return dg.Failure(
        description=f"{type(exc).__name__}: {exc}",
        metadata={
            "error": type(exc).__name__,
            "failed_rules": dg.MetadataValue.json(
                [
                    {
                        "rule": o.rule,
                        "failing_rows": o.failing,
                        "rows": o.rows,
                        "error_rate": o.error_rate,
                        "threshold": o.threshold,
                        "examples": o.examples,
                        "failing_by_partition": {k: v for k, v in o.by_partition.items() if v},
                    }
                    for o in tripped
                ]
            ),
        },
        allow_retries=False,  # the same data fails the same way
    )


def _checked(
    decl: DatasetDeclaration, chain: DerivedChain, outcomes: list[RuleOutcome]
) -> Iterator[dg.AssetCheckResult]:
    """The primary's check results, then its gate; another chain's gate alone (it has no
    asset checks to report the results on): raise if a blocking rule tripped."""
    if chain.chain is None:
        yield from check_results(decl.name, outcomes)
    try:
        gate(decl.name, outcomes)
    except QualityGateError as exc:
        raise _quality_failure(exc, outcomes) from exc


def _gated(
    decl: DatasetDeclaration, tables: dict[str | None, pa.Table]
) -> Iterator[dg.AssetCheckResult]:
    """Evaluate every rule over the tables, yield the check results, then raise if a blocking
    rule tripped."""
    yield from _checked(decl, PRIMARY, evaluate_rules(decl, tables))


# A multi-range run transforms its ranges in up to PIPELINE_CHUNKS chunks, so that while the
# transform (Python, holding the GIL) works on one chunk, the rules (DuckDB) and the staging
# (pyarrow's Parquet writers) of the chunk before run on another core. A chunk takes about
# PIPELINE_MIN_ROWS input rows or more: below that, a chunk's own costs (a staging transaction, the
# rules' queries) outweigh what the overlap saves.
PIPELINE_CHUNKS = 8
PIPELINE_MIN_ROWS = 200_000


def _block_slicer(upstream: Mapping[str, pa.Table]) -> Callable[[int, int], dict[str, pa.Table]]:
    """Slices of every upstream table by block numbers (first, last inclusive). LookupError
    when a table is not sorted by `block_number`, or has none (the run is transformed whole)."""
    numbers: dict[str, np.ndarray] = {}
    for name, table in upstream.items():
        if "block_number" not in table.column_names:
            raise LookupError(name)
        column = table["block_number"].to_numpy() if table.num_rows else np.array([], np.uint64)
        if column.size > 1 and not bool(np.all(column[1:] >= column[:-1])):
            raise LookupError(name)
        numbers[name] = column

    def cut(first: int, last: int) -> dict[str, pa.Table]:
        out = {}
        for name, table in upstream.items():
            lo = int(np.searchsorted(numbers[name], first, side="left"))
            hi = int(np.searchsorted(numbers[name], last, side="right"))
            out[name] = table.slice(lo, hi - lo)
        return out

    return cut


def _range_chunks(keys: Sequence[str], chunks: int) -> list[list[str]]:
    """The keys in block order, cut into at most `chunks` runs of consecutive keys."""
    ordered = sorted(keys, key=lambda k: parse_partition_key(k).start)
    size = -(-len(ordered) // max(1, min(chunks, len(ordered))))
    return [ordered[i : i + size] for i in range(0, len(ordered), size)]


def derive_pipelined(
    decl: DatasetDeclaration,
    transform: Callable[..., pa.Table],
    schema: pa.Schema,
    upstream: Mapping[str, pa.Table],
    keys: Sequence[str],
    stage: Callable[[dict[str, PartitionData]], list[StagedPartition]],
    chunks: int = PIPELINE_CHUNKS,
    min_rows: int = PIPELINE_MIN_ROWS,
) -> tuple[list[RuleOutcome], list[StagedPartition]]:
    """Transform the run's ranges, evaluate every rule over each range and stage each range:
    (the outcomes merged per rule, the staged partitions), exactly as for the ranges in one
    piece. Ranges are transformed chunk by chunk (every transform is row-local within a
    range), the rules and the staging of one chunk overlapping the transform of the next.
    Nothing is committed; the caller gates and commits (or, raising, aborts what was staged).
    """
    cut = None
    if len(keys) > 1 and chunks > 1:
        with contextlib.suppress(LookupError):
            cut = _block_slicer(upstream)
    rows = sum(t.num_rows for t in upstream.values())
    count = min(chunks, max(1, rows // max(1, min_rows)))  # chunks of min_rows rows or more
    groups = _range_chunks(keys, count) if cut is not None else [list(keys)]

    per_rule: list[list[RuleOutcome]] = []
    staged: list[StagedPartition] = []
    checking: list[Future[list[RuleOutcome]]] = []
    staging: list[Future[list[StagedPartition]]] = []
    # one thread checks, then stages, each chunk while the next one is transformed (a second
    # thread beside the transform slows it, and it is the run's longest path); the last chunk,
    # with no transform left to overlap, is checked and staged side by side
    serial = ThreadPoolExecutor(1, thread_name_prefix=f"derive-{decl.name}")
    side = ThreadPoolExecutor(1, thread_name_prefix=f"derive-{decl.name}-last")
    try:
        for number, group in enumerate(groups, start=1):
            first, last = parse_partition_key(group[0]), parse_partition_key(group[-1])
            inputs = dict(upstream) if cut is None else cut(first.start, last.last)
            parts = transforms.split_by_range(transform(**inputs).cast(schema), group)
            checking.append(serial.submit(evaluate_rules, decl, dict(parts)))
            staging.append(
                (serial if number < len(groups) else side).submit(
                    stage, {k: PartitionData(t) for k, t in parts.items()}
                )
            )
        for future in staging:
            staged += future.result()
        for checked in checking:
            outcomes = checked.result()
            per_rule = per_rule or [[] for _ in outcomes]
            for bucket, outcome in zip(per_rule, outcomes, strict=True):
                bucket.append(outcome)
    finally:
        # every chunk's staging done (or cancelled) before the caller aborts what was staged
        serial.shutdown(wait=True, cancel_futures=True)
        side.shutdown(wait=True, cancel_futures=True)
    return [merge_outcomes(bucket) for bucket in per_rule], staged


def build_derived_asset(
    decl: DatasetDeclaration, chain: DerivedChain = PRIMARY
) -> dg.AssetsDefinition:
    """A block-range partitioned derived asset of `chain` from its declaration and its
    transform."""
    transform = PARTITIONED_TRANSFORMS[decl.name]
    schema = arrow_schema(decl)

    # `backfill_policy` on @asset is flagged beta (on @multi_asset, as raw_chain uses it, it
    # is not); a single-run backfill is what lets one run transform many ranges at once.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", BetaWarning)
        return _decorate(decl, transform, schema, chain)


def _decorate(
    decl: DatasetDeclaration,
    transform: Callable[..., pa.Table],
    schema: pa.Schema,
    chain: DerivedChain,
) -> dg.AssetsDefinition:
    dataset = chain.dataset(decl.name)

    @dg.asset(
        key=chain.asset_key(decl.name),
        description=chain.describe(decl.description),
        ins={up: dg.AssetIn(key=chain.asset_key(up)) for up in decl.upstream},
        partitions_def=chain.partitions,
        backfill_policy=dg.BackfillPolicy.single_run(),
        io_manager_key="dataset_io_manager",
        metadata=dataset_metadata(decl, chain),
        check_specs=rule_check_specs(decl) if chain.chain is None else None,
        owners=[decl.owner],
        automation_condition=on_new_data(),
        group_name=chain.group,
        kinds={"parquet", "s3"},
    )
    def _derived(
        context: dg.AssetExecutionContext,
        dataset_io_manager: dg.ResourceParam[DatasetIOManager],
        **upstream: pa.Table,
    ) -> Iterator[Any]:
        keys = list(context.partition_keys)
        # committed here, so the output carries the committed content's data version: a range
        # re-derived identical (kept as it was) does not re-trigger alert evaluation
        with as_dagster_failure(), dataset_io_manager.staging(context) as staging:
            outcomes, staged = derive_pipelined(
                decl,
                transform,
                schema,
                upstream,
                keys,
                lambda parts: staging.stage(dataset, parts, mode=decl.commit_mode),
            )
            # every rule's result, then the circuit breaker: a tripped blocking rule fails the
            # step here and the staging block aborts what was staged; nothing is committed
            yield from _checked(decl, chain, outcomes)
            results = staging.commit(staged)
        yield versioned_output(
            results, metadata={"trace/input_rows": sum(t.num_rows for t in upstream.values())}
        )

    return _derived


def rollup_update(
    reader: DatasetReader, decl: DatasetDeclaration, chain: DerivedChain = PRIMARY
) -> pa.Table | None:
    """The new token_daily_volume table (of `chain`), or None when no erc20_transfers range
    changed.

    Recomputes only the days touched by ranges committed (or re-committed) since the current
    rollup version was made, from every range that holds those days; other rows are kept.
    """
    schema = arrow_schema(decl)
    versions = reader.versions
    name, upstream = chain.dataset(decl.name), chain.dataset(decl.upstream[0])
    current = versions.read.current_versions(upstream)
    tags = {key: f"{key}@v{record.version}" for key, record in current.items()}
    if name in versions.retention.known_datasets() and versions.read.current_versions(name):
        previous = reader.read(name, [UNPARTITIONED], schema=schema)
    else:
        previous = schema.empty_table()
    sources_by_day: dict[Any, set[str]] = {}
    for day, sources in zip(
        previous["day"].to_pylist(), previous["source_ranges"].to_pylist(), strict=True
    ):
        sources_by_day.setdefault(day, set()).update(sources)
    included = set().union(*sources_by_day.values()) if sources_by_day else set()
    changed = sorted(k for k, tag in tags.items() if tag not in included)
    if not changed:
        return None
    upstream_schema = arrow_schema(declarations()[decl.upstream[0]])
    stale_days = {
        day
        for day, sources in sources_by_day.items()
        if any(s.split("@")[0] in changed and s not in tags.values() for s in sources)
    }
    with reader.pinned(upstream, changed) as records:
        fresh = reader.read_versions(records.values(), upstream_schema)
    new_days = set(
        pa.compute.unique(pa.compute.divide(fresh["block_timestamp"], 86_400)).to_pylist()
    )
    affected = stale_days | {_day(d) for d in new_days}
    if not affected:
        return None
    needed = sorted(
        {s.split("@")[0] for d in affected for s in sources_by_day.get(d, ())} | set(changed)
    )
    needed = [k for k in needed if k in current]
    with reader.pinned(upstream, needed) as records:
        transfers = reader.read_versions(records.values(), upstream_schema)
        used = {k: f"{k}@v{r.version}" for k, r in records.items()}
    days = pa.compute.divide(transfers["block_timestamp"], 86_400).cast(pa.int32())
    in_affected = pa.compute.is_in(
        days.cast(pa.int32()).cast(pa.date32()), value_set=pa.array(sorted(affected), pa.date32())
    )
    recomputed = transforms.daily_volume(transfers.filter(in_affected), used).cast(schema)
    kept = previous.filter(
        pa.compute.invert(
            pa.compute.is_in(previous["day"], value_set=pa.array(sorted(affected), pa.date32()))
        )
    )
    return pa.concat_tables([kept, recomputed]).sort_by(
        [("day", "ascending"), ("token", "ascending")]
    )


def holders_update(
    reader: DatasetReader, decl: DatasetDeclaration, chain: DerivedChain = PRIMARY
) -> pa.Table | None:
    """The new token_holders table (of `chain`), or None when no erc20_transfers range changed.

    Recomputes only the tokens with transfers in ranges committed (or re-committed) since the
    current token_holders version was made, or in the superseded versions of those ranges,
    from every range holding transfers of those tokens; the other tokens' rows are kept. A
    re-committed range is read in its new version only, so its old contribution is replaced.
    """
    schema = arrow_schema(decl)
    name, upstream = chain.dataset(decl.name), chain.dataset(decl.upstream[0])
    current = reader.versions.read.current_versions(upstream)
    tags = {key: f"{key}@v{record.version}" for key, record in current.items()}
    if name in reader.versions.retention.known_datasets() and reader.versions.read.current_versions(
        name
    ):
        previous = reader.read(name, [UNPARTITIONED], schema=schema)
    else:
        previous = schema.empty_table()
    sources_by_token: dict[bytes, set[str]] = {}
    for token, sources in zip(
        previous["token"].to_pylist(), previous["source_ranges"].to_pylist(), strict=True
    ):
        sources_by_token.setdefault(token, set()).update(sources)
    included = set().union(*sources_by_token.values()) if sources_by_token else set()
    changed = sorted(k for k, tag in tags.items() if tag not in included)
    if not changed:
        return None
    current_tags = set(tags.values())
    stale = {
        token
        for token, sources in sources_by_token.items()
        if any(s.split("@")[0] in changed and s not in current_tags for s in sources)
    }
    upstream_schema = arrow_schema(declarations()[decl.upstream[0]])
    with reader.pinned(upstream, changed) as records:
        fresh = reader.read_versions(records.values(), upstream_schema)
    affected = stale | set(pc.unique(fresh["token"]).to_pylist())
    if not affected:
        return None
    needed = sorted(
        {s.split("@")[0] for token in affected for s in sources_by_token.get(token, ())}
        | set(changed)
    )
    needed = [k for k in needed if k in current]
    affected_tokens = pa.array(sorted(affected), pa.binary())
    with reader.pinned(upstream, needed) as records:
        transfers = reader.read_versions(records.values(), upstream_schema)
        used = {k: f"{k}@v{r.version}" for k, r in records.items()}
    mine = transfers.filter(pc.is_in(transfers["token"], value_set=affected_tokens))
    recomputed = transforms.token_holders(mine, used).cast(schema)
    kept = previous.filter(pc.invert(pc.is_in(previous["token"], value_set=affected_tokens)))
    return pa.concat_tables([kept, recomputed]).sort_by(
        [("chain_id", "ascending"), ("token", "ascending")]
    )


# how each unpartitioned (rollup) dataset folds in the ranges committed since its last run
ROLLUP_UPDATES: dict[
    str, Callable[[DatasetReader, DatasetDeclaration, DerivedChain], pa.Table | None]
] = {
    "token_daily_volume": rollup_update,
    "token_holders": holders_update,
}


def _day(days_since_epoch: int) -> Any:
    return pa.scalar(int(days_since_epoch), pa.int32()).cast(pa.date32()).as_py()


def build_rollup_asset(
    decl: DatasetDeclaration, chain: DerivedChain = PRIMARY
) -> dg.AssetsDefinition:
    update = ROLLUP_UPDATES[decl.name]
    primary = chain.chain is None

    @dg.asset(
        key=chain.asset_key(decl.name),
        description=chain.describe(decl.description),
        deps=[chain.asset_key(up) for up in decl.upstream],
        io_manager_key="dataset_io_manager",
        metadata=dataset_metadata(decl, chain),
        check_specs=rule_check_specs(decl) if primary else None,
        owners=[decl.owner],
        # catch-up by design: whatever changed upstream since the last run is folded in
        automation_condition=(
            dg.AutomationCondition.any_deps_updated().since_last_handled()
            & ~dg.AutomationCondition.in_progress()
        ),
        output_required=False,
        group_name=chain.group,
        kinds={"parquet", "s3"},
    )
    def _rollup(
        context: dg.AssetExecutionContext, state: StateStoreResource, objects: ObjectStoreResource
    ) -> Iterator[Any]:
        reader = state.reader(objects)
        with as_dagster_failure():
            table = update(reader, decl, chain)
        if table is None:
            context.log.info(
                f"no {chain.dataset(decl.upstream[0])} range changed since the last "
                f"{chain.dataset(decl.name)}"
            )
            if primary:  # nothing committed: the checks report on the version that stands
                yield from _unchanged_checks(decl, reader)
            return
        yield from _checked(decl, chain, evaluate_rules(decl, {None: table}))
        yield dg.Output(table, metadata={"dagster/row_count": table.num_rows})

    return _rollup


def _unchanged_checks(
    decl: DatasetDeclaration, reader: DatasetReader
) -> Iterator[dg.AssetCheckResult]:
    """The rules over the current version of an unpartitioned dataset (when a run commits
    nothing new), or passing results saying there is nothing committed to check."""
    if reader.resolve(decl.name):
        table = reader.read(decl.name, [UNPARTITIONED], schema=arrow_schema(decl))
        yield from check_results(decl.name, evaluate_rules(decl, {None: table}))
        return
    for rule in decl.quality:
        yield dg.AssetCheckResult(
            asset_key=decl.name,
            check_name=rule.name,
            passed=True,
            description="nothing committed yet: no rows to check",
        )


def needs_traces(decl: DatasetDeclaration) -> bool:
    """Whether the dataset is computed from call traces (`geth_calls`), directly or through
    other datasets: it exists only where an endpoint serves `debug_*`."""
    known = declarations()
    seen: set[str] = set()
    todo = list(decl.upstream)
    while todo:
        name = todo.pop()
        if name in TRACE_DATASETS:
            return True
        if name in seen or name not in known:
            continue
        seen.add(name)
        todo.extend(known[name].upstream)
    return False


def _build(decl: DatasetDeclaration, chain: DerivedChain) -> dg.AssetsDefinition:
    if decl.partitioning == "block_range":
        return build_derived_asset(decl, chain)
    return build_rollup_asset(decl, chain)


def _build_all(traced: bool) -> list[dg.AssetsDefinition]:
    return [
        _build(decl, PRIMARY)
        for decl in declarations().values()
        if decl.kind == "derived" and needs_traces(decl) == traced
    ]


def build_chain_derived(chain: str) -> list[dg.AssetsDefinition]:
    """The derived assets of another chain of TRACE_CHAINS (`SECONDARY_DERIVED_DATASETS`):
    the primary's transforms and declarations over that chain's own raw datasets."""
    known = declarations()
    decls = [known[name] for name in SECONDARY_DERIVED_DATASETS]
    traced = [d.name for d in decls if d.kind != "derived" or needs_traces(d)]
    if traced:  # the two lists disagree: a change to the declarations must say which it is
        raise ValueError(
            f"SECONDARY_DERIVED_DATASETS lists {', '.join(traced)}, which a secondary chain "
            "cannot derive (not derived, or derived from call traces): remove them there"
        )
    return [_build(decl, DerivedChain(chain)) for decl in decls]


# The derived datasets every endpoint can feed (blocks, transactions and logs); every range
# must have them (`GAP_SCOPE`).
DERIVED_ASSETS = _build_all(traced=False)
# Those derived from call traces (`geth_calls`): only where the endpoint serves `debug_*`, so
# they are apart from the others, and a range without them is not a gap.
TRACE_DERIVED_ASSETS = _build_all(traced=True)
