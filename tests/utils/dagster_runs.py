"""Helpers for tests that materialise the raw chain assets through Dagster and then check what
a user would check: did the run succeed, what did the step report, how often did Dagster
retry it, how long did each attempt take, and what (if anything) was committed.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import dagster as dg
import pytest
import sqlalchemy as sa
from dagster._core.storage.tags import (
    ASSET_PARTITION_RANGE_END_TAG,
    ASSET_PARTITION_RANGE_START_TAG,
)

from trace_assets.definitions import build_resources
from trace_assets.partitions import block_ranges
from trace_assets.raw.chain import raw_chain
from trace_resources.settings import Settings
from trace_resources.storage import state as tables
from trace_resources.storage.state import engine_for

__all__ = [
    "StepAttempts",
    "committed_rows",
    "failure_description",
    "materialize_keys",
    "no_dagster_retry_delay",
    "step_attempts",
]


def materialize_keys(
    settings: Settings, keys: list[str], instance: dg.DagsterInstance | None = None
) -> tuple[dg.ExecuteInProcessResult, dg.DagsterInstance]:
    """Materialise `raw_chain` for `keys` (one run, like a single-run backfill)."""
    instance = instance or dg.DagsterInstance.ephemeral()
    assert block_ranges.name is not None
    instance.add_dynamic_partitions(block_ranges.name, keys)
    if len(keys) == 1:
        extra: dict[str, object] = {"partition_key": keys[0]}
    else:
        extra = {
            "tags": {
                ASSET_PARTITION_RANGE_START_TAG: keys[0],
                ASSET_PARTITION_RANGE_END_TAG: keys[-1],
            }
        }
    result = dg.materialize(
        [raw_chain],
        instance=instance,
        resources=build_resources(settings),
        raise_on_error=False,
        **extra,  # type: ignore[arg-type]
    )
    return result, instance


def failure_description(result: dg.ExecuteInProcessResult) -> str:
    """What the step's failure says to a user (the `dg.Failure` description Trace raised)."""
    data = result.failure_data_for_node("raw_chain")
    assert data is not None, "the raw_chain step did not fail"
    assert data.user_failure_data is not None, data.error.to_string() if data.error else data
    return data.user_failure_data.description or ""


@dataclass(frozen=True)
class StepAttempts:
    """The Dagster attempts of the raw_chain step: how many restarts, how long each took."""

    restarts: int
    durations: list[float]


def step_attempts(result: dg.ExecuteInProcessResult, instance: dg.DagsterInstance) -> StepAttempts:
    kinds = dg.DagsterEventType
    starts = (kinds.STEP_START, kinds.STEP_RESTARTED)
    ends = (kinds.STEP_UP_FOR_RETRY, kinds.STEP_FAILURE, kinds.STEP_SUCCESS)
    durations: list[float] = []
    began: float | None = None
    restarts = 0
    for entry in instance.all_logs(result.run_id):
        event = entry.dagster_event
        if event is None or event.step_key != "raw_chain":
            continue
        if event.event_type in starts:
            began = entry.timestamp
            restarts += event.event_type == kinds.STEP_RESTARTED
        elif event.event_type in ends and began is not None:
            durations.append(entry.timestamp - began)
            began = None
    return StepAttempts(restarts, durations)


def committed_rows(state_dsn: str) -> dict[str, list[tuple[object, ...]]]:
    """Versions, pointers, attempts (with their state) and outbox events in the state DB."""
    engine = engine_for(state_dsn)
    with engine.connect() as conn:
        return {
            "versions": [
                tuple(r)
                for r in conn.execute(
                    sa.select(
                        tables.versions.c.dataset,
                        tables.versions.c.partition_key,
                        tables.versions.c.version,
                    )
                )
            ],
            "pointers": [
                tuple(r)
                for r in conn.execute(
                    sa.select(tables.pointers.c.dataset, tables.pointers.c.partition_key)
                )
            ],
            "attempts": [
                tuple(r)
                for r in conn.execute(
                    sa.select(
                        tables.attempts.c.dataset,
                        tables.attempts.c.partition_key,
                        tables.attempts.c.state,
                    )
                )
            ],
            "outbox": [
                tuple(r)
                for r in conn.execute(
                    sa.select(tables.outbox.c.dataset, tables.outbox.c.partition_key)
                )
            ],
        }


@pytest.fixture
def no_dagster_retry_delay(monkeypatch: pytest.MonkeyPatch) -> Iterator[dg.RetryPolicy]:
    """Keep raw_chain's RetryPolicy (how many retries, for which failures) but skip its delay.

    The policy waits 5 s then 15 s between step attempts; in-process execution sleeps that
    long, which would make every failing test take 20 s. Tests count the retries instead.
    """
    policy = raw_chain.op.retry_policy
    assert policy is not None
    assert (policy.max_retries, policy.delay, policy.backoff) == (2, 5, dg.Backoff.EXPONENTIAL)
    monkeypatch.setattr(dg.RetryPolicy, "calculate_delay", lambda self, attempt_num: 0)
    yield policy


def requested_ranges(result: dg.SensorResult | Any, keys: list[str]) -> list[str]:
    """Every range of `keys` a sensor result's runs cover, in order (a run of one partition,
    or of a range of them by the range tags)."""
    covered = []
    for request in result.run_requests or []:
        if request.partition_key is not None:
            covered.append(request.partition_key)
        else:
            first = request.tags[ASSET_PARTITION_RANGE_START_TAG]
            last = request.tags[ASSET_PARTITION_RANGE_END_TAG]
            covered += [k for k in keys if first <= k <= last]  # zero-padded: block order
    return covered
