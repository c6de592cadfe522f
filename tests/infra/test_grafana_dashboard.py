"""The Grafana dashboard (infra/grafana/trace.json) parses, and every panel's expression names
only metrics that Trace's processes export: the query service, the head follower, the alert
sink and deliverer (all scraped), the ingest runs and the outbox relay (pushed). A renamed
metric breaks this."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry

from trace_assets.head.metrics import HeadMetrics
from trace_query_api.metrics import Metrics
from trace_resources.pushed_metrics import ingest_registry, relay_registry
from trace_resources.worker_metrics import DelivererMetrics, SinkMetrics

DASHBOARD = Path(__file__).resolve().parents[2] / "infra" / "grafana" / "trace.json"
_METRIC = re.compile(r"\b(trace_[a-z0-9_]+)\b")
_SUFFIXES = {
    "counter": ("_total", "_created"),
    "histogram": ("_bucket", "_sum", "_count", "_created"),
    "summary": ("_sum", "_count", "_created"),
}


def exported(registry: CollectorRegistry) -> set[str]:
    """Every series name a registry serves, labelled or not yet observed included."""
    names = set()
    for family in registry.collect():
        suffixes = _SUFFIXES.get(family.type, ("",))
        names.update(family.name + suffix for suffix in suffixes)
    return names


def all_exported() -> set[str]:
    head, sink, deliverer = HeadMetrics(None), SinkMetrics(None), DelivererMetrics(None)
    registries = [
        Metrics().registry,
        head.registry,
        sink.registry,
        deliverer.registry,
        ingest_registry(ranges=1, rows=1, seconds=1.0, succeeded=True),
        relay_registry({}),
    ]
    return set().union(*(exported(r) for r in registries))


def panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for panel in dashboard["panels"]:
        out.append(panel)
        out.extend(panel.get("panels", []))  # a collapsed row holds its panels
    return out


def test_the_dashboard_parses_and_every_expression_names_an_exported_metric() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    names = all_exported()
    graphs = [p for p in panels(dashboard) if p["type"] != "row"]
    assert len(graphs) >= 12
    used: set[str] = set()
    for panel in graphs:
        assert panel["targets"], f"panel {panel['title']!r} has no query"
        for target in panel["targets"]:
            metrics = set(_METRIC.findall(target["expr"]))
            assert metrics, f"panel {panel['title']!r}: {target['expr']!r} names no metric"
            unknown = metrics - names
            assert not unknown, (
                f"panel {panel['title']!r} queries {unknown}, which no process exports"
            )
            used |= metrics
    # each process has at least one panel
    for prefix in (
        "trace_query_",
        "trace_head_",
        "trace_sink_",
        "trace_delivery_",
        "trace_ingest_",
        "trace_relay_",
    ):
        assert any(m.startswith(prefix) for m in used), prefix
    ids = [p["id"] for p in panels(dashboard)]
    assert len(ids) == len(set(ids)), "panel ids repeat"


def test_a_renamed_metric_is_caught() -> None:
    names = all_exported()
    assert "trace_sink_alerts_inserted_total" in names
    assert "trace_sink_alerts_inserted" not in names  # a counter is queried with _total
    assert not set(_METRIC.findall("rate(trace_sink_alert_inserted_total[5m])")) <= names
