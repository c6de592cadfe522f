"""Declared triggers in Dagster (`TRACE_TRIGGERS`, `trace_resources.triggers`):

    file      `trigger__<name>` sensor: each object landing under the prefix, once, becomes the
              next version of the organisation's enrichment dataset (`trace enrich upload`'s
              commit) or a run request of the job (run key: trigger, key and object version)
    webhook   `trigger__<name>` sensor: each call `POST /v1/triggers/{name}` recorded, once,
              becomes a run request of the job (cursor: the last call id)
    schedule  `trigger__<name>` ScheduleDefinition of the job at the cron expression
    composite `trigger__<name>` sensor: each standing firing of the organisation's composite
              alert rule (its version in force), once, becomes a run request of the job (run
              key: trigger and the firing's dedupe key; tags: the correlation key, window and
              rule version)

Each object (or firing) once, across restarts: one acted on is a row of `trace_trigger_objects`. A
run request is recorded there one tick later, when its tick (cursor and run request, which
Dagster stores together) has been stored: a tick lost in between is requested again under the
same run key, which Dagster runs once.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from typing import Any

import dagster as dg
import sqlalchemy as sa

from trace_resources.alert_pipeline.composite import RuleRef, load_firings
from trace_resources.alert_pipeline.resource import AlertsResource
from trace_resources.errors import ConfigError
from trace_resources.resources import ObjectStoreResource, StateStoreResource
from trace_resources.settings import get_settings
from trace_resources.storage import triggers as table
from trace_resources.storage.history import CORRELATION_TAG, process_name
from trace_resources.storage.object_store import ObjectInfo, ObjectStore
from trace_resources.storage.state import engine_for
from trace_resources.triggers import (
    CompositeTrigger,
    FileTrigger,
    ScheduleTrigger,
    WebhookTrigger,
    split_prefix,
)

__all__ = [
    "definition_name",
    "object_version",
    "build_file_arrival_sensor",
    "build_webhook_sensor",
    "build_trigger_schedule",
    "build_composite_sensor",
    "build_triggers",
]

PER_TICK = 50  # objects or calls acted on per tick; the rest wait for the next one
_STATUS = {True: dg.DefaultSensorStatus.RUNNING, False: dg.DefaultSensorStatus.STOPPED}


def definition_name(trigger_name: str) -> str:
    """The sensor's or schedule's name: `trigger__labels_drop` for `labels-drop`."""
    return "trigger__" + trigger_name.replace("-", "_")


def object_version(info: ObjectInfo) -> str:
    """What tells a rewritten object from the one acted on: its size and last-modified time."""
    modified = info.modified.isoformat() if info.modified is not None else "-"
    return f"{info.size}@{modified}"


def origin_id(trigger_name: str, what: str) -> str:
    """The correlation id of the work a trigger requested for one object or firing:
    `trigger:<name>:<digest>`, the same on every tick (message history)."""
    return f"trigger:{trigger_name}:{hashlib.sha256(what.encode()).hexdigest()[:24]}"


def _record_requested(
    engine: sa.Engine,
    trigger_name: str,
    cursor: str | None,
    hop: Callable[[str, str], dict[str, Any]],
) -> None:
    """Record the objects (or firings) whose run requests the cursor lists: their tick was
    stored with it, so now they are acted on, each with the origin hop of its run's work."""
    for key, version in json.loads(cursor or "[]"):
        table.record_object(engine, trigger_name, key, version, "run requested", hop(key, version))


def _origin_hop(
    trigger_name: str, hop: str, org: str, what: str, details: dict[str, Any]
) -> dict[str, Any]:
    """The origin hop of a requested run, recorded with the object it was requested for."""
    return {
        "correlation_id": origin_id(trigger_name, what),
        "hop": hop,
        "process": process_name("sensor"),
        "org": org,
        "details": {"trigger": trigger_name, **details},
    }


def _commit_enrichment(
    trigger: FileTrigger, source: ObjectStore, objects: ObjectStoreResource, dsn: str, key: str
) -> str:
    """The object's rows as the enrichment's next version; the outcome to record."""
    from trace_resources.udfs.enrichments import (
        EnrichmentError,
        Limits,
        detect_format,
        parse_schema,
        upload,
    )

    assert trigger.enrichment is not None
    limits = Limits.from_settings(get_settings())
    data = source.get_bytes(key)
    try:
        done = upload(
            engine_for(dsn),
            objects.datasets(),
            org=trigger.org,
            name=trigger.enrichment,
            data=data,
            fmt=detect_format(data, "parquet" if key.endswith(".parquet") else None),
            schema=parse_schema(trigger.schema_, limits) if trigger.schema_ else None,
            uploaded_by=f"trigger:{trigger.name}",
            limits=limits,
        )
    except EnrichmentError as exc:  # a bad file is refused once, not retried every tick
        return f"refused: {exc}"
    return f"committed {done.dataset} version {done.version} ({done.rows} rows)"


def build_file_arrival_sensor(
    trigger: FileTrigger, running: bool = True, interval_s: int = 30
) -> dg.SensorDefinition:
    """Objects landing under `trigger.prefix`: enrichment commits or run requests, each once."""
    bucket, prefix = split_prefix(trigger.prefix)

    def file_arrival(
        context: dg.SensorEvaluationContext, objects: ObjectStoreResource, state: StateStoreResource
    ) -> dg.SensorResult:
        engine = engine_for(state.dsn)
        _record_requested(
            engine,
            trigger.name,
            context.cursor,
            lambda key, version: _origin_hop(
                trigger.name,
                "file.arrived",
                trigger.org,
                f"{key}@{version}",
                {"prefix": trigger.prefix, "key": key, "version": version},
            ),
        )
        seen = table.seen_objects(engine, trigger.name)
        source = objects.bucket(bucket)
        arrived = [
            (info.key, object_version(info))
            for info in source.list_objects(prefix)
            if (info.key, object_version(info)) not in seen
        ][:PER_TICK]
        if trigger.job is not None:
            runs = [
                dg.RunRequest(
                    run_key=f"{trigger.name}:{key}:{version}",
                    job_name=trigger.job,
                    tags={
                        "trace/trigger": trigger.name,
                        "trace/object_key": key,
                        CORRELATION_TAG: origin_id(trigger.name, f"{key}@{version}"),
                    },
                )
                for key, version in arrived
            ]
            return dg.SensorResult(run_requests=runs, cursor=json.dumps(arrived))
        for key, version in arrived:
            outcome = _commit_enrichment(trigger, source, objects, state.dsn, key)
            table.record_object(engine, trigger.name, key, version, outcome)
            context.log.info(f"{trigger.prefix}{key[len(prefix) :]}: {outcome}")
        return dg.SensorResult(cursor="[]")

    return dg.sensor(
        name=definition_name(trigger.name),
        description=f"File arrival under {trigger.prefix}: "
        + (
            f"each object becomes the next version of org_{trigger.org}__{trigger.enrichment}"
            if trigger.enrichment
            else f"each object requests a run of {trigger.job}"
        ),
        job_name=trigger.job,
        minimum_interval_seconds=interval_s,
        default_status=_STATUS[running],
    )(file_arrival)


def _call_tags(call: table.TriggerCall) -> dict[str, str]:
    tags = {
        "trace/trigger": call.trigger,
        "trace/trigger_call": str(call.id),
        "trace/idempotency_key": call.idempotency_key,
        "trace/requested_by": f"{call.org}/{call.subject}",
        CORRELATION_TAG: table.call_correlation_id(call),  # its `trigger.called` hop's id
    }
    payload = json.dumps(call.payload, sort_keys=True)
    if call.payload and len(payload) <= 4096:
        tags["trace/trigger_payload"] = payload
    return tags


def build_webhook_sensor(
    trigger: WebhookTrigger, running: bool = True, interval_s: int = 10
) -> dg.SensorDefinition:
    """Each recorded call of the webhook trigger, once, as a run request of its job."""

    def webhook(context: dg.SensorEvaluationContext, state: StateStoreResource) -> dg.SensorResult:
        after = int(context.cursor or 0)
        found = table.calls_after(engine_for(state.dsn), trigger.name, after, PER_TICK)
        runs = [
            dg.RunRequest(
                run_key=f"{trigger.name}:call:{call.id}",
                job_name=trigger.job,
                tags=_call_tags(call),
            )
            for call in found
        ]
        last = found[-1].id if found else after
        return dg.SensorResult(run_requests=runs, cursor=str(last))

    return dg.sensor(
        name=definition_name(trigger.name),
        description=f"Webhook POST /v1/triggers/{trigger.name}: each call requests a run of "
        f"{trigger.job}",
        job_name=trigger.job,
        minimum_interval_seconds=interval_s,
        default_status=_STATUS[running],
    )(webhook)


def build_composite_sensor(
    trigger: CompositeTrigger, running: bool = True, interval_s: int = 30
) -> dg.SensorDefinition:
    """Each standing firing of the composite rule's version in force, once, as a run request."""

    def composite(
        context: dg.SensorEvaluationContext, state: StateStoreResource, alerts: AlertsResource
    ) -> dg.SensorResult:
        engine = engine_for(state.dsn)
        _record_requested(
            engine,
            trigger.name,
            context.cursor,
            lambda key, _: _origin_hop(
                trigger.name,
                "composite.fired",
                trigger.org,
                key,
                {"rule": trigger.rule, "firing": key},
            ),
        )
        stored = alerts.rules().get(trigger.org, trigger.rule)
        if stored is None or stored.rule.condition.kind != "composite":
            what = "no alert rule" if stored is None else "no composite alert rule"
            return dg.SensorResult(
                skip_reason=f"{trigger.org} has {what} {trigger.rule!r}: create it with "
                "`trace alerts create` (a condition of kind composite) or fix the "
                f"TRACE_TRIGGERS entry {trigger.name!r}",
                cursor="[]",
            )
        seen = table.seen_objects(engine, trigger.name)
        firings = load_firings(alerts.engine(), RuleRef(trigger.org, trigger.rule, stored.version))
        retracted = [f for f in firings if not f.standing and (f.key, "fired") in seen]
        for firing in retracted:  # logged, not undone: the run was requested and may have run
            if table.record_object(engine, trigger.name, firing.key, "retracted", "retracted"):
                context.log.warning(
                    f"{trigger.name}: firing {firing.key[:12]} (key "
                    f"{firing.payload.get('correlation_key')}) was retracted after its run was "
                    "requested: its range was re-committed without an input event"
                )
        wanted = [
            f
            for f in firings
            if f.standing
            and (trigger.outcome == "any" or f.payload.get("outcome") == trigger.outcome)
            and (f.key, "fired") not in seen
        ]
        wanted.sort(key=lambda f: (f.payload.get("window", [0])[0], f.key))  # block order
        wanted = wanted[:PER_TICK]
        runs = [
            dg.RunRequest(
                run_key=f"{trigger.name}:{f.key}",
                job_name=trigger.job,
                tags={
                    "trace/trigger": trigger.name,
                    "trace/composite_rule": f"{trigger.org}/{trigger.rule}/v{stored.version}",
                    "trace/composite_outcome": str(f.payload.get("outcome")),
                    "trace/correlation_key": str(f.payload.get("correlation_key"))[:200],
                    "trace/window": "-".join(str(b) for b in f.payload.get("window", [])),
                    "trace/firing": f.key,
                    CORRELATION_TAG: origin_id(trigger.name, f.key),
                },
            )
            for f in wanted
        ]
        return dg.SensorResult(
            run_requests=runs, cursor=json.dumps([[f.key, "fired"] for f in wanted])
        )

    return dg.sensor(
        name=definition_name(trigger.name),
        description=f"Composite rule {trigger.org}/{trigger.rule}: each {trigger.outcome} "
        f"firing requests a run of {trigger.job}",
        job_name=trigger.job,
        minimum_interval_seconds=interval_s,
        default_status=_STATUS[running],
    )(composite)


def build_trigger_schedule(trigger: ScheduleTrigger, running: bool = True) -> dg.ScheduleDefinition:
    return dg.ScheduleDefinition(
        name=definition_name(trigger.name),
        job_name=trigger.job,
        cron_schedule=trigger.cron,
        execution_timezone=trigger.timezone,
        description=f"Declared in TRACE_TRIGGERS: {trigger.job} at {trigger.cron!r}",
        default_status=(
            dg.DefaultScheduleStatus.RUNNING if running else dg.DefaultScheduleStatus.STOPPED
        ),
        tags={"trace/trigger": trigger.name},
    )


def build_triggers(
    triggers: Sequence[Any], jobs: Sequence[str], running: bool = True
) -> tuple[list[dg.SensorDefinition], list[dg.ScheduleDefinition]]:
    """The sensors and schedules of the declared triggers; a job that the Definitions do not
    hold is refused with its name and the jobs there are."""
    sensors: list[dg.SensorDefinition] = []
    schedules: list[dg.ScheduleDefinition] = []
    for trigger in triggers:
        job = getattr(trigger, "job", None)
        if job is not None and job not in jobs:
            raise ConfigError(
                f"TRACE_TRIGGERS entry {trigger.name!r} runs job {job!r}, which is not a job of "
                f"Trace; jobs: {', '.join(sorted(jobs))}"
            )
        if isinstance(trigger, FileTrigger):
            sensors.append(build_file_arrival_sensor(trigger, running))
        elif isinstance(trigger, WebhookTrigger):
            sensors.append(build_webhook_sensor(trigger, running))
        elif isinstance(trigger, CompositeTrigger):
            sensors.append(build_composite_sensor(trigger, running))
        else:
            schedules.append(build_trigger_schedule(trigger, running))
    return sensors, schedules
