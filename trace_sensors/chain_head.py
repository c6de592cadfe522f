"""Chain-head sensor: adds the block ranges the finalized head has completed, and runs them.

Nothing past `finalized` is ever requested. The cursor is the last block already covered, so a
restarted daemon resumes where it stopped; ranges are requested in runs of up to
`RangeRuns.max_partitions_per_run` so a catch-up of hundreds of ranges is not hundreds of runs.

What is committed already is never requested again. Without a cursor (a new instance, or
ranges backfilled through the CLI before the sensor first ran) the sensor starts after the
highest range that every raw dataset has sealed in Postgres state, or that an unfinished run
is materialising, whichever is higher; ranges missing below it are gaps, which the gap-repair
sensor requests (`gap_repair.py`): the sensor only registers them as partitions, as it would
have while passing them. Past the cursor too, a range sealed in every raw dataset, or in an
unfinished run, is registered and passed over, not requested.

What the sensor needs from the assets (the block-range partitions, the raw asset keys, the run
size) is handed to `build_chain_head_sensor` by `trace_assets.definitions` as a `RangeRuns`.

One sensor per chain (README: Several chains): the primary's `chain_head_sensor` reads the
`chain` resource, its `block_ranges` and the datasets `blocks` ...; another chain's
`chain_head_sensor__<chain>` reads `chain__<chain>` (its endpoints, range size and finality),
adds to `block_ranges__<chain>`, requests `<chain>/blocks` ... and starts from what is committed
as `<chain>.blocks` ... (`RangeRuns.chain`).

Latency (finalized block -> alert, `make bench-alerts`): one run per tick materialises the raw
datasets of the new ranges AND everything partitioned by block range downstream of them (the
derived datasets, the alert evaluations), in process: one run launch instead of three (raw,
then the automation sensor's derived run, then its alerts run), and no process per step. The
daemon evaluates sensors every 5 s at most (`TRACE_CHAIN_HEAD_INTERVAL_S` can space ticks
further); an evaluation that finds no new range watches the head for up to
`TRACE_CHAIN_HEAD_WATCH_S` and requests a range as soon as it completes.
`TRACE_CHAIN_HEAD_DOWNSTREAM=false` requests the raw datasets alone.
"""

import inspect
import time
from collections import defaultdict
from collections.abc import Mapping, Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass
from typing import Any

import dagster as dg
from dagster._core.definitions.assets.graph.base_asset_graph import BaseAssetGraph
from dagster._core.storage.tags import (
    ASSET_PARTITION_RANGE_END_TAG,
    ASSET_PARTITION_RANGE_START_TAG,
    PARTITION_NAME_TAG,
    PRIORITY_TAG,
    SENSOR_NAME_TAG,
)

from trace_resources.chain.extract import ChainClient
from trace_resources.chain.ranges import BlockRange, complete_ranges, parse_partition_key
from trace_resources.chains import dataset_for_asset_key
from trace_resources.errors import MalformedPartitionKeyError
from trace_resources.failures import as_dagster_failure
from trace_resources.gaps import SEALED
from trace_resources.instance.run_coordinator import FAST_LANE_TAG
from trace_resources.resources import ChainResource, StateStoreResource
from trace_resources.settings import get_settings

__all__ = [
    "RangeRuns",
    "build_chain_head_sensor",
    "plan_new_ranges",
    "sealed_ranges",
    "ranges_in_flight",
    "derive_start",
    "MAX_RANGES_PER_TICK",
    "IN_PROCESS",
    "range_asset_keys",
    "resource_signature",
]

# One tick adds at most this many ranges; the next tick continues from the cursor.
MAX_RANGES_PER_TICK = 1_000
_WAITING = [dg.DagsterRunStatus.QUEUED, dg.DagsterRunStatus.NOT_STARTED]
_UNFINISHED = [
    *_WAITING,
    dg.DagsterRunStatus.STARTING,
    dg.DagsterRunStatus.STARTED,
    dg.DagsterRunStatus.CANCELING,
]


@dataclass(frozen=True)
class RangeRuns:
    """What the sensor's runs are made of, from the assets: the dynamic partitions of block
    ranges, the raw assets that extract a range, and how many ranges one run takes; and whose
    they are: the primary chain's (`chain` None), or another chain's of TRACE_CHAINS, read
    through the resource `resource_key`."""

    partitions: dg.DynamicPartitionsDefinition
    raw_asset_keys: Sequence[dg.AssetKey]
    max_partitions_per_run: int
    chain: str | None = None
    resource_key: str = "chain"

    @property
    def raw_datasets(self) -> list[str]:
        """The registry names of the raw datasets (`blocks`; `<chain>.blocks` on another
        chain), as committed in Postgres state."""
        return [dataset_for_asset_key(key.path) for key in self.raw_asset_keys]

    def sensor_name(self, base: str) -> str:
        """`base` for the primary chain, `<base>__<chain>` for another."""
        return base if self.chain is None else f"{base}__{self.chain}"

    def selects(self, selection: AbstractSet[dg.AssetKey] | None) -> bool:
        """Whether a run's asset selection holds assets of this chain: another chain's are
        keyed [<chain>, <dataset>], the primary's by one name; a run with no selection (a job's
        whole selection: `raw_chain_job`; or an empty one, as `dg.materialize` records) is the
        primary's."""
        if not selection:
            return self.chain is None
        if self.chain is None:
            return any(len(key.path) == 1 for key in selection)
        return any(len(key.path) == 2 and key.path[0] == self.chain for key in selection)


def plan_new_ranges(cursor: str | None, finalized: int, range_size: int) -> list[BlockRange]:
    covered = int(cursor) if cursor else -1
    return complete_ranges(covered, finalized, range_size)[:MAX_RANGES_PER_TICK]


def sealed_ranges(modes: Mapping[tuple[str, str], str], datasets: Sequence[str]) -> set[str]:
    """The ranges whose current version is sealed in every one of `datasets`, from
    {(dataset, range): commit mode of its current version} (`ReadModel.current_commit_modes`)."""
    sealed: dict[str, set[str]] = defaultdict(set)
    for (dataset, key), mode in modes.items():
        if mode == SEALED:
            sealed[key].add(dataset)
    return {key for key, names in sealed.items() if names >= set(datasets)}


def ranges_in_flight(instance: dg.DagsterInstance, runs: RangeRuns) -> dict[str, str]:
    """{range: run id} of the block ranges an unfinished run materialises the raw datasets of
    (its partition, or every range of its partition range)."""
    raw = set(runs.raw_asset_keys)
    found: dict[str, str] = {}
    for run in instance.get_runs(dg.RunsFilter(statuses=_UNFINISHED)):
        if run.asset_selection is None:
            # a job's whole selection (`raw_chain_job`): the primary chain's assets
            if runs.chain is not None:
                continue
        elif not (run.asset_selection & raw):
            continue
        tags = run.tags
        first = tags.get(PARTITION_NAME_TAG) or tags.get(ASSET_PARTITION_RANGE_START_TAG)
        last = tags.get(PARTITION_NAME_TAG) or tags.get(ASSET_PARTITION_RANGE_END_TAG)
        if first is None or last is None:
            continue
        try:
            start, end = parse_partition_key(first), parse_partition_key(last)
        except MalformedPartitionKeyError:  # another partitioning (e.g. days)
            continue
        size = start.size
        for offset in range(start.start, end.last + 1, size):
            found.setdefault(BlockRange(offset, offset + size - 1).key, run.run_id)
    return found


@dataclass(frozen=True)
class Start:
    """Where a sensor without a cursor starts: the last block covered, and why."""

    covered: int
    reason: str


def derive_start(sealed: set[str], in_flight: Mapping[str, str]) -> Start:
    """After the highest range sealed in every raw dataset or materialised by an unfinished
    run; -1 (the chain's first range) if there is none. Missing ranges below are gaps."""
    top_sealed = max(sealed, default=None)
    top_flight = max(in_flight, default=None)
    if top_sealed is None and top_flight is None:
        return Start(-1, "nothing is committed or in flight: starting at block 0")
    top = max(k for k in (top_sealed, top_flight) if k is not None)  # lexical = block order
    if top == top_sealed:
        why = f"{len(sealed)} range(s) committed in every raw dataset, the highest {top}"
    else:
        why = f"run {in_flight[top]} is materialising range {top}"
    return Start(parse_partition_key(top).last, f"no cursor: starting after {top} ({why})")


SENSOR_NAME = "chain_head_sensor"
# the queued run coordinator starts higher priorities first: fresh ranges (and their alerts)
# before backfills and the automation sensor's rollups; with a run slot free they skip the
# queue (FAST_LANE_TAG, trace_resources/instance/run_coordinator.py)
RUN_PRIORITY = "10"

# the run config of the sensor's runs: every step in the run's own process (Dagster's default
# executor would start a process per step, each importing the code location anew)
IN_PROCESS: dict[str, object] = {"execution": {"config": {"in_process": {}}}}


def range_asset_keys(
    runs: RangeRuns, asset_graph: object | None, downstream: bool = True
) -> list[dg.AssetKey]:
    """What a run of new ranges materialises: the raw datasets and, with `downstream`, every
    asset partitioned by block range that depends on them (derived datasets, alert
    evaluations) in the code location's asset graph."""
    keys = list(runs.raw_asset_keys)
    if not downstream or asset_graph is None:
        return keys
    graph: BaseAssetGraph = asset_graph  # type: ignore[assignment]
    below = dg.AssetSelection.assets(*runs.raw_asset_keys).downstream().resolve(graph)
    for key in sorted(below - set(keys), key=lambda k: k.to_user_string()):
        node = graph.get(key)
        if node.is_materializable and node.partitions_def == runs.partitions:
            keys.append(key)
    return keys


def _consecutive_chunks(ranges: list[BlockRange], size: int) -> list[list[BlockRange]]:
    chunks: list[list[BlockRange]] = []
    for r in ranges:
        last = chunks[-1] if chunks else None
        if last is not None and len(last) < size and last[-1].last + 1 == r.start:
            last.append(r)
        else:
            chunks.append([r])
    return chunks


def run_requests_for(
    runs: RangeRuns, ranges: list[BlockRange], asset_keys: list[dg.AssetKey] | None = None
) -> list[dg.RunRequest]:
    """Runs of up to `max_partitions_per_run` consecutive ranges each (a run's partition range
    covers every range between its first and last, so ranges left out split runs)."""
    selection = asset_keys or list(runs.raw_asset_keys)
    requests = []
    for chunk in _consecutive_chunks(ranges, runs.max_partitions_per_run):
        first, last = chunk[0].key, chunk[-1].key
        if len(chunk) == 1:
            requests.append(
                dg.RunRequest(
                    run_key=f"range:{first}",
                    partition_key=first,
                    asset_selection=selection,
                    run_config=IN_PROCESS,
                    tags={PRIORITY_TAG: RUN_PRIORITY, FAST_LANE_TAG: "true"},
                )
            )
        else:
            requests.append(
                dg.RunRequest(
                    run_key=f"ranges:{first}..{last}",
                    asset_selection=selection,
                    run_config=IN_PROCESS,
                    tags={
                        ASSET_PARTITION_RANGE_START_TAG: first,
                        ASSET_PARTITION_RANGE_END_TAG: last,
                        PRIORITY_TAG: RUN_PRIORITY,
                        FAST_LANE_TAG: "true",
                    },
                )
            )
    return requests


def _evaluate(
    runs: RangeRuns,
    context: dg.SensorEvaluationContext,
    chain: ChainResource,
    state: StateStoreResource,
) -> dg.SensorResult | dg.SkipReason:
    """Request the ranges completed past the cursor, watching the head for a while if none.

    The daemon starts a sensor evaluation every 5 s at most; a range completed just after one
    looked would wait for the next. So an evaluation that finds nothing keeps reading the
    finalized head every `chain_head_poll_s` for up to `chain_head_watch_s` and returns as soon
    as a range completes (or the queued run it waits on leaves the queue).
    """
    settings = get_settings()
    deadline = time.monotonic() + settings.chain_head_watch_s
    with as_dagster_failure():
        client = chain.client()
        try:
            while True:
                outcome = _look(runs, context, chain, state, client, settings.chain_head_downstream)
                if isinstance(outcome, dg.SensorResult):
                    return outcome
                if time.monotonic() + settings.chain_head_poll_s > deadline:
                    return outcome
                time.sleep(settings.chain_head_poll_s)
        finally:
            client.close()


def _look(
    runs: RangeRuns,
    context: dg.SensorEvaluationContext,
    chain: ChainResource,
    state: StateStoreResource,
    client: ChainClient,
    downstream: bool,
) -> dg.SensorResult | dg.SkipReason:
    instance = context.instance
    waiting = instance.get_run_ids(
        dg.RunsFilter(tags={SENSOR_NAME_TAG: runs.sensor_name(SENSOR_NAME)}, statuses=_WAITING),
        limit=1,
    )
    if waiting:
        # ranges finalized meanwhile go into the next run, requested once this one left the
        # queue: runs never pile up faster than they launch (the cursor has not moved)
        return dg.SkipReason(f"run {waiting[0]} of earlier ranges is still queued")
    head = client.head()
    raw = runs.raw_datasets
    read = state.versions().read
    start: Start | None = None
    if context.cursor:
        covered = int(context.cursor)
    else:
        start = derive_start(
            sealed_ranges(read.current_commit_modes(raw), raw), ranges_in_flight(instance, runs)
        )
        context.log.info(start.reason)
        covered = start.covered
    ranges = complete_ranges(covered, head.finalized, chain.range_size)[:MAX_RANGES_PER_TICK]
    if not ranges and start is None:
        return dg.SkipReason(
            f"no complete range past block {covered}; finalized head is {head.finalized}"
        )
    keys = [r.key for r in ranges]
    # a range sealed in every raw dataset, or in a run, is not requested (again)
    taken = sealed_ranges(read.current_commit_modes(raw, keys), raw) if keys else set()
    taken |= set(ranges_in_flight(instance, runs)) & set(keys)
    todo = [r for r in ranges if r.key not in taken]
    existing = set(instance.get_dynamic_partitions(runs.partitions.name or ""))
    below = [] if start is None else complete_ranges(-1, covered, chain.range_size)
    new_keys = [r.key for r in [*below, *ranges] if r.key not in existing]
    adds = [runs.partitions.build_add_request(new_keys)] if new_keys else []
    cursor = str(ranges[-1].last if ranges else covered)
    if not todo:
        done = f"{keys[0]}..{keys[-1]} committed or in flight already" if keys else "no range"
        return dg.SensorResult(
            dynamic_partitions_requests=adds,
            cursor=cursor,
            skip_reason=f"nothing to request ({done}); cursor at block {cursor}, finalized "
            f"head is {head.finalized}",
        )
    repository = context.repository_def
    asset_keys = range_asset_keys(
        runs, repository.asset_graph if repository is not None else None, downstream
    )
    if taken:
        context.log.info(f"not requested, committed or in flight already: {sorted(taken)}")
    return dg.SensorResult(
        run_requests=run_requests_for(runs, todo, asset_keys),
        dynamic_partitions_requests=adds,
        cursor=cursor,
    )


def resource_signature(chain_key: str) -> inspect.Signature:
    """The signature of a sensor function `(context, <chain_key>: ChainResource, state:
    StateStoreResource)`: Dagster hands a sensor the resources its parameters name, and a
    secondary chain's resource is `chain__<chain>` (a name known when the sensor is built)."""
    keyword = inspect.Parameter.KEYWORD_ONLY
    return inspect.Signature(
        [
            inspect.Parameter(
                "context",
                inspect.Parameter.POSITIONAL_OR_KEYWORD,
                annotation=dg.SensorEvaluationContext,
            ),
            inspect.Parameter(chain_key, keyword, annotation=ChainResource),
            inspect.Parameter("state", keyword, annotation=StateStoreResource),
        ],
        return_annotation=dg.SensorResult | dg.SkipReason,
    )


def build_chain_head_sensor(
    runs: RangeRuns, running: bool = True, interval_s: int | None = None
) -> dg.SensorDefinition:
    """The sensor of `runs`' chain, on by default; `TRACE_SENSORS_RUNNING=false` starts it
    stopped. It ticks every `interval_s` (default `TRACE_CHAIN_HEAD_INTERVAL_S`)."""

    def chain_head_sensor(
        context: dg.SensorEvaluationContext, **resources: Any
    ) -> dg.SensorResult | dg.SkipReason:
        return _evaluate(runs, context, resources[runs.resource_key], resources["state"])

    chain_head_sensor.__signature__ = resource_signature(runs.resource_key)  # type: ignore[attr-defined]
    of_chain = "" if runs.chain is None else f" of chain {runs.chain}"
    return dg.sensor(
        name=runs.sensor_name(SENSOR_NAME),
        description=f"Adds block-range partitions{of_chain} up to the finalized head and "
        "requests their runs: raw datasets, then the derived datasets and alert evaluations of "
        "the same ranges.",
        asset_selection=dg.AssetSelection.assets(*runs.raw_asset_keys).downstream(),
        minimum_interval_seconds=interval_s or get_settings().chain_head_interval_s,
        default_status=(
            dg.DefaultSensorStatus.RUNNING if running else dg.DefaultSensorStatus.STOPPED
        ),
    )(chain_head_sensor)
