"""Chain-head sensor: adds the block ranges the finalized head has completed, and runs them.

Nothing past `finalized` is ever requested. The cursor is the last block already covered, so a
restarted daemon resumes where it stopped; ranges are requested in runs of up to
`RangeRuns.max_partitions_per_run` so a catch-up of hundreds of ranges is not hundreds of runs.
What the sensor needs from the assets (the block-range partitions, the raw asset keys, the run
size) is handed to `build_chain_head_sensor` by `trace_assets.definitions` as a `RangeRuns`.

Latency (finalized block -> alert, `make bench-alerts`): one run per tick materialises the raw
datasets of the new ranges AND everything partitioned by block range downstream of them (the
derived datasets, the alert evaluations), in process: one run launch instead of three (raw,
then the automation sensor's derived run, then its alerts run), and no process per step. The
daemon evaluates sensors every 5 s at most (`TRACE_CHAIN_HEAD_INTERVAL_S` can space ticks
further); an evaluation that finds no new range watches the head for up to
`TRACE_CHAIN_HEAD_WATCH_S` and requests a range as soon as it completes.
`TRACE_CHAIN_HEAD_DOWNSTREAM=false` requests the raw datasets alone.
"""

import time
from collections.abc import Sequence
from dataclasses import dataclass

import dagster as dg
from dagster._core.definitions.assets.graph.base_asset_graph import BaseAssetGraph
from dagster._core.storage.tags import (
    ASSET_PARTITION_RANGE_END_TAG,
    ASSET_PARTITION_RANGE_START_TAG,
    PRIORITY_TAG,
    SENSOR_NAME_TAG,
)

from trace_resources.chain.extract import ChainClient
from trace_resources.chain.ranges import BlockRange, complete_ranges
from trace_resources.failures import as_dagster_failure
from trace_resources.instance.run_coordinator import FAST_LANE_TAG
from trace_resources.resources import ChainResource
from trace_resources.settings import get_settings

__all__ = [
    "RangeRuns",
    "build_chain_head_sensor",
    "plan_new_ranges",
    "MAX_RANGES_PER_TICK",
    "IN_PROCESS",
    "range_asset_keys",
]

# One tick adds at most this many ranges; the next tick continues from the cursor.
MAX_RANGES_PER_TICK = 1_000


@dataclass(frozen=True)
class RangeRuns:
    """What the sensor's runs are made of, from the assets: the dynamic partitions of block
    ranges, the raw assets that extract a range, and how many ranges one run takes."""

    partitions: dg.DynamicPartitionsDefinition
    raw_asset_keys: Sequence[dg.AssetKey]
    max_partitions_per_run: int


def plan_new_ranges(cursor: str | None, finalized: int, range_size: int) -> list[BlockRange]:
    covered = int(cursor) if cursor else -1
    return complete_ranges(covered, finalized, range_size)[:MAX_RANGES_PER_TICK]


SENSOR_NAME = "chain_head_sensor"
# the queued run coordinator starts higher priorities first: fresh ranges (and their alerts)
# before backfills and the automation sensor's rollups; with a run slot free they skip the
# queue (FAST_LANE_TAG, trace_resources/instance/run_coordinator.py)
RUN_PRIORITY = "10"
_WAITING = [dg.DagsterRunStatus.QUEUED, dg.DagsterRunStatus.NOT_STARTED]

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


def run_requests_for(
    runs: RangeRuns, ranges: list[BlockRange], asset_keys: list[dg.AssetKey] | None = None
) -> list[dg.RunRequest]:
    selection = asset_keys or list(runs.raw_asset_keys)
    size = runs.max_partitions_per_run
    requests = []
    for offset in range(0, len(ranges), size):
        chunk = ranges[offset : offset + size]
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
    runs: RangeRuns, context: dg.SensorEvaluationContext, chain: ChainResource
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
                outcome = _look(runs, context, chain, client, settings.chain_head_downstream)
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
    client: ChainClient,
    downstream: bool,
) -> dg.SensorResult | dg.SkipReason:
    waiting = context.instance.get_run_ids(
        dg.RunsFilter(tags={SENSOR_NAME_TAG: SENSOR_NAME}, statuses=_WAITING), limit=1
    )
    if waiting:
        # ranges finalized meanwhile go into the next run, requested once this one left the
        # queue: runs never pile up faster than they launch (the cursor has not moved)
        return dg.SkipReason(f"run {waiting[0]} of earlier ranges is still queued")
    head = client.head()
    ranges = plan_new_ranges(context.cursor, head.finalized, chain.range_size)
    if not ranges:
        return dg.SkipReason(
            f"no complete range past block {context.cursor or -1}; "
            f"finalized head is {head.finalized}"
        )
    existing = set(context.instance.get_dynamic_partitions(runs.partitions.name or ""))
    new_keys = [r.key for r in ranges if r.key not in existing]
    repository = context.repository_def
    asset_keys = range_asset_keys(
        runs, repository.asset_graph if repository is not None else None, downstream
    )
    adds = [runs.partitions.build_add_request(new_keys)] if new_keys else []
    return dg.SensorResult(
        run_requests=run_requests_for(runs, ranges, asset_keys),
        dynamic_partitions_requests=adds,
        cursor=str(ranges[-1].last),
    )


def build_chain_head_sensor(
    runs: RangeRuns, running: bool = True, interval_s: int | None = None
) -> dg.SensorDefinition:
    """The sensor, on by default; `TRACE_SENSORS_RUNNING=false` starts it stopped. It ticks
    every `interval_s` (default `TRACE_CHAIN_HEAD_INTERVAL_S`)."""

    def chain_head_sensor(
        context: dg.SensorEvaluationContext, chain: ChainResource
    ) -> dg.SensorResult | dg.SkipReason:
        return _evaluate(runs, context, chain)

    return dg.sensor(
        name=SENSOR_NAME,
        description="Adds block-range partitions up to the finalized head and requests their "
        "runs: raw datasets, then the derived datasets and alert evaluations of the same ranges.",
        asset_selection=dg.AssetSelection.assets(*runs.raw_asset_keys).downstream(),
        minimum_interval_seconds=interval_s or get_settings().chain_head_interval_s,
        default_status=(
            dg.DefaultSensorStatus.RUNNING if running else dg.DefaultSensorStatus.STOPPED
        ),
    )(chain_head_sensor)
