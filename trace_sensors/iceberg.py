"""Open tables: publishes committed versions as Apache Iceberg snapshots
(`trace_resources.storage.iceberg.IcebergPublisher`), driven by the outbox.

Every tick publishes the committed-version events not yet published, in commit order, each
as one snapshot of its dataset's table in the SQL catalog on the state database; what it
published is recorded in `trace_iceberg_published`, so a tick killed half way resumes where it
stopped without a second snapshot. Only commits write outbox events: an uncommitted or fenced
attempt is never published. Then it expires the snapshots that show a version GC has removed.
The cursor is the highest outbox id published (for the UI).

The publisher is a singleton: of several copies (Dagster daemons on one state database) only
the holder of the `iceberg-publisher` leader lease publishes, renewing it at each tick
(`sensor_lease_s`); the others skip their ticks as standbys and take over once it expires. A
late tick of a copy that lost the lease has its record refused (and its Iceberg commit by the
catalog's compare-and-swap, see `trace_resources/storage/iceberg.py`).
"""

from __future__ import annotations

import dagster as dg

from trace_resources.errors import LeaseLostError
from trace_resources.failures import as_dagster_failure
from trace_resources.leases import process_lease
from trace_resources.resources import ObjectStoreResource, StateStoreResource
from trace_resources.storage.iceberg import LEASE_NAME

__all__ = ["build_iceberg_publish_sensor"]


def _evaluate(
    context: dg.SensorEvaluationContext, state: StateStoreResource, objects: ObjectStoreResource
) -> dg.SensorResult | dg.SkipReason:
    with as_dagster_failure():
        lease = process_lease(state.versions().engine, LEASE_NAME, state.sensor_lease_s)
        publisher = state.iceberg(objects, lease=lease)
        try:
            outcome = publisher.publish()
            expired = {} if outcome.busy else publisher.expire_unservable()
        except LeaseLostError as exc:
            lease.step_down()
            context.log.warning(f"fenced: {exc}")
            return dg.SkipReason(f"fenced: {exc}")
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
