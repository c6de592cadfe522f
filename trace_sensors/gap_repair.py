"""Gap repair: re-requests every finalized block range a dataset or an alert evaluation lacks.

The chain-head sensor requests each range once and moves its cursor on; a range whose run
failed, whose `alert_evaluations` step failed, or whose process was killed would stay missing.
Each tick of this sensor lists the gaps (`trace_resources.gaps.find_gaps`: no sealed current
version in Postgres state, or no successful evaluation in the Dagster instance) of the ranges
the instance has as partitions, up to the finalized head, and requests one run per range:

- never while a run that covers the range is queued or in progress (its partition or its
  partition range; a killed run counts until run monitoring marks it failed);
- what it selects: the missing assets and the block-range assets downstream of them (all raw
  datasets when one is missing: they are one step), so sealed datasets are not re-committed
  and alerts are re-evaluated once the data under them changed;
- its run key counts the range's repair runs (`gap_repair:<range>:<n>`), so a range is
  requested again after a failed repair, never twice for the same attempt;
- backoff, derived from the instance (no cursor): the first repair of a range is requested at
  once; after n repair runs the next waits `gap_repair_backoff_s * 2**(n-1)` (at most
  `gap_repair_backoff_max_s`) from the end of the last one, so a range that always fails
  does not loop hot;
- the run names the failed run in `REPAIRS_RUN_TAG`: a step that committed some outputs
  before that run died commits them once (the IO manager's commit key anchors on it).

The tick logs each request with its reasons (also in the run's `trace/gap_repair_reason` tag),
and a skip reason says what it waits for.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import dagster as dg
from dagster._core.definitions.assets.graph.base_asset_graph import BaseAssetGraph
from dagster._core.storage.tags import PRIORITY_TAG

from trace_resources.chains import asset_path
from trace_resources.failures import as_dagster_failure
from trace_resources.gaps import Gap, GapScope, finalized_keys, find_gaps, range_keys_of_run
from trace_resources.resources import ChainResource, StateStoreResource
from trace_resources.settings import Settings, get_settings
from trace_resources.storage.io_manager import REPAIRS_RUN_TAG
from trace_resources.storage.state import engine_for
from trace_sensors.chain_head import IN_PROCESS, RangeRuns, range_asset_keys, resource_signature

__all__ = [
    "SENSOR_NAME",
    "REPAIR_TAG",
    "ATTEMPT_TAG",
    "REASON_TAG",
    "build_gap_repair_sensor",
    "plan_repairs",
]

SENSOR_NAME = "gap_repair_sensor"
REPAIR_TAG = "trace/gap_repair"  # the range a repair run repairs
ATTEMPT_TAG = "trace/gap_repair_attempt"
REASON_TAG = "trace/gap_repair_reason"
# below the chain-head sensor's fresh ranges (10), above backfills
RUN_PRIORITY = "5"
_UNFINISHED = [
    dg.DagsterRunStatus.QUEUED,
    dg.DagsterRunStatus.NOT_STARTED,
    dg.DagsterRunStatus.STARTING,
    dg.DagsterRunStatus.STARTED,
    dg.DagsterRunStatus.CANCELING,
]
_REASON_MAX = 2000


@dataclass(frozen=True)
class RepairPlan:
    requests: list[dg.RunRequest]
    requested: list[str]  # one line per request: range, attempt, reasons
    waiting: list[str]  # one line per range left for a later tick, and why
    finalized: int
    ranges: int


def backoff_s(repair_runs: int, settings: Settings) -> float:
    """Wait after the last of `repair_runs` repair runs of a range before the next one."""
    if repair_runs <= 0:
        return 0.0
    return float(
        min(
            settings.gap_repair_backoff_s * 2 ** (repair_runs - 1),
            settings.gap_repair_backoff_max_s,
        )
    )


def _selection(
    runs: RangeRuns, graph: BaseAssetGraph | None, missing: set[dg.AssetKey]
) -> list[dg.AssetKey]:
    """The missing assets and the block-range assets downstream of them, in run order."""
    ordered = range_asset_keys(runs, graph)
    if graph is None:
        return ordered
    if missing & set(runs.raw_asset_keys):
        missing = missing | set(runs.raw_asset_keys)  # one step, committed together
    below = dg.AssetSelection.assets(*missing).downstream().resolve(graph)
    return [k for k in ordered if k in missing or k in below]


def _anchor(gaps: Sequence[Gap], evaluations: Sequence[str]) -> str | None:
    """The failed run whose committed outputs the repair must not commit again."""
    for gap in gaps:
        if gap.asset not in evaluations and gap.run_id is not None:
            return gap.run_id
    return None


def plan_repairs(
    instance: dg.DagsterInstance,
    runs: RangeRuns,
    scope: GapScope,
    graph: BaseAssetGraph | None,
    state: StateStoreResource,
    finalized: int,
    range_size: int,
    settings: Settings,
    now: float | None = None,
) -> RepairPlan:
    now = time.time() if now is None else now
    registered = set(instance.get_dynamic_partitions(scope.partitions))
    keys = [k for k in finalized_keys(finalized, range_size) if k in registered]
    by_range: dict[str, list[Gap]] = defaultdict(list)
    for gap in find_gaps(instance, engine_for(state.dsn), scope, keys):
        by_range[gap.partition_key].append(gap)
    plan = RepairPlan([], [], [], finalized, len(keys))
    if not by_range:
        return plan
    busy: dict[str, str] = {}
    for run in instance.get_runs(dg.RunsFilter(statuses=_UNFINISHED)):
        if not runs.selects(run.asset_selection):
            continue  # another chain's run: its ranges share the keys, not the data
        for key in range_keys_of_run(run, sorted(by_range)):
            busy.setdefault(key, f"run {run.run_id} is {run.status.value}")
    for key, gaps in sorted(by_range.items()):
        reasons = "; ".join(f"{g.asset}: {g.reason()}" for g in gaps)
        in_progress = next((g for g in gaps if g.in_progress), None)
        if key in busy or in_progress is not None:
            why = busy.get(key) or f"run {in_progress.run_id} is {in_progress.run_status}"  # type: ignore[union-attr]
            plan.waiting.append(f"{key}: {why} ({reasons})")
            continue
        previous = [
            record
            for record in instance.get_run_records(dg.RunsFilter(tags={REPAIR_TAG: key}))
            if runs.selects(record.dagster_run.asset_selection)  # this chain's repairs
        ]
        if previous:
            last = previous[0]  # newest first
            ended = last.end_time or last.update_timestamp.timestamp()
            ready_at = ended + backoff_s(len(previous), settings)
            if now < ready_at:
                until = time.strftime("%H:%M:%S", time.localtime(ready_at))
                plan.waiting.append(
                    f"{key}: backing off until {until} "
                    f"after {len(previous)} repair run(s), the last {last.dagster_run.run_id} "
                    f"({reasons})"
                )
                continue
        if len(plan.requests) >= settings.gap_repair_max_runs:
            plan.waiting.append(f"{key}: next tick (at most {settings.gap_repair_max_runs} runs)")
            continue
        attempt = len(previous) + 1
        selection = _selection(runs, graph, {dg.AssetKey(asset_path(g.asset)) for g in gaps})
        tags = {
            REPAIR_TAG: key,
            ATTEMPT_TAG: str(attempt),
            REASON_TAG: reasons[:_REASON_MAX],
            PRIORITY_TAG: RUN_PRIORITY,
        }
        anchor = _anchor(gaps, scope.evaluations)
        if anchor is not None:
            tags[REPAIRS_RUN_TAG] = anchor
        plan.requests.append(
            dg.RunRequest(
                run_key=f"gap_repair:{key}:{attempt}",
                partition_key=key,
                asset_selection=selection,
                run_config=IN_PROCESS,
                tags=tags,
            )
        )
        names = ",".join(k.to_user_string() for k in selection)
        plan.requested.append(f"{key} (repair {attempt}; runs {names}): {reasons}")
    return plan


def _evaluate(
    runs: RangeRuns,
    scope: GapScope,
    context: dg.SensorEvaluationContext,
    chain: ChainResource,
    state: StateStoreResource,
) -> dg.SensorResult | dg.SkipReason:
    settings = get_settings()
    with as_dagster_failure():
        client = chain.client()
        try:
            head = client.head()
        finally:
            client.close()
        repository = context.repository_def
        graph = repository.asset_graph if repository is not None else None
        plan = plan_repairs(
            context.instance,
            runs,
            scope,
            graph,
            state,
            head.finalized,
            chain.range_size,
            settings,
        )
    for line in plan.requested:
        context.log.info(f"re-requesting {line}")
    for line in plan.waiting:
        context.log.info(f"not yet: {line}")
    if plan.requests:
        return dg.SensorResult(run_requests=plan.requests)
    if plan.waiting:
        return dg.SkipReason(
            f"{len(plan.waiting)} missing range(s) up to finalized block {plan.finalized}, "
            "none re-requested now: " + " | ".join(plan.waiting)
        )
    return dg.SkipReason(
        f"no gaps: all {plan.ranges} range(s) up to finalized block {plan.finalized} are "
        "sealed and evaluated"
    )


def build_gap_repair_sensor(
    runs: RangeRuns, scope: GapScope, running: bool = True, interval_s: int | None = None
) -> dg.SensorDefinition:
    """The sensor of `runs`' chain (`gap_repair_sensor`, another chain's
    `gap_repair_sensor__<chain>`), on by default (`TRACE_SENSORS_RUNNING=false` starts it
    stopped); it ticks every `interval_s` (default `TRACE_GAP_REPAIR_INTERVAL_S`)."""

    def gap_repair_sensor(
        context: dg.SensorEvaluationContext, **resources: Any
    ) -> dg.SensorResult | dg.SkipReason:
        return _evaluate(runs, scope, context, resources[runs.resource_key], resources["state"])

    gap_repair_sensor.__signature__ = resource_signature(runs.resource_key)  # type: ignore[attr-defined]
    of_chain = "" if runs.chain is None else f" of chain {runs.chain}"
    return dg.sensor(
        name=runs.sensor_name(SENSOR_NAME),
        description=f"Re-requests finalized block ranges{of_chain} that a dataset has no sealed "
        "version of, or whose alert evaluation failed (a failed or killed run), with backoff.",
        asset_selection=dg.AssetSelection.assets(*runs.raw_asset_keys).downstream(),
        minimum_interval_seconds=interval_s or get_settings().gap_repair_interval_s,
        default_status=(
            dg.DefaultSensorStatus.RUNNING if running else dg.DefaultSensorStatus.STOPPED
        ),
    )(gap_repair_sensor)
