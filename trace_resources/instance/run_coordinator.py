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
"""

from __future__ import annotations

from dagster import DagsterRunStatus, RunsFilter
from dagster._core.run_coordinator.base import SubmitRunContext
from dagster._core.run_coordinator.queued_run_coordinator import QueuedRunCoordinator
from dagster._core.storage.dagster_run import IN_PROGRESS_RUN_STATUSES, DagsterRun

FAST_LANE_TAG = "trace/fast_lane"


class TraceRunCoordinator(QueuedRunCoordinator):
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
