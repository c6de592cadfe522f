"""The sink: one row per dedupe_key whatever the buffer repeats, and nothing lost."""

from __future__ import annotations

import os
import signal

import sqlalchemy as sa

from tests.alerts.conftest import (
    Workers,
    count,
    make_rule,
    messages_for,
    store_rule,
    wait_for,
    webhook,
)
from trace_resources.alert_pipeline.queue import SqsBuffer
from trace_resources.alert_pipeline.sink import Sink, upsert_messages

SINK = "trace_resources.alert_pipeline.sink"


def test_same_key_twice_in_one_batch_is_one_row(engine: sa.Engine, buffer: SqsBuffer) -> None:
    stored = store_rule(engine, make_rule([webhook("hook", "http://127.0.0.1:9/x")]))
    first, second = messages_for(stored, 2)
    # the same key twice in one INSERT would make Postgres refuse the whole statement
    assert upsert_messages(engine, [first, first, second, first]) == 2
    assert upsert_messages(engine, [first, second]) == 0
    assert count(engine, "SELECT count(*) FROM trace_alerts") == 2
    assert count(engine, "SELECT count(*) FROM trace_alert_deliveries") == 2

    # and through the queue: one received batch holding a repeated key
    third = messages_for(stored, 1, prefix="q")[0]
    buffer.send([third, third, third, first])
    sink = Sink(buffer, engine, batch=50)
    handled = 0
    while handled < 4:
        handled += sink.cycle(wait_s=1)
    assert sink.stats.inserted == 1 and sink.stats.duplicates == 3
    assert count(engine, "SELECT count(*) FROM trace_alerts") == 3
    assert buffer.receive(10, wait_s=0) == []


def test_two_concurrent_sink_processes(
    engine: sa.Engine, buffer: SqsBuffer, worker_env: dict[str, str], workers: Workers
) -> None:
    stored = store_rule(engine, make_rule([webhook("hook", "http://127.0.0.1:9/x")]))
    unique = messages_for(stored, 150)
    a = workers.start(SINK, worker_env, "--idle-wait", "1")
    b = workers.start(SINK, worker_env, "--idle-wait", "1")
    for proc in (a, b):  # both polling (and their SIGTERM handlers installed) before any work
        workers.wait_for_log(proc, "sink ready")
    buffer.send(unique * 3)  # every key three times, spread over the queue
    wait_for(lambda: buffer.approximate_depth() == 0, 60, "both sinks to drain the queue")
    for proc in (a, b):
        Workers.signal(proc, signal.SIGTERM)
    assert a.wait(timeout=20) == 0 and b.wait(timeout=20) == 0
    assert count(engine, "SELECT count(*) FROM trace_alerts") == 150
    assert count(engine, "SELECT count(DISTINCT dedupe_key) FROM trace_alerts") == 150
    assert count(engine, "SELECT count(*) FROM trace_alert_deliveries") == 150


def test_crash_between_upsert_and_ack_loses_and_duplicates_nothing(
    engine: sa.Engine, buffer: SqsBuffer, worker_env: dict[str, str], workers: Workers
) -> None:
    stored = store_rule(engine, make_rule([webhook("hook", "http://127.0.0.1:9/x")]))
    buffer.send(messages_for(stored, 120))
    sqs_messages = buffer.approximate_depth()  # each packs several alerts
    crashing = workers.start(SINK, {**worker_env, "TRACE_CRASH_POINT": "sink.after_upsert"})
    assert crashing.wait(timeout=30) == -signal.SIGKILL
    upserted = count(engine, "SELECT count(*) FROM trace_alerts")
    assert 0 < upserted < 120  # the first batch committed (whole SQS messages), never acknowledged
    assert buffer.approximate_depth() == sqs_messages  # nothing was deleted
    survivor = workers.start(SINK, worker_env, "--idle-wait", "1")
    wait_for(lambda: buffer.approximate_depth() == 0, 60, "the restarted sink to drain")
    Workers.signal(survivor, signal.SIGTERM)
    assert survivor.wait(timeout=20) == 0
    assert count(engine, "SELECT count(*) FROM trace_alerts") == 120
    assert count(engine, "SELECT count(DISTINCT dedupe_key) FROM trace_alerts") == 120


def test_sigterm_drains_and_flushes(
    engine: sa.Engine, buffer: SqsBuffer, worker_env: dict[str, str], workers: Workers
) -> None:
    stored = store_rule(engine, make_rule([webhook("hook", "http://127.0.0.1:9/x")]))
    sink = workers.start(SINK, worker_env, "--idle-wait", "5")
    workers.wait_for_log(sink, "sink ready")  # handlers installed; before that SIGTERM kills
    buffer.send(messages_for(stored, 400))
    Workers.signal(sink, signal.SIGTERM)  # at once: mid long-poll or mid batch
    assert sink.wait(timeout=60) == 0
    log = workers.log(sink)
    assert "draining the buffer" in log, log
    assert count(engine, "SELECT count(*) FROM trace_alerts") == 400
    assert buffer.approximate_depth() == 0


def test_unparseable_message_goes_to_dead_letters_and_blocks_nothing(
    engine: sa.Engine, buffer: SqsBuffer, s3_server: object, queue_name: str
) -> None:
    stored = store_rule(engine, make_rule([webhook("hook", "http://127.0.0.1:9/x")]))
    buffer.client.send_message(QueueUrl=buffer.queue_url, MessageBody="{not json")
    buffer.send(messages_for(stored, 5))
    endpoint = os.environ.get("AWS_ENDPOINT_URL") or s3_server.endpoint_url  # type: ignore[attr-defined]
    dead = SqsBuffer(f"{queue_name}-dlq", endpoint_url=endpoint, visibility_timeout_s=2)
    sink = Sink(buffer, engine, batch=50, dead_letters=dead)
    while sink.stats.received < 6:
        sink.cycle(wait_s=1)
    assert count(engine, "SELECT count(*) FROM trace_alerts") == 5
    assert sink.stats.poison == 1
    parked = dead.client.receive_message(QueueUrl=dead.queue_url, WaitTimeSeconds=1)
    assert [m["Body"] for m in parked["Messages"]] == ["{not json"]
    assert buffer.approximate_depth() == 0
