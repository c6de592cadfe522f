"""The head follower's Prometheus metrics: how far each dataset is behind `finalized`.

Served by the follower process on `TRACE_HEAD_METRICS_PORT` (none: not served). Lag in
blocks is the finalized head minus the newest block committed; lag in seconds is how long
the oldest block not yet committed has been finalized (0 when caught up), measured by the
follower's wall clock from when it first saw that finalized head.
"""

from __future__ import annotations

from collections.abc import Iterable

from trace_resources.chain.extract import ChainHead

__all__ = ["HeadMetrics"]


class HeadMetrics:
    """The follower's metrics on their own registry (`port`: serve them over HTTP)."""

    def __init__(self, port: int | None, host: str = "127.0.0.1") -> None:
        # imported by the follower that keeps metrics, not with the module: the Dagster code
        # location imports this module (through the follower's datasets) for every run
        from prometheus_client import (
            CollectorRegistry,
            Counter,
            Gauge,
            Histogram,
            start_http_server,
        )

        from trace_resources.taps.hub import tap_metric

        self.registry = CollectorRegistry()
        r = self.registry
        r.register(tap_metric())  # the commit taps' counters (`trace_tap_events_total`)
        self.finalized = Gauge(
            "trace_chain_finalized_block", "The chain's finalized head.", registry=r
        )
        self.safe = Gauge("trace_chain_safe_block", "The chain's safe head.", registry=r)
        self.block_time = Gauge(
            "trace_chain_block_time_seconds",
            "Seconds per block, observed from the finalized head over the last minute.",
            registry=r,
        )
        self.head_block = Gauge(
            "trace_dataset_head_block",
            "Newest block committed per dataset (sealed or appended).",
            ["dataset"],
            registry=r,
        )
        self.lag_blocks = Gauge(
            "trace_dataset_lag_blocks",
            "Blocks finalized but not yet committed, per dataset.",
            ["dataset"],
            registry=r,
        )
        self.lag_seconds = Gauge(
            "trace_dataset_lag_seconds",
            "How long the oldest finalized block not yet committed has been finalized.",
            ["dataset"],
            registry=r,
        )
        self.append_seconds = Histogram(
            "trace_head_append_seconds",
            "One append transaction of every head dataset's segment.",
            buckets=(0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5),
            registry=r,
        )
        self.finalized_to_commit = Histogram(
            "trace_head_finalized_to_commit_seconds",
            "From the follower first seeing a block finalized to its append committed (the "
            "oldest block of each segment).",
            buckets=(0.1, 0.25, 0.5, 1, 2, 3, 5, 10, 30, 60),
            registry=r,
        )
        self.blocks = Counter("trace_head_blocks", "Blocks appended by the follower.", registry=r)
        self.errors = Counter(
            "trace_head_errors", "Follower cycles that failed, by error.", ["error"], registry=r
        )
        self.alerts_sent = Counter(
            "trace_head_alert_messages",
            "Alert messages (alerts and retractions) published by the follower.",
            ["confirmation"],
            registry=r,
        )
        self.server = start_http_server(port, host, registry=r) if port else None

    def chain(self, head: ChainHead, block_time_s: float | None) -> None:
        self.finalized.set(head.finalized)
        if head.safe is not None:
            self.safe.set(head.safe)
        if block_time_s is not None:
            self.block_time.set(block_time_s)

    def appended(self, blocks: int, seconds: float) -> None:
        self.blocks.inc(blocks)
        self.append_seconds.observe(seconds)

    def committed_after(self, seconds: float) -> None:
        self.finalized_to_commit.observe(max(0.0, seconds))

    def lag(self, datasets: Iterable[str], committed: int, blocks: int, seconds: float) -> None:
        for name in datasets:
            self.head_block.labels(name).set(committed)
            self.lag_blocks.labels(name).set(blocks)
            self.lag_seconds.labels(name).set(seconds)

    def error(self, kind: str) -> None:
        self.errors.labels(kind).inc()

    def alerts(self, confirmation: str, messages: int) -> None:
        self.alerts_sent.labels(confirmation).inc(messages)

    def close(self) -> None:
        if self.server is not None:
            server, thread = self.server
            server.shutdown()
            server.server_close()
            thread.join(timeout=5)
