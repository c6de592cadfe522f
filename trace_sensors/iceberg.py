"""Open tables: publishes committed versions as Apache Iceberg snapshots
(`trace_resources.storage.iceberg.IcebergPublisher`), driven by the outbox.

Every tick publishes the committed-version events not yet published, in commit order, each
as one snapshot of its dataset's table in the SQL catalog on the state database; what it
published is recorded in `trace_iceberg_published`, so a tick killed half way resumes where it
stopped without a second snapshot. Only commits write outbox events: an uncommitted or fenced
attempt is never published. Then it expires the snapshots that show a version GC has removed.
The cursor is the highest outbox id published (for the UI).
"""

from __future__ import annotations

import dagster as dg

from trace_resources.failures import as_dagster_failure
from trace_resources.resources import ObjectStoreResource, StateStoreResource

__all__ = ["build_iceberg_publish_sensor"]


def _evaluate(
    context: dg.SensorEvaluationContext, state: StateStoreResource, objects: ObjectStoreResource
) -> dg.SensorResult | dg.SkipReason:
    with as_dagster_failure():
        publisher = state.iceberg(objects)
        outcome = publisher.publish()
        expired = {} if outcome.busy else publisher.expire_unservable()
    summary = outcome.summary()
    if expired:
        summary += f"; expired {sum(map(len, expired.values()))} snapshot(s) of removed versions"
    if not outcome.published:
        return dg.SkipReason(summary)
    cursor = max(max(p.outbox_id for p in outcome.published), int(context.cursor or 0))
    return dg.SensorResult(cursor=str(cursor), skip_reason=summary)


def build_iceberg_publish_sensor(running: bool = True) -> dg.SensorDefinition:
    """The publisher, on by default; `TRACE_SENSORS_RUNNING=false` starts it stopped."""
    return dg.sensor(
        name="iceberg_publish_sensor",
        description="Publishes every committed dataset version as an Apache Iceberg snapshot "
        "(SQL catalog on the state database), so external engines read Trace's datasets as "
        "tables with its versions as time travel.",
        minimum_interval_seconds=30,
        default_status=(
            dg.DefaultSensorStatus.RUNNING if running else dg.DefaultSensorStatus.STOPPED
        ),
    )(_evaluate)
