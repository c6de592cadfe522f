"""Tracing of the query service: an HTTP request's span and its DuckDB query's child span reach
an OTLP collector (real OTLP/HTTP from a real uvicorn process), with the query's datasets, org
and rows; with no endpoint configured the service exports nothing."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from infra.local.query_service import QueryServer, settings_env
from tests.query.conftest import Tokens, World, bearer
from tests.utils.otlp_collector import CollectedSpan, OtlpCollector


def _query_spans(spans: list[CollectedSpan]) -> tuple[CollectedSpan, CollectedSpan] | None:
    queries = [s for s in spans if s.name == "duckdb.query"]
    by_id = {s.span_id: s for s in spans}
    for query in queries:
        parent = by_id.get(query.parent_span_id)
        if parent is not None:
            return parent, query
    return None


def test_a_query_request_and_its_duckdb_query_reach_the_collector_as_parent_and_child(
    local_world: World, tmp_path: Path
) -> None:
    tokens = Tokens(local_world.settings)
    settings = local_world.settings
    with OtlpCollector() as collector:
        env = {
            **settings_env(settings),
            "TRACE_OTLP_ENDPOINT": collector.url,
            "OTEL_BSP_SCHEDULE_DELAY": "100",  # export within 0.1 s, not the default 5 s
        }
        with (
            QueryServer(env, log_file=tmp_path / "query.log") as server,
            httpx.Client(base_url=server.url, timeout=60) as client,
        ):
            reply = client.post(
                "/v1/query",
                json={"sql": "SELECT n FROM org_acme__numbers WHERE n < 7 ORDER BY n"},
                headers=bearer(tokens.org("acme")),
            )
            assert reply.status_code == 200, reply.text
            assert [r[0] for r in reply.json()["rows"]] == list(range(7))
            assert client.get("/metrics").status_code == 200
            request, query = collector.wait_for(_query_spans, "the request and its query")

    assert request.service == query.service == "trace-query"
    assert request.trace_id == query.trace_id
    assert request.name == "POST /v1/query"
    assert request.attributes.get("http.route") == "/v1/query"
    assert query.attributes["db.system"] == "duckdb"
    assert query.attributes["trace.org"] == "acme"
    assert query.attributes["trace.datasets"] == ["org_acme__numbers"]
    assert query.attributes["db.response.returned_rows"] == 7
    assert query.attributes["trace.files_bytes"] > 0
    # the SQL is not exported (it may hold what the organisation looks for): its fingerprint is
    assert all("org_acme__numbers WHERE" not in str(v) for v in query.attributes.values())
    # scrapes and health checks make no spans
    assert not [s for s in collector.snapshot() if "metrics" in s.name]


@pytest.mark.parametrize("variable", ["TRACE_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT"])
def test_an_endpoint_that_is_not_a_url_is_refused_with_how_to_fix_it(
    variable: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from trace_resources.telemetry import Tracing, otlp_endpoint

    monkeypatch.delenv("OTEL_EXPORTER_OTLP_ENDPOINT", raising=False)
    assert otlp_endpoint(None) is None  # unset: tracing off
    assert not Tracing("t", None).enabled
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "collector:4318")
    with pytest.raises(ValueError, match="TRACE_OTLP_ENDPOINT .* http://localhost:4318"):
        if variable == "TRACE_OTLP_ENDPOINT":
            otlp_endpoint("collector:4318")
        else:
            otlp_endpoint(None)


def test_bad_observability_settings_are_refused_in_one_line_that_says_how_to_fix_them() -> None:
    import socket

    from pydantic import ValidationError

    from trace_resources.settings import Settings
    from trace_resources.worker_metrics import SinkMetrics

    with pytest.raises(ValidationError, match=r"TRACE_OTLP_ENDPOINT must be an http\(s\) URL"):
        Settings(otlp_endpoint="localhost:4318")
    with pytest.raises(ValidationError, match="TRACE_METRICS_PUSHGATEWAY must be an http"):
        Settings(metrics_pushgateway="pushgateway:9091")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(OSError, match=f"127.0.0.1:{port} .*TRACE_SINK_METRICS_PORT to a free"):
            SinkMetrics(port)
