"""What the chain-head sensor's runs hold (raw + downstream block-range assets, in process, at
a high queue priority), and that it never queues a second run while one still waits."""

from __future__ import annotations

import dagster as dg
from dagster._core.storage.tags import PRIORITY_TAG, SENSOR_NAME_TAG
from dagster._core.utils import make_new_run_id

from tests.conftest import Devnet
from trace_assets.definitions import build_definitions, build_resources, chain_head_sensor
from trace_resources.instance.run_coordinator import FAST_LANE_TAG
from trace_resources.settings import Settings
from trace_sensors.chain_head import IN_PROCESS, SENSOR_NAME


def _context(
    instance: dg.DagsterInstance, settings: Settings, defs: dg.Definitions
) -> dg.SensorEvaluationContext:
    chain = build_resources(settings)["chain"]
    return dg.build_sensor_context(
        instance=instance,
        resources={"chain": chain},
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
