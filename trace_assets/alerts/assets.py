"""`alert_evaluations`: evaluates every enabled alert rule over each newly committed range.

Downstream of `erc20_transfers` and `native_transfers` (eager automation: a committed version,
recorded by its run or relayed from the outbox, triggers it). It reads the current versions
of the range (pinned), publishes one buffer message per alert, and, when the range was
re-committed, a retraction for each alert the new version no longer raises. Publishing twice
(a retried step) is harmless: the sink keeps one row per dedupe_key.
"""

import dagster as dg

from trace_assets.alerts.evaluate import RangeData, evaluate_range, retractions
from trace_assets.partitions import block_ranges
from trace_assets.registry import arrow_schema, declarations
from trace_resources.buffer.resource import AlertsResource, previous_alerts
from trace_resources.buffer.rules import ALERT_DATASETS
from trace_resources.failures import as_dagster_failure
from trace_resources.resources import ObjectStoreResource, StateStoreResource
from trace_resources.storage.commit import DatasetReader

__all__ = ["alert_evaluations", "read_range"]


def read_range(reader: DatasetReader, partition_key: str) -> RangeData:
    """The current committed version of each alert dataset for one range (absent: skipped)."""
    tables = {}
    for dataset in ALERT_DATASETS:
        with reader.pinned(dataset, [partition_key]) as records:
            record = records.get(partition_key)
            if record is None:
                continue
            schema = arrow_schema(declarations()[dataset])
            tables[dataset] = (record.version, reader.read_versions([record], schema))
    return RangeData(partition_key, tables)


@dg.asset(
    name="alert_evaluations",
    description="Alerts of every enabled rule over each committed block range, published to "
    "the alert buffer (SQS) with a dedupe_key; retractions when a range is re-committed.",
    deps=list(ALERT_DATASETS),
    partitions_def=block_ranges,
    automation_condition=dg.AutomationCondition.eager(),
    group_name="alerts",
    kinds={"sqs", "postgres"},
)
def alert_evaluations(
    context: dg.AssetExecutionContext,
    state: StateStoreResource,
    objects: ObjectStoreResource,
    alerts: AlertsResource,
) -> dg.MaterializeResult:
    key = context.partition_key
    with as_dagster_failure():
        data = read_range(state.reader(objects), key)
        rules = alerts.rules().latest(enabled_only=True)
        messages = evaluate_range(rules, data)
        in_force = {(r.rule.org, r.rule.id): r.version for r in rules}
        retracted = retractions(previous_alerts(alerts.engine(), key, in_force), messages, data)
        sent = alerts.buffer().send([*messages, *retracted])
    context.log.info(f"{key}: {len(messages)} alert(s), {len(retracted)} retraction(s)")
    return dg.MaterializeResult(
        metadata={
            "trace/alerts": len(messages),
            "trace/retractions": len(retracted),
            "trace/messages_sent": sent,
            "trace/rules": len(rules),
            "trace/dataset_versions": dg.MetadataValue.json(data.versions),
        }
    )
