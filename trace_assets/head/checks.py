"""The `head_freshness` check of each head dataset: is it within TRACE_HEAD_MAX_LAG_BLOCKS
blocks and TRACE_HEAD_MAX_LAG_S seconds of the chain's finalized head? The freshness sensor
(`trace_sensors/freshness.py`) reports it as the follower appends; it also runs on demand
from the UI or the CLI."""

from collections.abc import Iterator

import dagster as dg

from trace_assets.head.follower import HEAD_DATASETS
from trace_resources.failures import as_dagster_failure
from trace_resources.freshness import HEAD_FRESHNESS_CHECK, dataset_lags
from trace_resources.resources import ChainResource, StateStoreResource
from trace_resources.settings import get_settings

__all__ = ["HEAD_FRESHNESS_CHECK", "head_freshness_checks"]


@dg.multi_asset_check(
    specs=[
        dg.AssetCheckSpec(
            HEAD_FRESHNESS_CHECK,
            asset=name,
            description="Within TRACE_HEAD_MAX_LAG_BLOCKS blocks and TRACE_HEAD_MAX_LAG_S "
            "seconds of the chain's finalized head (the head follower keeps it there).",
        )
        for name in HEAD_DATASETS
    ],
    name="head_freshness_checks",
    # a job selecting some of the datasets (e.g. the raw ones) runs only their checks
    can_subset=True,
)
def head_freshness_checks(
    context: dg.AssetCheckExecutionContext, chain: ChainResource, state: StateStoreResource
) -> Iterator[dg.AssetCheckResult]:
    settings = get_settings()
    selected = {key.asset_key.to_user_string() for key in context.selected_asset_check_keys}
    with as_dagster_failure():
        client = chain.client()
        try:
            lags = dataset_lags(
                state.versions().read, client, [n for n in HEAD_DATASETS if n in selected]
            )
        finally:
            client.close()
    for lag in lags:
        passed = lag.within(settings.head_max_lag_blocks, settings.head_max_lag_s)
        yield dg.AssetCheckResult(
            asset_key=lag.dataset,
            check_name=HEAD_FRESHNESS_CHECK,
            passed=passed,
            severity=dg.AssetCheckSeverity.WARN,
            description=(
                f"{lag.lag_blocks} block(s), {lag.lag_seconds} s behind finalized {lag.finalized}"
                if lag.head_block is not None
                else f"nothing committed; finalized head {lag.finalized}"
            ),
            metadata={
                "trace/finalized": lag.finalized,
                "trace/head_block": lag.head_block if lag.head_block is not None else -1,
                "trace/lag_blocks": lag.lag_blocks if lag.lag_blocks is not None else -1,
                "trace/lag_seconds": lag.lag_seconds if lag.lag_seconds is not None else -1.0,
            },
        )
