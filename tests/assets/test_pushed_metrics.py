"""What is too short-lived to scrape pushes its metrics to a Pushgateway: an ingest run (a batch
job) when its step ends, and traces itself (`ingest.run`) to the OTLP collector; the outbox
relay (a sensor) after each tick. A gateway that is down fails nothing."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import dagster as dg
import pyarrow as pa
import pytest
from prometheus_client.parser import text_string_to_metric_families

from infra.local.services import free_port
from tests.conftest import CHAIN_ID, RANGE_SIZE, Devnet
from tests.utils.dagster_runs import materialize_keys
from tests.utils.otlp_collector import OtlpCollector
from trace_resources.chain.ranges import complete_ranges
from trace_resources.resources import ObjectStoreResource, StateStoreResource
from trace_resources.settings import Settings
from trace_resources.storage.commit import PartitionData
from trace_resources.storage.paths import UNPARTITIONED
from trace_sensors.outbox import build_outbox_relay_sensor


class Pushgateway:
    """Records what is pushed (method, path, metric samples), over real HTTP."""

    def __init__(self) -> None:
        self.pushes: list[tuple[str, str, dict[str, float]]] = []
        gateway = self

        class Handler(BaseHTTPRequestHandler):
            def _take(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0))).decode()
                samples = {
                    s.name + "".join(f'{{{k}="{v}"}}' for k, v in s.labels.items()): s.value
                    for family in text_string_to_metric_families(body)
                    for s in family.samples
                }
                gateway.pushes.append((self.command, self.path, samples))
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            do_PUT = do_POST = _take  # noqa: N815 - the stdlib's names

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=10)


@pytest.fixture
def pushgateway() -> Iterator[Pushgateway]:
    gateway = Pushgateway()
    yield gateway
    gateway.close()


def test_an_ingest_run_pushes_its_ranges_rows_and_time_and_traces_itself(
    devnet: Devnet,
    test_settings: Settings,
    pushgateway: Pushgateway,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    key = complete_ranges(-1, devnet.finalized, RANGE_SIZE)[1].key
    with OtlpCollector() as collector:
        monkeypatch.setenv("TRACE_METRICS_PUSHGATEWAY", pushgateway.url)
        monkeypatch.setenv("TRACE_OTLP_ENDPOINT", collector.url)
        result, instance = materialize_keys(test_settings, [key], dg.DagsterInstance.ephemeral())
        instance.dispose()
        assert result.success
        # the step's end shut the run's tracer down: its span was exported by then
        [span] = [s for s in collector.snapshot() if s.name == "ingest.run"]

    assert span.service == "trace-ingest"
    assert span.attributes["partitions"] == [key]
    assert span.attributes["ranges"] == 1
    assert span.attributes["dagster.run_id"] == result.run_id
    [(method, path, samples)] = pushgateway.pushes
    assert (method, path) == ("POST", f"/metrics/job/trace_ingest/chain/{CHAIN_ID}")
    assert samples["trace_ingest_last_run_ranges"] == 1
    assert samples["trace_ingest_last_run_rows"] > RANGE_SIZE  # blocks + transactions + logs
    assert samples["trace_ingest_last_run_failed"] == 0
    assert samples["trace_ingest_last_run_seconds"] > 0
    assert samples["trace_ingest_last_success_timestamp_seconds"] > 0


def test_a_pushgateway_that_is_down_fails_no_ingest_run(
    devnet: Devnet, test_settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    key = complete_ranges(-1, devnet.finalized, RANGE_SIZE)[2].key
    monkeypatch.setenv("TRACE_METRICS_PUSHGATEWAY", f"http://127.0.0.1:{free_port()}")
    result, instance = materialize_keys(test_settings, [key], dg.DagsterInstance.ephemeral())
    instance.dispose()
    assert result.success


def test_each_relay_tick_pushes_what_became_of_the_outbox_events(
    state: StateStoreResource,
    objects: ObjectStoreResource,
    pushgateway: Pushgateway,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("TRACE_METRICS_PUSHGATEWAY", pushgateway.url)
    with state.writer(objects) as writer:  # a commit Dagster never heard of
        writer.write("relayed_table", UNPARTITIONED, PartitionData(pa.table({"n": [1, 2]})))
    sensor = build_outbox_relay_sensor()
    with dg.DagsterInstance.ephemeral() as instance:
        for _ in range(2):
            sensor(dg.build_sensor_context(instance=instance, resources={"state": state}))
    first, second = pushgateway.pushes
    assert first[:2] == ("PUT", "/metrics/job/trace_outbox_relay")
    assert first[2]['trace_relay_last_tick_events{outcome="relayed"}'] == 1
    assert second[2]['trace_relay_last_tick_events{outcome="relayed"}'] == 0  # the last tick's
    assert second[2]["trace_relay_last_tick_timestamp_seconds"] > 0
