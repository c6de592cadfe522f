"""Observability of the alert path across processes: one finalized block's trace runs from the
head follower (the run that appends it, its commit, the alert it publishes) through the alert
sink to the webhook delivery, each hop in its own process, linked by the W3C traceparent the
alert carries; the follower, the sink and the deliverer each serve Prometheus /metrics."""

from __future__ import annotations

import httpx
from prometheus_client.parser import text_string_to_metric_families

from infra.local.alert_workers import AlertWorkers
from infra.local.services import free_port
from infra.local.webhook_receiver import WebhookReceiver
from tests.head.conftest import FINALITY, SECRET, WATCHED, Chain, MakeLake, wait_for
from tests.utils.otlp_collector import CollectedSpan, OtlpCollector


def scrape(port: int) -> dict[str, float]:
    """`name{labels}` -> value of every sample a /metrics endpoint serves."""
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items()))
            samples[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
    return samples


def chain_of(spans: list[CollectedSpan], leaf: CollectedSpan) -> list[CollectedSpan]:
    """`leaf` and its ancestors, root first."""
    by_id = {s.span_id: s for s in spans}
    path = [leaf]
    while path[-1].parent_span_id in by_id:
        path.append(by_id[path[-1].parent_span_id])
    return path[::-1]


def test_an_alert_is_traced_from_its_finalized_block_to_its_delivery_and_every_worker_is_scraped(
    chain: Chain, make_lake: MakeLake
) -> None:
    ports = {"follower": free_port(), "sink": free_port(), "deliverer": free_port()}
    with OtlpCollector() as collector:
        lake = make_lake(
            10_000,
            otlp_endpoint=collector.url,
            head_metrics_port=ports["follower"],
            sink_metrics_port=ports["sink"],
            deliverer_metrics_port=ports["deliverer"],
        )
        lake.env["OTEL_BSP_SCHEDULE_DELAY"] = "100"  # export within 0.1 s, not 5 s
        follower = lake.process()
        with WebhookReceiver(SECRET) as hook:
            lake.rule("acme", "watch", f"{hook.url}/acme")
            follower.start()  # starts while the sink and the deliverer do
            with AlertWorkers(lake.env, lake.root):
                follower.wait_ready()
                tx = chain.send(WATCHED, 424_242)
                block = int(chain.receipt(tx)["blockNumber"], 16)
                chain.mine(FINALITY)  # finalized now, not in 64 blocks' time
                wait_for(lambda: len(hook.snapshot()) >= 1, "the alert at the webhook", 120)
                [delivery] = hook.snapshot()
                assert delivery.alert["row"]["transaction_hash"] == tx

                deliver = collector.wait_for(
                    lambda spans: [s for s in spans if s.name == "alert.deliver"],
                    "the delivery's span",
                )[0]
                metrics = {name: scrape(port) for name, port in ports.items()}
                assert follower.stop() == 0

        spans = collector.snapshot()

    # one trace, one span per hop, each the child of the one before, each in its own process
    path = chain_of(spans, deliver)
    assert [(s.service, s.name) for s in path] == [
        ("trace-head-follower", "finalized_blocks"),
        ("trace-head-follower", "alert.publish"),
        ("trace-alert-sink", "alert.sink"),
        ("trace-alert-deliverer", "alert.deliver"),
    ]
    assert len({s.trace_id for s in path}) == 1
    root, publish, sink, _ = path
    assert root.parent_span_id == ""
    assert root.attributes["chain.block.first"] <= block <= root.attributes["chain.block.last"]
    assert publish.attributes["alert.messages"] >= 1
    assert sink.attributes["alert.messages"] >= 1
    assert deliver.attributes["alert.outcome"] == "delivered"
    assert deliver.attributes["alert.dedupe_key"] == delivery.dedupe_key
    assert deliver.attributes["alert.channel"] == "acme/hook"
    # the block's commit is a child of the same run
    commits = [s for s in spans if s.name == "head.commit" and s.parent_span_id == root.span_id]
    assert len(commits) == 1
    assert "native_transfers" in commits[0].attributes["datasets"]

    # Prometheus: each long-running worker counted its part of this alert
    assert metrics["follower"]["trace_head_blocks_total"] >= 1
    assert metrics["follower"]['trace_head_alert_messages_total{confirmation="finalized"}'] >= 1
    assert metrics["sink"]["trace_sink_alerts_inserted_total"] >= 1
    assert metrics["deliverer"]['trace_delivery_attempts_total{outcome="delivered"}'] >= 1
    assert metrics["deliverer"]["trace_delivery_send_seconds_count"] >= 1
