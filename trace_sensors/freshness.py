"""Head freshness in Dagster: the open range's appends as observations, and a freshness check.

The head follower appends outside Dagster (it is not a run), and its appends must not be
materializations: those would start downstream runs of a range that is not complete (the
outbox relay skips them). So this sensor reports, per head dataset, a runless
`AssetObservation` carrying the newest block committed (`trace/head_block`) and its lag
behind `finalized`, each time the head block moved; and a runless evaluation of the
dataset's `head_freshness` check (declared by `trace_assets/head/checks.py`, which also runs
it on demand) each time it is observed or its outcome changes: it fails when the dataset is
more than `TRACE_HEAD_MAX_LAG_BLOCKS` blocks or `TRACE_HEAD_MAX_LAG_S` seconds behind.
What the sensor needs from the assets (the head datasets) is handed to its builder.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

import dagster as dg

from trace_resources.failures import as_dagster_failure
from trace_resources.freshness import HEAD_FRESHNESS_CHECK, DatasetLag, dataset_lags
from trace_resources.resources import ChainResource, StateStoreResource
from trace_resources.settings import get_settings

__all__ = ["HEAD_FRESHNESS_CHECK", "build_head_freshness_sensor", "freshness_events"]


def check_evaluation(lag: DatasetLag, max_blocks: int, max_s: float) -> dg.AssetCheckEvaluation:
    passed = lag.within(max_blocks, max_s)
    if lag.head_block is None:
        text = f"nothing committed yet; the finalized head is {lag.finalized}"
    else:
        text = (
            f"{lag.lag_blocks} block(s) and {lag.lag_seconds} s behind the finalized head "
            f"{lag.finalized} (limit {max_blocks} blocks, {max_s:g} s)"
        )
    return dg.AssetCheckEvaluation(
        asset_key=dg.AssetKey(lag.dataset),
        check_name=HEAD_FRESHNESS_CHECK,
        passed=passed,
        severity=dg.AssetCheckSeverity.WARN,
        description=text,
        metadata={
            "trace/head_block": lag.head_block if lag.head_block is not None else -1,
            "trace/finalized": lag.finalized,
            "trace/lag_blocks": lag.lag_blocks if lag.lag_blocks is not None else -1,
            "trace/lag_seconds": lag.lag_seconds if lag.lag_seconds is not None else -1.0,
        },
    )


def freshness_events(
    lags: Sequence[DatasetLag], previous: dict[str, list[object]], max_blocks: int, max_s: float
) -> tuple[list[dg.AssetObservation | dg.AssetCheckEvaluation], dict[str, list[object]]]:
    """What to report given the last reported (head block, passed) per dataset."""
    events: list[dg.AssetObservation | dg.AssetCheckEvaluation] = []
    state: dict[str, list[object]] = dict(previous)
    for lag in lags:
        passed = lag.within(max_blocks, max_s)
        before = previous.get(lag.dataset)
        moved = lag.head_block is not None and (before is None or before[0] != lag.head_block)
        if moved:
            events.append(
                dg.AssetObservation(
                    asset_key=dg.AssetKey(lag.dataset),
                    description=f"committed through block {lag.head_block} (sealed or appended)",
                    metadata={
                        "trace/head_block": lag.head_block,
                        "trace/finalized": lag.finalized,
                        "trace/lag_blocks": lag.lag_blocks,
                        "trace/lag_seconds": lag.lag_seconds,
                        "trace/committed_at": lag.committed_at.isoformat()
                        if lag.committed_at
                        else None,
                    },
                )
            )
        if moved or before is None or before[1] != passed:
            events.append(check_evaluation(lag, max_blocks, max_s))
        state[lag.dataset] = [lag.head_block, passed]
    return events, state


def build_head_freshness_sensor(
    datasets: Sequence[str], running: bool = True, interval_s: int = 5
) -> dg.SensorDefinition:
    """The sensor over the head datasets, on by default (`TRACE_SENSORS_RUNNING=false`:
    stopped)."""

    def head_freshness_sensor(
        context: dg.SensorEvaluationContext, chain: ChainResource, state: StateStoreResource
    ) -> dg.SkipReason:
        settings = get_settings()
        previous = json.loads(context.cursor) if context.cursor else {}
        with as_dagster_failure():
            client = chain.client()
            try:
                lags = dataset_lags(state.versions().read, client, datasets)
            finally:
                client.close()
        events, current = freshness_events(
            lags, previous, settings.head_max_lag_blocks, settings.head_max_lag_s
        )
        for event in events:
            context.instance.report_runless_asset_event(event)
        context.update_cursor(json.dumps(current, sort_keys=True))
        behind = ", ".join(
            f"{lag.dataset} {lag.lag_blocks if lag.lag_blocks is not None else '?'}" for lag in lags
        )
        return dg.SkipReason(f"reported {len(events)} event(s); blocks behind: {behind}")

    return dg.sensor(
        name="head_freshness_sensor",
        description="Reports the head datasets' newest committed block (observations) and "
        "their head_freshness check against the chain's finalized head.",
        minimum_interval_seconds=interval_s,
        default_status=(
            dg.DefaultSensorStatus.RUNNING if running else dg.DefaultSensorStatus.STOPPED
        ),
    )(head_freshness_sensor)
