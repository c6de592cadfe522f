"""`TraceRunCoordinator`: Dagster's queued run coordinator with a fast lane for fresh ranges.

Set in `dagster_home/dagster.yaml`. Every run is queued and dequeued as by
`QueuedRunCoordinator` (same config: `max_concurrent_runs`, tag limits, dequeue interval,
priorities), except a run tagged `trace/fast_lane=true` (the chain-head sensor's runs of newly
finalized ranges, whose alerts wait on them) that finds a free run slot at submission: it is
launched at once, as Dagster's default coordinator launches every run, instead of waiting for
the next dequeue (0.5-1 s at `dequeue_interval_seconds: 1`, which issue 6's finalized-to-alert
latency pays for every range). Without a free slot it queues like any run, at its priority.

The slot check counts the runs in progress; the queue's daemon counts them too, so a fast-lane
launch and a dequeue in the same instant can exceed `max_concurrent_runs` by one run for the
time it takes.
`backfill_interval_seconds`: how often the backfill daemon ticks. Dagster 1.13 ticks it every
30 s, a constant no dagster.yaml setting changes (`execute_backfill_iteration_loop` reads
`dagster._daemon.controller.DEFAULT_DAEMON_INTERVAL_SECONDS` when its loop starts). A backfill
launched from the UI waits for one tick to get its run and for a later one to be marked
complete: 30-60 s around a run of ~8 s for the devnet's 12 ranges. The daemon process builds
the run coordinator before its daemons start, so setting the interval here applies to its
backfill loop; the asset daemon keeps its own (`auto_materialize: minimum_interval_seconds`,
set in dagster.yaml; the automation sensors keep theirs). An idle tick is one query for
requested backfills.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from dagster import DagsterRunStatus, Field, IntSource, RunsFilter
from dagster._config.config_schema import UserConfigSchema
from dagster._core.run_coordinator.base import SubmitRunContext
from dagster._core.run_coordinator.queued_run_coordinator import QueuedRunCoordinator
from dagster._core.storage.dagster_run import IN_PROGRESS_RUN_STATUSES, DagsterRun
from dagster._serdes import ConfigurableClassData

FAST_LANE_TAG = "trace/fast_lane"
BACKFILL_INTERVAL_CONFIG = "backfill_interval_seconds"


def set_backfill_interval(seconds: int) -> None:
    """Make the backfill daemon of this process tick every `seconds` (see the module doc)."""
    from dagster._daemon import controller

    if not isinstance(getattr(controller, "DEFAULT_DAEMON_INTERVAL_SECONDS", None), int):
        raise RuntimeError(
            f"this Dagster version has no fixed backfill interval to set: remove "
            f"run_coordinator.config.{BACKFILL_INTERVAL_CONFIG} from dagster.yaml"
        )
    if seconds < 1:
        raise ValueError(f"{BACKFILL_INTERVAL_CONFIG} must be at least 1 (got {seconds})")
    controller.DEFAULT_DAEMON_INTERVAL_SECONDS = seconds


class TraceRunCoordinator(QueuedRunCoordinator):
    @classmethod
    def config_type(cls) -> UserConfigSchema:
        schema = dict(super().config_type())  # type: ignore[arg-type]
        schema[BACKFILL_INTERVAL_CONFIG] = Field(
            IntSource,
            is_required=False,
            description="Seconds between the backfill daemon's ticks (Dagster's fixed 30 s "
            "when unset).",
        )
        return schema

    @classmethod
    def from_config_value(
        cls, inst_data: ConfigurableClassData, config_value: Mapping[str, Any]
    ) -> TraceRunCoordinator:
        interval = config_value.get(BACKFILL_INTERVAL_CONFIG)
        if interval is not None:
            set_backfill_interval(int(interval))
        return super().from_config_value(inst_data, config_value)

    def _slot_free(self) -> bool:
        if self._max_concurrent_runs == -1:
            return True
        in_progress = self._instance.get_runs_count(
            RunsFilter(statuses=list(IN_PROGRESS_RUN_STATUSES))
        )
        return in_progress < self._max_concurrent_runs

    def submit_run(self, context: SubmitRunContext) -> DagsterRun:
        run = context.dagster_run
        if (
            run.tags.get(FAST_LANE_TAG) == "true"
            and run.status == DagsterRunStatus.NOT_STARTED
            and self._slot_free()
        ):
            self._instance.report_engine_event(
                "Launched at submission (fast lane: a run slot was free), not queued.",
                run,
                cls=type(self),
            )
            return self._instance.launch_run(run.run_id, context.workspace)
        return super().submit_run(context)
