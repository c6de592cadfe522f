"""Soak: 10,000 alerts through the buffer, the sink process and the deliverer process, each
killed (SIGKILL) three times while alerts flow: every alert ends as exactly one row and is
delivered at least once.

The producer publishes at a steady pace, as evaluations of successive ranges do, a tenth of
each chunk again with the next chunk (a re-evaluation's repeats, in other SQS messages), and
the kills fall while it publishes. `SOAK_ALERTS` scales the run (at least 10,000 by default).
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from collections import Counter

import sqlalchemy as sa

from tests.alerts.conftest import (
    Receiver,
    Workers,
    count,
    make_rule,
    messages_for,
    store_rule,
    wait_for,
    webhook,
)
from trace_resources.alert_pipeline.queue import BufferMessage, SqsBuffer

ALERTS = int(os.environ.get("SOAK_ALERTS", "10000"))
KILLS = 3
CHUNK = 250  # alerts per publish (one range's evaluation)
PUBLISH_PAUSE_S = 0.25  # between publishes: ~1,000 alerts/s offered
SINK = "trace_resources.alert_pipeline.sink"
DELIVERER = "trace_resources.alert_pipeline.delivery"


def test_soak_with_sigkilled_sink_and_deliverer(
    engine: sa.Engine,
    buffer: SqsBuffer,
    receiver: Receiver,
    worker_env: dict[str, str],
    workers: Workers,
) -> None:
    rules = [
        store_rule(
            engine,
            make_rule(
                [webhook(f"hook{i}", receiver.url("/ok"), rate_per_s=10_000)], rule_id=f"r{i}"
            ),
        )
        for i in range(2)
    ]
    alerts = [m for i, r in enumerate(rules) for m in messages_for(r, ALERTS // 2, prefix=f"r{i}")]
    assert len(alerts) == ALERTS
    env = {
        **worker_env,
        "TRACE_ALERTS_SINK_BATCH": "200",
        "TRACE_ALERTS_VISIBILITY_TIMEOUT_S": "2",  # as the queue was created
        "TRACE_ALERT_DELIVERY_CONCURRENCY": "16",
        "TRACE_ALERT_DELIVERY_TIMEOUT_S": "1",
    }
    published = threading.Event()
    sent = Counter[str]()

    def publish() -> None:
        repeats: list[BufferMessage] = []
        for start in range(0, len(alerts), CHUNK):
            chunk = alerts[start : start + CHUNK]
            sent["alerts"] += buffer.send(chunk + repeats)
            repeats = chunk[::10]
            time.sleep(PUBLISH_PAUSE_S)
        sent["alerts"] += buffer.send(repeats)
        published.set()

    started = time.monotonic()
    publisher = threading.Thread(target=publish, daemon=True)
    sink = workers.start(SINK, env, "--idle-wait", "1")
    deliverer = workers.start(DELIVERER, env, "--poll", "0.1")
    publisher.start()
    kills = Counter[str]()
    rows_at_kill = []

    def rows() -> int:
        return count(engine, "SELECT count(*) FROM trace_alerts")

    def wait_for_rows(floor: int, proc: subprocess.Popen[bytes]) -> None:
        wait_for(
            lambda: rows() >= floor,
            120,
            "the sink to make progress before the next kill",
            lambda: workers.log(proc)[-2000:],
        )

    for _ in range(KILLS):
        # a kill once the workers are at work, the next after more rows came in
        wait_for_rows(rows() + ALERTS // (KILLS + 2), sink)
        rows_at_kill.append(rows())
        for name, proc in (("sink", sink), ("deliverer", deliverer)):
            Workers.signal(proc, signal.SIGKILL)
            assert proc.wait(timeout=10) == -signal.SIGKILL
            kills[name] += 1
        sink = workers.start(SINK, env, "--idle-wait", "1")
        deliverer = workers.start(DELIVERER, env, "--poll", "0.1")
    assert kills == {"sink": KILLS, "deliverer": KILLS}
    assert all(n < ALERTS for n in rows_at_kill), rows_at_kill  # every kill hit work in flight

    assert published.wait(timeout=180), "the publisher did not finish"
    publisher.join(timeout=10)
    wait_for(
        lambda: (
            count(engine, "SELECT count(*) FROM trace_alerts") == len(alerts)
            and buffer.approximate_depth() == 0
        ),
        180,
        "the sink to upsert every alert",
        lambda: (
            count(engine, "SELECT count(*) FROM trace_alerts"),
            buffer.approximate_depth(),
            sink.poll(),
            workers.log(sink)[-3000:],
        ),
    )
    sunk = time.monotonic()
    wait_for(
        lambda: (
            count(engine, "SELECT count(*) FROM trace_alert_deliveries WHERE state <> 'delivered'")
            == 0
        ),
        180,
        "every delivery",
        lambda: (
            count(engine, "SELECT count(*) FROM trace_alert_deliveries WHERE state <> 'delivered'"),
            workers.log(deliverer)[-3000:],
        ),
    )
    delivered = time.monotonic()
    for proc in (sink, deliverer):
        Workers.signal(proc, signal.SIGTERM)
        assert proc.wait(timeout=30) == 0

    assert sent["alerts"] == ALERTS + ALERTS // 10  # every alert, plus a tenth repeated
    assert count(engine, "SELECT count(*) FROM trace_alerts") == len(alerts)
    assert count(engine, "SELECT count(DISTINCT dedupe_key) FROM trace_alerts") == len(alerts)
    assert count(engine, "SELECT count(*) FROM trace_alert_deliveries") == len(alerts)
    received = Counter(receiver.keys("/ok"))
    expected = {m.dedupe_key for m in alerts}
    assert set(received) == expected  # every alert delivered at least once, nothing else
    redelivered = sum(n - 1 for n in received.values())
    print(
        f"soak: alerts={len(alerts)} kills={dict(kills)} rows_at_kills={rows_at_kill} "
        f"redelivered={redelivered} sunk_s={sunk - started:.1f} "
        f"delivered_s={delivered - started:.1f}"
    )
