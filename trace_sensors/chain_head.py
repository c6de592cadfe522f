"""Chain-head sensor: adds the block ranges the finalized head has completed, and runs them.

Nothing past `finalized` is ever requested. The cursor is the last block already covered, so a
restarted daemon resumes where it stopped; ranges are requested in runs of up to
MAX_PARTITIONS_PER_RUN so a catch-up of hundreds of ranges is not hundreds of runs.
"""

import dagster as dg
from dagster._core.storage.tags import (
    ASSET_PARTITION_RANGE_END_TAG,
    ASSET_PARTITION_RANGE_START_TAG,
)

from trace_assets.partitions import MAX_PARTITIONS_PER_RUN, block_ranges
from trace_assets.raw.chain import RAW_ASSET_KEYS
from trace_resources.chain.ranges import BlockRange, complete_ranges
from trace_resources.failures import as_dagster_failure
from trace_resources.resources import ChainResource

__all__ = [
    "chain_head_sensor",
    "build_chain_head_sensor",
    "plan_new_ranges",
    "MAX_RANGES_PER_TICK",
]

# One tick adds at most this many ranges; the next tick continues from the cursor.
MAX_RANGES_PER_TICK = 1_000


def plan_new_ranges(cursor: str | None, finalized: int, range_size: int) -> list[BlockRange]:
    covered = int(cursor) if cursor else -1
    return complete_ranges(covered, finalized, range_size)[:MAX_RANGES_PER_TICK]


def run_requests_for(ranges: list[BlockRange]) -> list[dg.RunRequest]:
    requests = []
    for offset in range(0, len(ranges), MAX_PARTITIONS_PER_RUN):
        chunk = ranges[offset : offset + MAX_PARTITIONS_PER_RUN]
        first, last = chunk[0].key, chunk[-1].key
        if len(chunk) == 1:
            requests.append(
                dg.RunRequest(
                    run_key=f"range:{first}", partition_key=first, asset_selection=RAW_ASSET_KEYS
                )
            )
        else:
            requests.append(
                dg.RunRequest(
                    run_key=f"ranges:{first}..{last}",
                    asset_selection=RAW_ASSET_KEYS,
                    tags={
                        ASSET_PARTITION_RANGE_START_TAG: first,
                        ASSET_PARTITION_RANGE_END_TAG: last,
                    },
                )
            )
    return requests


def _evaluate(
    context: dg.SensorEvaluationContext, chain: ChainResource
) -> dg.SensorResult | dg.SkipReason:
    with as_dagster_failure():
        client = chain.client()
        try:
            head = client.head()
        finally:
            client.close()
    ranges = plan_new_ranges(context.cursor, head.finalized, chain.range_size)
    if not ranges:
        return dg.SkipReason(
            f"no complete range past block {context.cursor or -1}; "
            f"finalized head is {head.finalized}"
        )
    existing = set(context.instance.get_dynamic_partitions(block_ranges.name or ""))
    new_keys = [r.key for r in ranges if r.key not in existing]
    return dg.SensorResult(
        run_requests=run_requests_for(ranges),
        dynamic_partitions_requests=[block_ranges.build_add_request(new_keys)] if new_keys else [],
        cursor=str(ranges[-1].last),
    )


def build_chain_head_sensor(running: bool = True) -> dg.SensorDefinition:
    """The sensor, on by default; `TRACE_SENSORS_RUNNING=false` starts it stopped."""
    return dg.sensor(
        name="chain_head_sensor",
        description="Adds block-range partitions up to the finalized head and requests their runs.",
        asset_selection=RAW_ASSET_KEYS,
        minimum_interval_seconds=30,
        default_status=(
            dg.DefaultSensorStatus.RUNNING if running else dg.DefaultSensorStatus.STOPPED
        ),
    )(_evaluate)


chain_head_sensor = build_chain_head_sensor()
