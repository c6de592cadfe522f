"""Committed versions trigger alert evaluation: the automation (the conditions the
`trace_automation_sensor` evaluates) requests `alert_evaluations` of exactly the ranges whose
alert datasets (or another dataset a custom SQL condition may read for the range) got a new
committed version — recorded by the run that committed it, or only relayed from the outbox
because Dagster never recorded it."""

from __future__ import annotations

import dagster as dg
import pyarrow as pa
import pyarrow.compute as pc
import pytest

from tests.derived.conftest import ALL_ASSETS, Env, aws_env, derived_env, raw_env  # noqa: F401
from trace_assets.checks import DATASET_CHECKS
from trace_assets.definitions import build_definitions
from trace_assets.derived.transforms import TRANSFER_TOPIC
from trace_resources.registry import arrow_schema, declarations
from trace_resources.storage.commit import PartitionData
from trace_sensors.outbox import build_outbox_relay_sensor

ALERTS = dg.AssetKey("alert_evaluations")


def recommit(env: Env, dataset: str, key: str) -> None:
    """Materialise one range of one derived dataset again, as an operator would."""
    result = dg.materialize(
        [*ALL_ASSETS, *DATASET_CHECKS],
        instance=env.instance,
        resources=env.resources(),
        partition_key=key,
        selection=dg.AssetSelection.assets(dataset),
    )
    assert result.success


def requested(result: dg.EvaluateAutomationConditionsResult) -> set[str]:
    return {str(key) for key in result.get_requested_partitions(ALERTS)}


# dagster 1.13.27's own evaluate_automation_conditions selects with a beta parameter
@pytest.mark.filterwarnings("ignore:Parameter `include_sources` of function `AssetSelection.all`")
def test_committed_versions_request_alert_evaluation_of_their_range(
    derived_env: Env,  # noqa: F811
) -> None:
    env = derived_env
    defs = build_definitions(env.settings)
    instance = env.instance
    first, second = env.keys[0], env.keys[1]
    versions = env.state.versions()

    # one range's logs lose a Transfer (a new logs version, relayed to Dagster before
    # alerting is deployed), so re-committing its erc20_transfers below makes a new version
    # (identical data would be kept as it is, with no new version)
    logs = env.reader.read("logs", [first])
    transfers = pc.equal(
        logs.column("topic0"), pa.scalar(TRANSFER_TOPIC, logs.schema.field("topic0").type)
    )
    last_transfer = max(i for i, t in enumerate(transfers.to_pylist()) if t)
    fewer = pa.concat_tables([logs.slice(0, last_transfer), logs.slice(last_transfer + 1)])
    source = versions.read.current_versions("logs", [first])[first].manifest.source
    with env.state.writer(env.objects) as writer:
        writer.write("logs", first, PartitionData(fewer, source=source))
    relay = build_outbox_relay_sensor()
    context = dg.build_sensor_context(
        instance=instance, resources={"state": env.state}, definitions=defs
    )
    assert isinstance(relay(context), dg.SensorResult)

    # the automation's first evaluation is Dagster's baseline (eager's `since_last_handled`
    # treats the initial evaluation as handled): ranges committed before alerting was
    # deployed are not evaluated retroactively (`trace alerts backtest` covers history)
    tick = dg.evaluate_automation_conditions(defs=defs, instance=instance)
    assert requested(tick) == set()

    # a re-commit of that range's erc20_transfers, recorded by its run
    before = versions.read.current_version_numbers("erc20_transfers", [first])[first]
    recommit(env, "erc20_transfers", first)
    assert versions.read.current_version_numbers("erc20_transfers", [first])[first] == before + 1
    tick = dg.evaluate_automation_conditions(defs=defs, instance=instance, cursor=tick.cursor)
    assert requested(tick) == {first}

    tick = dg.evaluate_automation_conditions(defs=defs, instance=instance, cursor=tick.cursor)
    assert requested(tick) == set()  # that request is handled: eager() would react again

    # the same range re-derived from the same data: the commit is unchanged (the version is
    # kept, `trace/unchanged`) and reports the data version it had (the committed content's
    # hash), so the automation requests nothing
    recommit(env, "erc20_transfers", first)
    assert versions.read.current_version_numbers("erc20_transfers", [first])[first] == before + 1
    [latest] = instance.fetch_materializations(
        dg.AssetRecordsFilter(asset_key=dg.AssetKey("erc20_transfers"), asset_partitions=[first]),
        limit=1,
    ).records
    assert latest.asset_materialization.metadata["trace/unchanged"].value is True  # type: ignore[union-attr]
    tick = dg.evaluate_automation_conditions(defs=defs, instance=instance, cursor=tick.cursor)
    assert requested(tick) == set()

    # a re-commit of another range's native_transfers that Dagster never recorded (its step
    # died after the commit): invisible to the automation until the outbox relay reports it
    schema = arrow_schema(declarations()["native_transfers"])
    table = env.reader.read("native_transfers", [second], schema)
    assert table.num_rows > 1
    with env.state.writer(env.objects) as writer:  # one row fewer: a new version
        committed = writer.write("native_transfers", second, PartitionData(table.slice(1)))
    assert not committed.unchanged
    tick = dg.evaluate_automation_conditions(defs=defs, instance=instance, cursor=tick.cursor)
    assert requested(tick) == set()
    relayed = relay(context)
    assert isinstance(relayed, dg.SensorResult), relayed
    assert relayed.skip_reason is not None and relayed.skip_reason.skip_message is not None
    assert relayed.skip_reason.skip_message.startswith("relayed 1 committed version(s)")
    [record] = instance.fetch_materializations(
        dg.AssetRecordsFilter(asset_key=dg.AssetKey("native_transfers"), asset_partitions=[second]),
        limit=1,
    ).records
    metadata = record.asset_materialization.metadata  # type: ignore[union-attr]
    assert metadata["trace/version"].value == committed.version.version
    tick = dg.evaluate_automation_conditions(defs=defs, instance=instance, cursor=tick.cursor)
    assert requested(tick) == {second}
    tick = dg.evaluate_automation_conditions(defs=defs, instance=instance, cursor=tick.cursor)
    assert requested(tick) == set()

    # a re-commit of a third range's contracts: not an alert dataset, but a custom SQL
    # condition may read it for the range, so the range is evaluated again
    third = env.keys[2]
    recommit(env, "contracts", third)
    tick = dg.evaluate_automation_conditions(defs=defs, instance=instance, cursor=tick.cursor)
    assert requested(tick) == {third}
