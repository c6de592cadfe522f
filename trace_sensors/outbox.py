"""Outbox relay: tells Dagster about committed versions it did not record.

Every commit writes an outbox event in its own transaction. Dagster records a materialization
when `handle_output` returns, so a version can be committed and never recorded: the process
was killed between the Postgres commit and Dagster's event, or a ranged output committed some
partitions and then failed on a later one. Downstream automation would never see such a
version. This sensor reads the unrelayed events and, for each one, reports a runless
`AssetMaterialization` only when

- the version is still the partition's current one (an older, superseded version is not
  announced after a newer one),
- Dagster has not recorded a materialization of that version (the IO manager's
  `trace/versions` metadata, or an earlier relay's), and
- the run that committed it has finished (or, if it still looks in progress, the event is
  older than `outbox_settle_s`: its process was killed and nothing will record it).

Then it marks the events relayed. Reporting before marking, and checking what Dagster
recorded before reporting, make a relay killed half way harmless: the next tick finds the
report and only marks the event. So downstream automation sees each committed version once.
The cursor is the highest outbox id relayed (for the UI); the events are selected by
`relayed_at IS NULL`, because outbox ids become visible out of order.

The relay is a singleton: where several Dagster daemons share one state database, only the
copy holding the `outbox-relay` leader lease (`trace_resources/leases.py`, renewed at each
tick, `sensor_lease_s` long) relays; the others skip their ticks as standbys and take over once
it expires. Marking events relayed checks the lease's token in its own transaction, so a copy
that lost the lease (paused past it) has its late marking refused. Its reports to Dagster can
not be fenced (Dagster's event log is another database), but a relay reports only what Dagster
has not recorded, so the new holder finds them recorded and only marks them.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import dagster as dg

from trace_resources.errors import LeaseLostError
from trace_resources.failures import as_dagster_failure
from trace_resources.leases import LeaderLease, process_lease
from trace_resources.pushed_metrics import push_relay_metrics
from trace_resources.resources import StateStoreResource
from trace_resources.settings import get_settings
from trace_resources.storage.io_manager import data_version_tags
from trace_resources.storage.paths import UNPARTITIONED
from trace_resources.storage.records import COMMITTED_EVENT, OutboxEvent, VersionRecord
from trace_resources.storage.version_store import VersionStore

__all__ = [
    "RelayOutcome",
    "build_automation_sensor",
    "build_outbox_relay_sensor",
    "outbox_relay_sensor",
    "relay_outbox",
    "relay_lease",
]

BATCH = 500
LEASE_NAME = "outbox-relay"
# materializations recorded before an event's commit can not be of its version; the margin
# covers clock differences between Postgres and the Dagster instance
_CLOCK_MARGIN_S = 600.0


@dataclass
class RelayOutcome:
    relayed: list[OutboxEvent] = field(default_factory=list)
    recorded: int = 0  # Dagster had recorded the version: nothing to report
    superseded: int = 0  # a newer version is current: not announced
    not_assets: int = 0  # the dataset is no asset of this code location
    deferred: int = 0  # its run is still in progress: next tick
    appended: int = 0  # the head follower's appends to open ranges: not relayed
    cursor: int | None = None

    def counts(self) -> dict[str, int]:
        return {
            "relayed": len(self.relayed),
            "recorded": self.recorded,
            "superseded": self.superseded,
            "not_assets": self.not_assets,
            "deferred": self.deferred,
            "appended": self.appended,
        }

    def summary(self) -> str:
        return (
            f"relayed {len(self.relayed)} committed version(s) Dagster had not recorded; "
            f"{self.recorded} already recorded, {self.superseded} superseded, "
            f"{self.not_assets} not assets, {self.deferred} deferred (run in progress), "
            f"{self.appended} head appends (not relayed)"
        )


def _recorded_versions(
    instance: dg.DagsterInstance, key: dg.AssetKey, partitions: Sequence[str], since: float
) -> set[tuple[str, int]]:
    """(partition, version) pairs Dagster has materializations of, since `since`."""
    partitioned = partitions != [UNPARTITIONED]
    records_filter = dg.AssetRecordsFilter(
        asset_key=key,
        asset_partitions=list(partitions) if partitioned else None,
        after_timestamp=since,
    )
    found: set[tuple[str, int]] = set()
    cursor = None
    while True:
        page = instance.fetch_materializations(records_filter, limit=1000, cursor=cursor)
        for record in page.records:
            materialization = record.asset_materialization
            if materialization is None:
                continue
            partition = materialization.partition or UNPARTITIONED
            metadata: dict[str, Any] = {
                k: getattr(v, "value", v) for k, v in materialization.metadata.items()
            }
            by_partition = metadata.get("trace/versions")
            if isinstance(by_partition, dict) and partition in by_partition:
                found.add((partition, int(by_partition[partition])))
            elif "trace/version" in metadata:
                found.add((partition, int(metadata["trace/version"])))
        if not page.has_more:
            return found
        cursor = page.cursor


class _RunStates:
    def __init__(self, instance: dg.DagsterInstance) -> None:
        self.instance = instance
        self.in_progress: dict[str, bool] = {}

    def __call__(self, run_id: str | None) -> bool:
        """Whether the run is known to this instance and not finished."""
        if not run_id:
            return False
        if run_id not in self.in_progress:
            run = self.instance.get_run_by_id(run_id)
            self.in_progress[run_id] = run is not None and not run.is_finished
        return self.in_progress[run_id]


def _materialization(event: OutboxEvent, version: VersionRecord) -> dg.AssetMaterialization:
    payload = event.payload
    return dg.AssetMaterialization(
        asset_key=dg.AssetKey(event.dataset),
        partition=None if event.partition_key == UNPARTITIONED else event.partition_key,
        description="committed by a step that did not record it; relayed from the outbox",
        metadata={
            "trace/version": event.version,
            "trace/versions": dg.MetadataValue.json({event.partition_key: event.version}),
            "trace/relayed_from_outbox": event.id,
            "trace/attempt_id": str(payload.get("attempt_id")),
            "trace/committed_by_run": str(payload.get("run_id")),
            "dagster/row_count": int(payload.get("rows") or 0),
        },
        # the committed content's hash, as the run would have reported it: downstream
        # automation reacts to a new data version
        tags=data_version_tags(version),
    )


def _head_append(event: OutboxEvent) -> bool:
    """An append to a block-range partition (the head follower's), not a version to relay."""
    return event.payload.get("mode") == "append" and event.partition_key != UNPARTITIONED


def relay_outbox(
    instance: dg.DagsterInstance,
    versions: VersionStore,
    *,
    known_assets: Iterable[dg.AssetKey] | None = None,
    settle_s: float = 300.0,
    limit: int = BATCH,
    lease: LeaderLease | None = None,
) -> RelayOutcome:
    """One relay pass over the unrelayed outbox events (what one sensor tick does). With a
    `lease`, the events are marked relayed only if it still holds (else `LeaseLostError`,
    nothing marked), and no dataset is reported once it is known to be lost."""
    outcome = RelayOutcome()
    events = [e for e in versions.outbox.unrelayed(limit) if e.event_type == COMMITTED_EVENT]
    known = set(known_assets) if known_assets is not None else None
    by_dataset: dict[str, list[OutboxEvent]] = defaultdict(list)
    for event in events:
        by_dataset[event.dataset].append(event)
    done: list[int] = []
    now = time.time()
    run_in_progress = _RunStates(instance)
    for dataset, events_of_dataset in by_dataset.items():
        # the head follower's appends to open ranges: Dagster sees them as observations
        # (trace_sensors/freshness.py), never as materializations that would start downstream
        # runs of a range that is not complete
        appends = [e.id for e in events_of_dataset if _head_append(e)]
        outcome.appended += len(appends)
        done += appends
        batch = [e for e in events_of_dataset if not _head_append(e)]
        if not batch:
            continue
        if lease is not None and not lease.held():
            break  # lost meanwhile: report nothing more (the marking below is refused)
        key = dg.AssetKey(dataset)
        if known is not None and key not in known:
            outcome.not_assets += len(batch)
            done += [e.id for e in batch]
            continue
        partitions = sorted({e.partition_key for e in batch})
        current = versions.read.current_versions(dataset, partitions)
        since = min(e.created_at.timestamp() for e in batch) - _CLOCK_MARGIN_S
        recorded = _recorded_versions(instance, key, partitions, since)
        for event in batch:
            record = current.get(event.partition_key)
            if record is None or record.version != event.version:
                outcome.superseded += 1
            elif (event.partition_key, event.version) in recorded:
                outcome.recorded += 1
            elif (
                run_in_progress(event.payload.get("run_id"))
                and now - event.created_at.timestamp() < settle_s
            ):
                outcome.deferred += 1
                continue
            else:
                instance.report_runless_asset_event(_materialization(event, record))
                recorded.add((event.partition_key, event.version))
                outcome.relayed.append(event)
            done.append(event.id)
    versions.outbox.mark_relayed(done, guard=lease.check if lease is not None else None)
    outcome.cursor = max(done) if done else None
    return outcome


def relay_lease(state: StateStoreResource) -> LeaderLease:
    """This process's copy of the relay's leader lease on the state database."""
    return process_lease(state.versions().engine, LEASE_NAME, state.sensor_lease_s)


def _evaluate(
    context: dg.SensorEvaluationContext, state: StateStoreResource
) -> dg.SensorResult | dg.SkipReason:
    repository = context.repository_def
    known = repository.asset_graph.get_all_asset_keys() if repository is not None else None
    with as_dagster_failure():
        lease = relay_lease(state)
        standby = lease.lead()
        if standby is not None:
            return dg.SkipReason(standby)
        try:
            outcome = relay_outbox(
                context.instance,
                state.versions(),
                known_assets=known,
                settle_s=state.outbox_settle_s,
                lease=lease,
            )
        except LeaseLostError as exc:
            lease.step_down()
            context.log.warning(f"fenced: {exc}")
            return dg.SkipReason(f"fenced: {exc}")
    push_relay_metrics(get_settings().metrics_pushgateway, outcome.counts())
    if outcome.cursor is None:
        return dg.SkipReason(f"nothing to relay: {outcome.summary()}")
    cursor = max(outcome.cursor, int(context.cursor or 0))
    return dg.SensorResult(cursor=str(cursor), skip_reason=outcome.summary())


def build_outbox_relay_sensor(running: bool = True) -> dg.SensorDefinition:
    """The relay, on by default; `TRACE_SENSORS_RUNNING=false` starts it stopped."""
    return dg.sensor(
        name="outbox_relay_sensor",
        description="Reports committed dataset versions that Dagster did not record (e.g. the "
        "step failed after its commit) as materializations, so downstream automation sees "
        "exactly the committed versions.",
        minimum_interval_seconds=30,
        default_status=(
            dg.DefaultSensorStatus.RUNNING if running else dg.DefaultSensorStatus.STOPPED
        ),
    )(_evaluate)


outbox_relay_sensor = build_outbox_relay_sensor()


def build_automation_sensor(running: bool = True) -> dg.AutomationConditionSensorDefinition:
    """Evaluates the assets' automation conditions (e.g. `ingest_audit` after raw updates,
    including the updates this relay reports)."""
    return dg.AutomationConditionSensorDefinition(
        "trace_automation_sensor",
        target=dg.AssetSelection.all(),
        description="Requests runs of assets whose automation condition is met.",
        minimum_interval_seconds=30,
        default_status=(
            dg.DefaultSensorStatus.RUNNING if running else dg.DefaultSensorStatus.STOPPED
        ),
    )
