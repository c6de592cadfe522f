"""Gaps: block ranges at or below the finalized head that a dataset or an alert evaluation lacks.

A range is complete for a sealed dataset (raw, or derived by block range) when its current
version in Postgres state is a sealed one (commit mode 'replace'); a head follower's 'append'
version is open, not sealed. It is complete for an evaluation asset (`alert_evaluations`,
whose outcome lives in the alert pipeline, not in the version store) when Dagster recorded a
successful materialization of the range and no later attempt of it failed (the evaluation
step is the asset's name).

Why a range is missing comes from the Dagster instance: the latest planned materialization
of the (asset, range) that has no materialization after it names the run that tried; that run
failed, or is still in progress (queued, started, or killed and not yet marked failed by run
monitoring). `trace gaps` prints the gaps; the gap-repair sensor re-requests them.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from enum import StrEnum

import dagster as dg
import sqlalchemy as sa
from dagster._core.execution.stats import StepEventStatus
from dagster._core.storage.tags import (
    ASSET_PARTITION_RANGE_END_TAG,
    ASSET_PARTITION_RANGE_START_TAG,
    PARTITION_NAME_TAG,
)

from trace_resources.chain.ranges import complete_ranges
from trace_resources.chains import asset_path
from trace_resources.storage.version_store import VersionStore

__all__ = ["Gap", "GapKind", "GapScope", "find_gaps", "finalized_keys", "range_keys_of_run"]

SEALED = "replace"


class GapKind(StrEnum):
    NEVER_COMMITTED = "never_committed"
    ONLY_APPENDED = "only_appended"
    RUN_FAILED = "run_failed"
    NEVER_EVALUATED = "never_evaluated"
    EVALUATION_FAILED = "evaluation_failed"


@dataclass(frozen=True)
class GapScope:
    """What must be complete for every finalized range: the sealed datasets (by registry name:
    `blocks`, another chain's `devnet2.blocks`, asset key `trace_resources.chains.asset_path`)
    and the evaluation assets, of the dynamic partitions named `partitions`."""

    partitions: str
    datasets: tuple[str, ...]
    evaluations: tuple[str, ...]

    @property
    def assets(self) -> tuple[str, ...]:
        return (*self.datasets, *self.evaluations)


@dataclass(frozen=True)
class Gap:
    """One (asset, range) that is missing, and why."""

    asset: str
    partition_key: str
    kind: GapKind
    run_id: str | None = None  # the run of the latest attempt that left no materialization
    run_status: str | None = None  # its status now (None: no attempt recorded)

    @property
    def in_progress(self) -> bool:
        """Its latest attempt's run has not finished (a killed run stays STARTED until run
        monitoring marks it failed)."""
        return self.run_id is not None and self.run_status not in _FINISHED

    def reason(self) -> str:
        base = {
            GapKind.NEVER_COMMITTED: "never committed",
            GapKind.ONLY_APPENDED: "only appended (open, not sealed)",
            GapKind.RUN_FAILED: f"last run failed: {self.run_id}",
            GapKind.NEVER_EVALUATED: "never evaluated",
            GapKind.EVALUATION_FAILED: f"alert evaluation failed: {self.run_id}",
        }[self.kind]
        if self.in_progress:
            return f"{base}; run {self.run_id} is {self.run_status}"
        return base

    def as_json(self) -> dict[str, str | bool | None]:
        return {
            "asset": self.asset,
            "partition": self.partition_key,
            "kind": str(self.kind),
            "reason": self.reason(),
            "run_id": self.run_id,
            "run_status": self.run_status,
            "in_progress": self.in_progress,
        }


_FAILED = {dg.DagsterRunStatus.FAILURE.value, dg.DagsterRunStatus.CANCELED.value}
_FINISHED = {dg.DagsterRunStatus.SUCCESS.value, *_FAILED}


def finalized_keys(finalized: int, range_size: int) -> list[str]:
    return [r.key for r in complete_ranges(-1, finalized, range_size)]


def _failed_attempts(
    instance: dg.DagsterInstance, assets: Iterable[str], keys: set[str]
) -> dict[tuple[str, str], str]:
    """{(asset, range): run id} of the latest planned materialization with none after it."""
    found: dict[tuple[str, str], str] = {}
    storage = instance.event_log_storage
    for asset in assets:
        attempts = (
            storage.get_latest_asset_partition_materialization_attempts_without_materializations(  # noqa: E501
                dg.AssetKey(asset_path(asset))
            )
        )
        for key, (run_id, _storage_id) in attempts.items():
            if key in keys:
                found[(asset, key)] = run_id
    return found


def _run_statuses(instance: dg.DagsterInstance, run_ids: Iterable[str]) -> dict[str, str]:
    ids = sorted(set(run_ids))
    statuses: dict[str, str] = {}
    for offset in range(0, len(ids), 500):
        chunk = ids[offset : offset + 500]
        for run in instance.get_runs(dg.RunsFilter(run_ids=chunk)):
            statuses[run.run_id] = run.status.value
    return statuses


def _step_failed(instance: dg.DagsterInstance, run_id: str, step_key: str) -> bool:
    stats = instance.get_run_step_stats(run_id, step_keys=[step_key])
    return any(s.status == StepEventStatus.FAILURE for s in stats)


def find_gaps(
    instance: dg.DagsterInstance,
    state_engine: sa.Engine,
    scope: GapScope,
    keys: Sequence[str],
) -> list[Gap]:
    """Every (asset, range) of `keys` (ranges at or below the finalized head) that is missing,
    in range then asset order."""
    wanted = set(keys)
    modes = VersionStore(state_engine).read.current_commit_modes(scope.datasets)
    attempts = _failed_attempts(instance, scope.assets, wanted)
    statuses = _run_statuses(instance, attempts.values())

    def attempt(asset: str, key: str) -> tuple[str | None, str | None]:
        run_id = attempts.get((asset, key))
        if run_id is None:
            return None, None
        # a run deleted from the instance counts as finished
        return run_id, statuses.get(run_id, dg.DagsterRunStatus.FAILURE.value)

    gaps: list[Gap] = []
    for asset in scope.datasets:
        for key in keys:
            mode = modes.get((asset, key))
            if mode == SEALED:
                continue
            run_id, status = attempt(asset, key)
            if mode is not None:
                kind = GapKind.ONLY_APPENDED
            elif status in _FAILED:
                kind = GapKind.RUN_FAILED
            else:
                kind = GapKind.NEVER_COMMITTED
            gaps.append(Gap(asset, key, kind, run_id, status))
    for asset in scope.evaluations:
        materialized = instance.get_materialized_partitions(dg.AssetKey(asset_path(asset)))
        for key in keys:
            run_id, status = attempt(asset, key)
            if run_id is None and key in materialized:
                continue  # evaluated, and nothing tried since without success
            if status in _FAILED:
                # the step itself failed, or the run failed before it (e.g. upstream)
                evaluated = _step_failed(instance, run_id, asset)  # type: ignore[arg-type]
                kind = GapKind.EVALUATION_FAILED if evaluated else GapKind.RUN_FAILED
            elif run_id is None or key not in materialized:
                kind = GapKind.NEVER_EVALUATED
            else:
                # evaluated before; a re-evaluation is under way (or succeeded without a
                # materialization, which Dagster does not do)
                continue
            gaps.append(Gap(asset, key, kind, run_id, status))
    order = {a: i for i, a in enumerate(scope.assets)}
    return sorted(gaps, key=lambda g: (g.partition_key, order[g.asset]))


def range_keys_of_run(run: dg.DagsterRun, known: Sequence[str]) -> set[str]:
    """The block ranges a run covers: its partition, or its partition range (of `known`)."""
    tags = run.tags
    if PARTITION_NAME_TAG in tags:
        return {tags[PARTITION_NAME_TAG]}
    first = tags.get(ASSET_PARTITION_RANGE_START_TAG)
    last = tags.get(ASSET_PARTITION_RANGE_END_TAG)
    if first is None or last is None:
        return set()
    return {k for k in known if first <= k <= last}  # keys are zero-padded: lexical order
