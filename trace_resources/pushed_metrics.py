"""Prometheus metrics of the processes too short-lived to scrape, pushed to a Pushgateway.

Ingest runs push when the run's step ends; the outbox relay (a Dagster sensor, evaluated
tick by tick in whichever code-server process Dagster runs it) pushes after each tick, as
`job="trace_outbox_relay"`: its last tick's counts and when it ran.

A raw ingest run is a batch job (a Dagster run process that lives for one step), gone before
Prometheus could scrape it, so it pushes instead (`TRACE_METRICS_PUSHGATEWAY`, e.g.
`http://pushgateway:9091`; unset: nothing is pushed and prometheus-client is not imported).
One group per chain (`job="trace_ingest", chain="<id>"`): each push replaces the group, so
the gauges read "the last run", and `trace_ingest_last_success_timestamp_seconds` only moves
on success (alert on `time() - it` to catch ingest that stopped, the Pushgateway's own advice
for batch jobs).
"""

from __future__ import annotations

import logging
import time
from typing import Any

__all__ = [
    "push_ingest_metrics",
    "ingest_registry",
    "push_relay_metrics",
    "relay_registry",
]

log = logging.getLogger(__name__)


def ingest_registry(
    ranges: int, rows: int, seconds: float, succeeded: bool, last_success: float | None = None
) -> Any:
    """The metrics of one ingest run, on a registry of their own."""
    from prometheus_client import CollectorRegistry, Gauge

    registry = CollectorRegistry()

    def gauge(name: str, doc: str, value: float) -> None:
        Gauge(name, doc, registry=registry).set(value)

    gauge("trace_ingest_last_run_ranges", "Block ranges the last ingest run committed.", ranges)
    gauge("trace_ingest_last_run_rows", "Rows (all raw datasets) the last run committed.", rows)
    gauge("trace_ingest_last_run_seconds", "Wall time of the last ingest run's step.", seconds)
    gauge("trace_ingest_last_run_failed", "1 when the last ingest run failed.", int(not succeeded))
    if succeeded:
        gauge(
            "trace_ingest_last_success_timestamp_seconds",
            "Unix time the last successful ingest run ended.",
            last_success or time.time(),
        )
    return registry


def push_ingest_metrics(
    gateway: str | None,
    chain_id: int,
    *,
    ranges: int,
    rows: int,
    seconds: float,
    succeeded: bool,
    last_success: float | None = None,
) -> bool:
    """Push the run's metrics; False (logged, never raised) when the gateway does not take them:
    a monitoring outage must not fail an ingest run that committed."""
    if not gateway:
        return False
    from prometheus_client import pushadd_to_gateway

    registry = ingest_registry(ranges, rows, seconds, succeeded, last_success)
    try:
        # pushadd (POST): a failed run keeps the group's last success timestamp
        pushadd_to_gateway(
            gateway,
            job="trace_ingest",
            grouping_key={"chain": str(chain_id)},
            registry=registry,
            timeout=5,
        )
    except OSError as exc:
        log.warning("ingest metrics not pushed to %s: %s", gateway, exc)
        return False
    return True


RELAY_COUNTS = ("relayed", "recorded", "superseded", "not_assets", "deferred", "appended")


def relay_registry(counts: dict[str, int], at: float | None = None) -> Any:
    """The outbox relay's last tick: events by what became of them, and when it ran."""
    from prometheus_client import CollectorRegistry, Gauge

    registry = CollectorRegistry()
    events = Gauge(
        "trace_relay_last_tick_events",
        "Outbox events of the relay's last tick by what became of them (relayed to Dagster, "
        "already recorded, superseded, not assets, deferred while their run is in progress, "
        "head appends).",
        ["outcome"],
        registry=registry,
    )
    for outcome in RELAY_COUNTS:
        events.labels(outcome).set(counts.get(outcome, 0))
    Gauge(
        "trace_relay_last_tick_timestamp_seconds",
        "Unix time of the relay's last tick.",
        registry=registry,
    ).set(at or time.time())
    return registry


def push_relay_metrics(gateway: str | None, counts: dict[str, int]) -> bool:
    """Push the tick's counts (PUT: the group is the last tick's); False when not taken."""
    if not gateway:
        return False
    from prometheus_client import push_to_gateway

    try:
        push_to_gateway(
            gateway, job="trace_outbox_relay", registry=relay_registry(counts), timeout=5
        )
    except OSError as exc:
        log.warning("relay metrics not pushed to %s: %s", gateway, exc)
        return False
    return True
