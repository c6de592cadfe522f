"""Automatic GC in Dagster: `retention_gc_job` applies the retention policies the dataset
declarations carry (`retention: {keep_last: N, older_than: 30d}`), daily by
`retention_gc_schedule`.

Each run first computes the dry-run plan and shows it in the UI (the step's output metadata: a
table per dataset of the versions, files and bytes it would remove, and a log line per version),
then applies exactly that plan through `GarbageCollector` (the code of `trace gc`): never a
current version, one a reader has pinned, or a live attempt's files. A dataset without a policy
is not touched.

The GC is a singleton: where several deployments (Dagster daemons) share one state database,
each launches the daily run, but only the run that takes the `retention-gc` leader lease
(`trace_resources/leases.py`, renewed from a thread while it runs) applies its plan; the others
log who holds it and remove nothing. Each removal checks the lease's token in its own
transaction, so a run paused past its lease removes nothing more once it wakes up.

The schedule is on by default: it only acts on datasets whose declaration opts in with a policy
(none of the shipped ones does), so turning Trace on deletes nothing until a dataset's owner
writes one down; `TRACE_SENSORS_RUNNING=false` starts it stopped, as the sensors.
"""

from typing import Any

import dagster as dg
from pydantic import Field

from trace_resources.auto_gc import DatasetPlan, apply_plan, plan, policy_text
from trace_resources.leases import LeaderLease, default_holder
from trace_resources.registry import load_declarations
from trace_resources.resources import ObjectStoreResource, StateStoreResource
from trace_resources.storage.gc import GarbageCollector

__all__ = ["LEASE_NAME", "RETENTION_CRON", "build_retention_schedule", "retention_gc_job"]

RETENTION_CRON = "0 3 * * *"  # daily, at a quiet hour (UTC)
LEASE_NAME = "retention-gc"


def _table(plans: list[DatasetPlan]) -> str:
    rows = [
        "| dataset | policy | versions | files | bytes | versions removed |",
        "|---|---|---:|---:|---:|---|",
    ]
    for p in plans:
        removed = ", ".join(f"{key} v{v}" for _, key, v in p.report.planned) or "—"
        rows.append(
            f"| {p.dataset} | {policy_text(p.policy)} | {len(p.report.versions)} | "
            f"{len(p.report.files)} | {p.report.bytes:,} | {removed} |"
        )
    if not plans:
        rows.append("| — | no dataset declares a retention policy | 0 | 0 | 0 | — |")
    return "\n".join(rows)


def _totals(plans: list[DatasetPlan], prefix: str) -> dict[str, Any]:
    return {
        f"{prefix}_versions": sum(len(p.report.versions) for p in plans),
        f"{prefix}_files": sum(len(p.report.files) for p in plans),
        f"{prefix}_bytes": sum(p.report.bytes for p in plans),
    }


class RetentionConfig(dg.Config):
    declarations_dir: str = Field(
        default="",
        description="directory of dataset declarations (*.yaml) whose `retention:` policies "
        "apply; empty: the declarations shipped in trace_assets/datasets",
    )


@dg.op(
    description="Computes the retention policies' dry-run plan (shown as metadata), then applies "
    "it with the same guarantees as `trace gc`.",
    out=dg.Out(dict, description="per dataset, the plan and what was removed"),
)
def apply_retention_policies(
    context: dg.OpExecutionContext,
    config: RetentionConfig,
    objects: ObjectStoreResource,
    state: StateStoreResource,
) -> dg.Output[dict[str, Any]]:
    decls = load_declarations(config.declarations_dir) if config.declarations_dir else None
    versions = state.versions()
    lease = LeaderLease(
        versions.engine, LEASE_NAME, lease_s=state.sensor_lease_s, holder=default_holder(LEASE_NAME)
    )
    if lease.try_acquire() is None:
        current = lease.current()
        holder = f"{current.holder} (token {current.token})" if current else "another run"
        context.log.warning(
            f"another copy of the retention GC is running (the {LEASE_NAME!r} leader lease is "
            f"held by {holder}); this run removes nothing"
        )
        return dg.Output(
            {"plan": [], "applied": [], "standby": holder},
            metadata={"standby": f"the {LEASE_NAME!r} lease is held by {holder}"},
        )
    try:
        collector = GarbageCollector(objects.datasets(), versions, guard=lease.check)
        planned = plan(collector, decls)
        for p in planned:
            for line in p.report.lines():
                context.log.info(f"plan {p.dataset}: {line}")
        done = apply_plan(collector, planned)
    finally:
        lease.release()
    for p in done:
        context.log.info(
            f"applied {p.dataset}: {len(p.report.versions)} version(s), "
            f"{len(p.report.files)} file(s), {p.report.bytes:,} bytes removed"
        )
    value = {
        "plan": [p.summary() for p in planned],
        "applied": [p.summary() for p in done],
    }
    metadata: dict[str, Any] = {
        "plan": dg.MetadataValue.md(_table(planned)),
        "applied": dg.MetadataValue.md(_table(done)),
        "datasets_with_policy": len(planned),
        **_totals(planned, "planned"),
        **_totals(done, "removed"),
    }
    return dg.Output(value, metadata=metadata)


@dg.job(
    description="Remove superseded dataset versions under the retention policies declared in "
    "trace_assets/datasets/*.yaml (datasets without one keep everything)."
)
def retention_gc_job() -> None:
    apply_retention_policies()


def build_retention_schedule(running: bool = True) -> dg.ScheduleDefinition:
    """Daily; on by default (see the module docstring), stopped when `running` is false."""
    return dg.ScheduleDefinition(
        name="retention_gc_schedule",
        job=retention_gc_job,
        cron_schedule=RETENTION_CRON,
        execution_timezone="UTC",
        description="Daily automatic GC under the datasets' declared retention policies.",
        default_status=(
            dg.DefaultScheduleStatus.RUNNING if running else dg.DefaultScheduleStatus.STOPPED
        ),
    )
