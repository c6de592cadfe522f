"""OpenTelemetry tracing for Trace's processes, exported over OTLP/HTTP (protobuf).

Off unless an endpoint is configured: `TRACE_OTLP_ENDPOINT`, else the standard
`OTEL_EXPORTER_OTLP_ENDPOINT` (a collector's base URL, e.g. `http://collector:4318`; spans go
to `<endpoint>/v1/traces`). Off, a `Tracing` hands out OpenTelemetry's no-op tracer, imports
no SDK and starts no thread: the cost is one no-op context manager per span site.

Each process builds its own `Tracing` with a provider of its own (not the global one), so
several services in one test process export to the collectors they were given. Work that
crosses a process boundary carries the W3C `traceparent` of the span that handed it on (the
alert buffer's message destination, and from there the alert's row), and the receiving
process starts its span as that context's child (`span(..., parent=traceparent)`).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Mapping
from typing import Any

from opentelemetry import trace
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

__all__ = ["Tracing", "otlp_endpoint", "TRACEPARENT"]

TRACEPARENT = "traceparent"
_PROPAGATOR = TraceContextTextMapPropagator()


def otlp_endpoint(configured: str | None = None) -> str | None:
    """The OTLP base URL: Trace's own setting, else the standard variable; None: tracing off."""
    return _checked(configured or os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT") or None)


def _checked(value: str | None) -> str | None:
    if value is None:
        return None
    if not value.startswith(("http://", "https://")):
        raise ValueError(
            f"OTLP endpoint {value!r} is not an http(s) URL: set TRACE_OTLP_ENDPOINT (or "
            "OTEL_EXPORTER_OTLP_ENDPOINT) to the collector's base URL, e.g. http://localhost:4318"
        )
    return value.rstrip("/")


class Tracing:
    """One process's tracer. `endpoint` None: the no-op tracer (tracing off); a process's
    entry point passes `otlp_endpoint(settings.otlp_endpoint)` (`Tracing.configured`)."""

    def __init__(self, service: str, endpoint: str | None = None) -> None:
        self.service = service
        self.endpoint = _checked(endpoint)
        self.provider: Any = None
        if self.endpoint is None:
            self.tracer: trace.Tracer = trace.NoOpTracer()
            return
        # the SDK only where tracing is on (the Dagster code location imports this module)
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor

        self.provider = TracerProvider(resource=Resource.create({"service.name": service}))
        self.provider.add_span_processor(
            BatchSpanProcessor(OTLPSpanExporter(endpoint=f"{self.endpoint}/v1/traces"))
        )
        self.tracer = self.provider.get_tracer("trace")

    @classmethod
    def configured(cls, service: str, setting: str | None) -> Tracing:
        """From TRACE_OTLP_ENDPOINT's value, else OTEL_EXPORTER_OTLP_ENDPOINT, else off."""
        return cls(service, otlp_endpoint(setting))

    @property
    def enabled(self) -> bool:
        return self.provider is not None

    @contextlib.contextmanager
    def span(
        self,
        name: str,
        attributes: Mapping[str, Any] | None = None,
        *,
        parent: str | None = None,
    ) -> Iterator[trace.Span]:
        """A span around the block: the current span's child, or `parent`'s (a traceparent
        received from another process)."""
        context = None if parent is None else _PROPAGATOR.extract({TRACEPARENT: parent})
        with self.tracer.start_as_current_span(
            name, context=context, attributes=_clean(attributes)
        ) as span:
            yield span

    def start(
        self, name: str, attributes: Mapping[str, Any] | None = None, *, parent: str | None = None
    ) -> trace.Span:
        """A span that is not made current (ended by the caller with `.end()`)."""
        context = None if parent is None else _PROPAGATOR.extract({TRACEPARENT: parent})
        return self.tracer.start_span(name, context=context, attributes=_clean(attributes))

    def traceparent(self, span: trace.Span | None = None) -> str | None:
        """The W3C traceparent of `span` (default: the current span); None when off."""
        if not self.enabled:
            return None
        context = trace.set_span_in_context(span) if span is not None else None
        carrier: dict[str, str] = {}
        _PROPAGATOR.inject(carrier, context=context)
        return carrier.get(TRACEPARENT)

    def flush(self) -> None:
        if self.provider is not None:
            self.provider.force_flush()

    def shutdown(self) -> None:
        """Export what is buffered and stop the exporter's thread."""
        if self.provider is not None:
            self.provider.shutdown()
            self.provider = None
            self.tracer = trace.NoOpTracer()


def _clean(attributes: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """OpenTelemetry takes str, bool, int, float and their sequences; None is left out."""
    if not attributes:
        return None
    return {k: v for k, v in attributes.items() if v is not None}
