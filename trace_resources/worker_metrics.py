"""Prometheus metrics of the long-running alert workers (sink, deliverer), served over HTTP.

Each worker keeps its metrics on a registry of its own and, given a port
(`TRACE_SINK_METRICS_PORT`, `TRACE_DELIVERER_METRICS_PORT`), serves them at `/metrics` on
`TRACE_METRICS_HOST` (loopback by default). Pull, not push: these processes live as long as
the service does, so Prometheus scrapes them like the query service and the head follower
(`trace_assets/head/metrics.py`); a worker that dies shows as a failed scrape (`up == 0`),
which a push would hide behind the last value pushed.
"""

from __future__ import annotations

from typing import Any

__all__ = ["SinkMetrics", "DelivererMetrics", "WorkerMetrics"]

_SECONDS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


class WorkerMetrics:
    """A registry, and its HTTP server when `port` is set; `close()` stops the server."""

    setting = "the metrics port"

    def __init__(self, port: int | None, host: str = "127.0.0.1") -> None:
        # imported by the workers that keep metrics, not with the module
        from prometheus_client import CollectorRegistry, start_http_server

        from trace_resources.taps.hub import tap_metric

        self.registry = CollectorRegistry()
        self._define(self.registry)
        self.registry.register(tap_metric())  # its wire taps' counters (trace_tap_events_total)
        try:
            self.server = start_http_server(port, host, registry=self.registry) if port else None
        except OSError as exc:
            raise OSError(
                f"can not serve /metrics on {host}:{port} ({exc.strerror or exc}): set "
                f"{self.setting} to a free port, or unset it"
            ) from None

    def _define(self, registry: Any) -> None:
        raise NotImplementedError

    @property
    def port(self) -> int | None:
        return None if self.server is None else int(self.server[0].server_address[1])

    def close(self) -> None:
        if self.server is not None:
            server, thread = self.server
            server.shutdown()
            server.server_close()
            thread.join(timeout=5)
            self.server = None


class SinkMetrics(WorkerMetrics):
    """The alert sink: buffer messages drained into Postgres data."""

    setting = "TRACE_SINK_METRICS_PORT"

    def _define(self, registry: Any) -> None:
        from prometheus_client import Counter, Histogram

        self.received = Counter(
            "trace_sink_messages_received",
            "Buffer messages received from the alert queue.",
            registry=registry,
        )
        self.inserted = Counter(
            "trace_sink_alerts_inserted", "Alerts the sink inserted (new rows).", registry=registry
        )
        self.duplicates = Counter(
            "trace_sink_duplicates",
            "Buffer messages whose dedupe_key was already stored (at-least-once repeats).",
            registry=registry,
        )
        self.poison = Counter(
            "trace_sink_poison_messages",
            "Queue messages that did not parse (moved to the dead letters).",
            registry=registry,
        )
        self.batch_seconds = Histogram(
            "trace_sink_batch_seconds",
            "One batch: upsert transaction and acknowledgement.",
            buckets=_SECONDS,
            registry=registry,
        )


class DelivererMetrics(WorkerMetrics):
    """The alert deliverer: attempts and their outcomes."""

    setting = "TRACE_DELIVERER_METRICS_PORT"

    def _define(self, registry: Any) -> None:
        from prometheus_client import Counter, Gauge, Histogram

        self.attempts = Counter(
            "trace_delivery_attempts",
            "Delivery attempts by outcome (delivered, retry, dead, superseded).",
            ["outcome"],
            registry=registry,
        )
        self.seconds = Histogram(
            "trace_delivery_send_seconds",
            "One send to a receiver (webhook, Slack or SMTP), whatever its outcome.",
            buckets=_SECONDS,
            registry=registry,
        )
        self.rate_limited = Counter(
            "trace_delivery_rate_limited",
            "Due deliveries deferred by their channel's rate limit.",
            registry=registry,
        )
        self.in_flight = Gauge(
            "trace_delivery_in_flight", "Sends in progress now.", registry=registry
        )
