"""Prometheus metrics of the query service, and the ASGI middleware that counts requests.

Each app gets its own registry (tests build several apps in one process). With several uvicorn
workers, set `PROMETHEUS_MULTIPROC_DIR` to a shared empty directory: `/metrics` then sums the
workers (prometheus-client's multiprocess mode).
"""

from __future__ import annotations

import os
import time
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)
from starlette.types import ASGIApp, Message, Receive, Scope, Send

__all__ = ["Metrics", "MetricsMiddleware"]

_LATENCY_BUCKETS = (0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "trace_query_http_requests",
            "HTTP requests by route template, method and status.",
            ["route", "method", "status"],
            registry=r,
        )
        self.latency = Histogram(
            "trace_query_http_request_seconds",
            "HTTP request latency by route template.",
            ["route"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.queries = Counter(
            "trace_query_queries",
            "SQL queries by outcome (ok, or the error code).",
            ["outcome"],
            registry=r,
        )
        self.query_seconds = Histogram(
            "trace_query_query_seconds",
            "Time inside the sandbox per query.",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.rows = Counter("trace_query_rows_returned", "Rows returned by queries.", registry=r)
        self.rejected = Counter(
            "trace_query_rejected",
            "Requests refused before running: token problems, rate limits, busy sandboxes.",
            ["reason"],
            registry=r,
        )
        self.exports = Counter(
            "trace_query_exports", "Export jobs by final status.", ["status"], registry=r
        )
        self.current_versions = Counter(
            "trace_query_current_versions",
            "Datasets whose current versions a query took from the cache between commits "
            "(cache) or read in PostgreSQL (database: not cached yet, or the cache was bypassed "
            "while its listener reconnected).",
            ["source"],
            registry=r,
        )
        self.sandboxes_busy = Gauge(
            "trace_query_sandboxes_busy",
            "Sandboxes running a query now.",
            registry=r,
            multiprocess_mode="livesum",
        )

    def render(self) -> bytes:
        if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry)
            return generate_latest(registry)
        return generate_latest(self.registry)


class MetricsMiddleware:
    """Counts and times every HTTP request by its route template (not its raw path)."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = {"code": 500}

        async def counting_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, counting_send)
        finally:
            route: Any = scope.get("route")
            template = getattr(route, "path", None) or "unmatched"
            self.metrics.requests.labels(template, scope["method"], str(status["code"])).inc()
            self.metrics.latency.labels(template).observe(time.perf_counter() - started)
