"""`alert_evaluations`: evaluates every enabled alert rule over each newly committed range.

Downstream of `erc20_transfers` and `native_transfers` (eager automation on data versions,
`trace_assets.automation.on_new_data`: a new committed version, recorded by its run or relayed
from the outbox, triggers it; a commit identical to the current version does not). It reads
the current versions of the range (pinned) — the alert datasets, plus every dataset a custom
SQL condition reads that its organisation may read (`scope.py`) — and publishes one buffer
message per alert.
Against the evaluation ledger it publishes a retraction for each standing alert the current
version no longer raises, and a new generation of an alert that was retracted and is raised
again (`evaluate.reconcile`). Publishing twice (a retried step) is harmless: the sink keeps
one row per dedupe_key, and the ledger is written only after the messages were published.
"""

import dataclasses
import json
from collections.abc import Callable, Iterable, Sequence

import dagster as dg
import sqlalchemy as sa
from opentelemetry import trace

from trace_assets.alerts.composite import evaluate_composite
from trace_assets.alerts.evaluate import (
    Plan,
    RangeData,
    evaluate_rules,
    reconcile,
)
from trace_assets.alerts.scope import AlertScope, load_range, referenced
from trace_assets.automation import on_new_data
from trace_assets.derived.assets import needs_traces
from trace_assets.partitions import block_ranges
from trace_resources.alert_pipeline.composite import RuleRef, composite_lock, save_firings
from trace_resources.alert_pipeline.queue import BufferMessage
from trace_resources.alert_pipeline.resource import (
    AlertsResource,
    evaluation_lock,
    load_ledger,
    save_ledger,
)
from trace_resources.alert_pipeline.rules import (
    ALERT_DATASETS,
    Composite,
    CustomSql,
    StoredRule,
)
from trace_resources.event_history import CORRELATION_ID
from trace_resources.failures import as_dagster_failure
from trace_resources.registry import DEFAULT_OWNER, declarations
from trace_resources.resources import ObjectStoreResource, StateStoreResource
from trace_resources.settings import get_settings
from trace_resources.storage.commit import DatasetReader
from trace_resources.storage.outbox import correlations
from trace_resources.telemetry import TRACEPARENT, Tracing

__all__ = ["EVALUATION_DEPS", "alert_evaluations", "evaluate_partition", "read_range"]

# What an evaluation of a range reads: the alert datasets, and every other public derived
# dataset partitioned by block range, which a custom SQL condition may read for the range. As
# dependencies they are committed before the evaluation in a run that holds both (the
# chain-head run), and a new version of any of them re-evaluates the range (`on_new_data`).
EVALUATION_DEPS: list[str] = [
    *ALERT_DATASETS,
    *sorted(
        name
        for name, decl in declarations().items()
        if decl.kind == "derived"
        and decl.partitioning == "block_range"
        and decl.public
        and name not in ALERT_DATASETS
        # not those from call traces: a deployment without debug_* never has them, and an
        # evaluation that waited for them would never run (eager() waits for every dependency)
        and not needs_traces(decl)
    ),
]


def read_range(reader: DatasetReader, partition_key: str, extra: Iterable[str] = ()) -> RangeData:
    """The current committed version of each alert dataset (and of `extra`) for one range."""
    loaded = load_range(reader, partition_key, [*ALERT_DATASETS, *extra])
    return RangeData(loaded.partition_key, loaded.tables, loaded.missing)


def evaluate_partition(
    key: str,
    rules: list[StoredRule],
    reader: DatasetReader,
    scope: AlertScope,
    alerts: AlertsResource,
    tracing: Tracing | None = None,
) -> tuple[RangeData, Plan, dict[str, str]]:
    """Evaluate, publish and record one range (the asset's work, without Dagster). With
    `tracing` on, the range's evaluation is a span (`alerts.evaluate`, with the correlation id
    of the versions it read) whose traceparent the messages carry to the sink and deliverer."""
    tracing = tracing or Tracing("trace-alert-evaluations")  # off: the no-op tracer
    with tracing.span("alerts.evaluate", {"partition": key, "rules": len(rules)}) as span:
        data, plan, errors = _evaluate(key, rules, reader, scope, alerts, tracing)
        span.set_attribute("alert.messages", len(plan.messages))
    return data, plan, errors


def _evaluate(
    key: str,
    rules: list[StoredRule],
    reader: DatasetReader,
    scope: AlertScope,
    alerts: AlertsResource,
    tracing: Tracing,
) -> tuple[RangeData, Plan, dict[str, str]]:
    extra = {  # the datasets custom SQL conditions read, where their org may read them
        name
        for stored in rules
        if stored.rule.enabled and isinstance(stored.rule.condition, CustomSql)
        for name in referenced(stored.rule)
        if name in scope.readable(stored.rule.org)
    }
    engine = alerts.engine()
    in_force = {(r.rule.org, r.rule.id): r.version for r in rules}
    with evaluation_lock(engine, key):
        data = read_range(reader, key, extra)
        correlated = _correlation_of(reader, data, tracing)
        evaluation = evaluate_rules(rules, data, scope.refusals)
        previous = load_ledger(engine, key, in_force)
        plan = reconcile(previous, evaluation.messages, data, evaluation.skipped)
        alerts.buffer().send(correlated(plan.messages))
        save_ledger(engine, key, plan.ledger)
        for stored in rules:
            if stored.rule.enabled and isinstance(stored.rule.condition, Composite):
                plan = _merged(plan, _composite(engine, stored, data, alerts, correlated))
    return data, plan, evaluation.errors


def _correlation_of(
    reader: DatasetReader, data: RangeData, tracing: Tracing
) -> Callable[[Sequence[BufferMessage]], list[BufferMessage]]:
    """What carries the unit of work that committed the range's versions to the alerts raised
    from them (message history): each message gets the correlation id its dataset's version
    was committed under or, for a message of no one dataset (a composite firing), the one id
    all the range's versions share; none if they carry none. And the evaluation span's
    traceparent, when tracing is on."""
    versions = {name: version for name, (version, _) in data.tables.items()}
    found = correlations(
        reader.versions.engine, [(n, data.partition_key, v) for n, v in versions.items()]
    )
    by_dataset = {
        n: found[(n, data.partition_key, v)]
        for n, v in versions.items()
        if (n, data.partition_key, v) in found
    }
    shared = set(by_dataset.values())
    fallback = shared.pop() if len(shared) == 1 else None
    if by_dataset:  # the evaluation's span names the work it continues
        ids = sorted(set(by_dataset.values()))
        trace.get_current_span().set_attribute("trace.correlation_ids", ids)
    parent = tracing.traceparent()

    def carry(messages: Sequence[BufferMessage]) -> list[BufferMessage]:
        out = []
        for message in messages:
            carried: dict[str, str] = {}
            correlation_id = by_dataset.get(str(message.payload.get("dataset")), fallback)
            if correlation_id is not None and CORRELATION_ID not in message.destination:
                carried[CORRELATION_ID] = correlation_id
            if parent is not None and TRACEPARENT not in message.destination:
                carried[TRACEPARENT] = parent
            if not carried:
                out.append(message)
                continue
            destination = {**message.destination, **carried}
            out.append(dataclasses.replace(message, destination=destination))
        return out

    return carry


def _composite(
    engine: sa.Engine,
    stored: StoredRule,
    data: RangeData,
    alerts: AlertsResource,
    correlated: Callable[[Sequence[BufferMessage]], list[BufferMessage]],
) -> Plan:
    """Evaluate one composite rule with this range, publish, record (under the rule's lock:
    its firings span ranges)."""
    ref = RuleRef(stored.rule.org, stored.rule.id, stored.version)
    with composite_lock(engine, ref):
        plan = evaluate_composite(engine, stored, data)
        alerts.buffer().send(correlated(plan.messages))
        save_firings(engine, plan.ledger)
    return plan


def _merged(a: Plan, b: Plan) -> Plan:
    return Plan(
        [*a.alerts, *b.alerts],
        [*a.retractions, *b.retractions],
        [*a.ledger, *b.ledger],
        a.new + b.new,
        a.standing | b.standing,
    )


@dg.multi_asset(
    name="alert_evaluations",
    specs=[
        dg.AssetSpec(
            "alert_evaluations",
            description="Alerts of every enabled rule over each committed block range, "
            "published to the alert buffer (SQS) with a dedupe_key; retractions when a range "
            "is re-committed.",
            deps=EVALUATION_DEPS,
            automation_condition=on_new_data(),
            group_name="alerts",
            kinds={"sqs", "postgres"},
            owners=[DEFAULT_OWNER],
        )
    ],
    partitions_def=block_ranges,
    # a backfill (or an automation request) of many ranges is one run, evaluated range by range
    # (on @multi_asset the policy is stable; on @asset Dagster flags it beta)
    backfill_policy=dg.BackfillPolicy.single_run(),
)
def alert_evaluations(
    context: dg.AssetExecutionContext,
    state: StateStoreResource,
    objects: ObjectStoreResource,
    alerts: AlertsResource,
) -> dg.MaterializeResult:
    keys = context.partition_keys
    totals = {"alerts": 0, "new": 0, "retractions": 0, "sent": 0}
    versions: dict[str, dict[str, int]] = {}
    all_errors: dict[str, dict[str, str]] = {}
    tracing = Tracing.configured("trace-alert-evaluations", get_settings().otlp_endpoint)
    try:
        with as_dagster_failure():
            rules = alerts.rules().latest(enabled_only=True)
            scope = AlertScope(state.dsn)
            reader = state.reader(objects)
            for key in keys:
                data, plan, errors = evaluate_partition(key, rules, reader, scope, alerts, tracing)
                for rule_key, error in sorted(errors.items()):
                    context.log.warning(f"{key}: rule {rule_key} not evaluated: {error}")
                    all_errors.setdefault(key, {})[rule_key] = error
                context.log.info(
                    f"{key}: {len(plan.alerts)} alert(s) ({plan.new} new), "
                    f"{len(plan.retractions)} retraction(s), from versions {data.versions}"
                )
                totals["alerts"] += len(plan.alerts)
                totals["new"] += plan.new
                totals["retractions"] += len(plan.retractions)
                totals["sent"] += len(plan.messages)
                versions[key] = data.versions
    finally:
        tracing.shutdown()  # the step's spans exported, the exporter's thread stopped
    return dg.MaterializeResult(
        metadata={
            "trace/alerts": totals["alerts"],
            "trace/new_alerts": totals["new"],
            "trace/retractions": totals["retractions"],
            "trace/messages_sent": totals["sent"],
            "trace/rules": len(rules),
            # one range: by rule, and its versions; a ranged run: per range
            "trace/rule_errors": dg.MetadataValue.json(
                all_errors.get(keys[0], {}) if len(keys) == 1 else all_errors
            ),
            "trace/dataset_versions": dg.MetadataValue.json(
                versions[keys[0]] if len(keys) == 1 else versions
            ),
        },
        data_version=dg.DataVersion(json.dumps(versions[keys[0]], sort_keys=True))
        if len(keys) == 1
        else None,
    )
