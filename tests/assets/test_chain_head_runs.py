"""What the chain-head sensor's runs hold (raw + downstream block-range assets, in process, at
a high queue priority), that it never queues a second run while one still waits, and that it
starts from what is committed: ranges a CLI backfill committed, or a run is materialising, are
not requested again; a gap below is left to the gap-repair sensor."""

from __future__ import annotations

import dagster as dg
from dagster._core.storage.tags import (
    ASSET_PARTITION_RANGE_END_TAG,
    ASSET_PARTITION_RANGE_START_TAG,
    PARTITION_NAME_TAG,
    PRIORITY_TAG,
    SENSOR_NAME_TAG,
)
from dagster._core.utils import make_new_run_id

from tests.conftest import RANGE_SIZE, Devnet
from tests.utils.dagster_runs import requested_ranges
from trace_assets.definitions import (
    build_definitions,
    build_resources,
    chain_head_sensor,
    gap_repair_sensor,
)
from trace_assets.partitions import block_ranges
from trace_assets.raw.chain import RAW_ASSET_KEYS, raw_chain
from trace_resources.chain.ranges import complete_ranges
from trace_resources.instance.run_coordinator import FAST_LANE_TAG
from trace_resources.resources import StateStoreResource
from trace_resources.settings import Settings
from trace_sensors.chain_head import IN_PROCESS, SENSOR_NAME


def _context(
    instance: dg.DagsterInstance,
    settings: Settings,
    defs: dg.Definitions,
    cursor: str | None = None,
) -> dg.SensorEvaluationContext:
    resources = build_resources(settings)
    return dg.build_sensor_context(
        instance=instance,
        cursor=cursor,
        resources={"chain": resources["chain"], "state": resources["state"]},
        repository_def=defs.get_repository_def(),
    )


def test_one_run_materialises_raw_derived_and_alerts_of_the_new_ranges(
    devnet: Devnet, test_settings: Settings
) -> None:
    defs = build_definitions(test_settings)
    result = chain_head_sensor(_context(dg.DagsterInstance.ephemeral(), test_settings, defs))
    assert isinstance(result, dg.SensorResult) and result.run_requests
    for request in result.run_requests:
        keys = {k.to_user_string() for k in request.asset_selection or []}
        assert {"blocks", "transactions", "logs"} <= keys
        assert {"erc20_transfers", "native_transfers", "contracts", "alert_evaluations"} <= keys
        assert "token_daily_volume" not in keys  # not partitioned by range: automation's
        assert request.run_config == IN_PROCESS
        assert request.tags[PRIORITY_TAG] == "10"
        assert request.tags[FAST_LANE_TAG] == "true"  # launched at once when a slot is free


def test_no_new_run_while_one_is_still_queued(devnet: Devnet, test_settings: Settings) -> None:
    defs = build_definitions(test_settings)
    instance = dg.DagsterInstance.ephemeral()
    queued = dg.DagsterRun(
        job_name="__ASSET_JOB",
        run_id=make_new_run_id(),
        status=dg.DagsterRunStatus.NOT_STARTED,  # submitted, not yet launched
        tags={SENSOR_NAME_TAG: SENSOR_NAME},
    )
    instance.add_run(queued)
    skipped = chain_head_sensor(_context(instance, test_settings, defs))
    assert isinstance(skipped, dg.SkipReason)
    assert queued.run_id in (skipped.skip_message or "")

    # once it left the queue (launched, or as here cancelled), the next tick requests every
    # range finalized meanwhile
    instance.report_run_canceled(queued)
    result = chain_head_sensor(_context(instance, test_settings, defs))
    assert isinstance(result, dg.SensorResult) and result.run_requests


def test_without_a_cursor_it_starts_after_what_is_committed_or_in_flight(
    devnet: Devnet, test_settings: Settings, state: StateStoreResource
) -> None:
    """`make demo` then `make dev`: ranges a CLI-like backfill committed are not extracted
    again; the sensor requests only the ranges after them, and the gap it passes over is the
    gap-repair sensor's to request."""
    keys = [r.key for r in complete_ranges(-1, devnet.finalized, RANGE_SIZE)]
    assert len(keys) >= 6
    defs = build_definitions(test_settings)
    instance = dg.DagsterInstance.ephemeral()
    resources = build_resources(test_settings)
    # the backfill commits ranges 0-1 (one ranged run, as `dagster asset materialize
    # --partition-range` does) and 3; range 2 is missing
    instance.add_dynamic_partitions(block_ranges.name or "", [*keys[:2], keys[3]])
    backfill = {ASSET_PARTITION_RANGE_START_TAG: keys[0], ASSET_PARTITION_RANGE_END_TAG: keys[1]}
    for run in ({"tags": backfill}, {"partition_key": keys[3]}):
        assert dg.materialize([raw_chain], instance=instance, resources=resources, **run).success
    committed = state.versions().read.current_commit_modes(["blocks", "transactions", "logs"])
    assert {key for _, key in committed} == {keys[0], keys[1], keys[3]}

    result = chain_head_sensor(_context(instance, test_settings, defs))
    assert isinstance(result, dg.SensorResult)
    assert requested_ranges(result, keys) == keys[4:]  # neither the committed ranges nor the gap
    assert result.cursor == str(int(keys[-1][13:]))
    added = [k for r in result.dynamic_partitions_requests for k in r.partition_keys]
    assert added == [keys[2], *keys[4:]]  # the gap is registered for the gap-repair sensor
    # nothing was re-committed: one version per committed range and dataset
    assert {v.version for v in state.versions().read.current_versions("logs").values()} == {1}

    # the gap-repair sensor requests the gap's raw datasets, and never the committed ones'
    instance.add_dynamic_partitions(block_ranges.name or "", added)
    repairs = gap_repair_sensor(_context(instance, test_settings, defs))
    assert isinstance(repairs, dg.SensorResult)
    raw = set(RAW_ASSET_KEYS)
    with_raw = {r.partition_key for r in repairs.run_requests if raw <= set(r.asset_selection)}
    assert keys[2] in with_raw and not with_raw & {keys[0], keys[1], keys[3]}

    # a run already materialising range 4 (e.g. a backfill launched from the UI): not requested
    # again either
    instance.add_run(
        dg.DagsterRun(
            job_name="__ASSET_JOB",
            run_id=make_new_run_id(),
            status=dg.DagsterRunStatus.STARTED,
            asset_selection=frozenset(RAW_ASSET_KEYS),
            tags={PARTITION_NAME_TAG: keys[4]},
        )
    )
    after_run = chain_head_sensor(_context(instance, test_settings, defs))
    assert isinstance(after_run, dg.SensorResult)
    assert requested_ranges(after_run, keys) == keys[5:]

    # past a cursor too: from range 3 on, the committed range 3 and the range in flight are
    # passed over
    cursor = str(int(keys[2][13:]))
    ticked = chain_head_sensor(_context(instance, test_settings, defs, cursor=cursor))
    assert isinstance(ticked, dg.SensorResult)
    assert requested_ranges(ticked, keys) == keys[5:]
    assert ticked.cursor == result.cursor and not ticked.dynamic_partitions_requests
