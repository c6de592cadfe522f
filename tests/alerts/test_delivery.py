"""Delivery: signed webhooks and Slack, backoff, dead letters and replay, slow and hanging
receivers, rate limits. Real HTTP receivers on loopback."""

from __future__ import annotations

import json
import threading
import time

import pytest
import sqlalchemy as sa

from tests.alerts.conftest import (
    SECRET,
    Receiver,
    count,
    make_rule,
    messages_for,
    store_rule,
    webhook,
)
from trace_assets.cli import main as trace_cli
from trace_resources.alert_pipeline.delivery import Deliverer, DeliveryPolicy, verify_signature
from trace_resources.alert_pipeline.sink import upsert_messages

# max_attempts (the safety bound) ends these retries long before the 24 h retry period:
# test_delivery_retries covers the period itself
FAST = DeliveryPolicy(max_attempts=3, backoff_base_s=0.2, timeout_s=2.0, concurrency=4)


def test_webhook_is_signed_and_slack_gets_text(engine: sa.Engine, receiver: Receiver) -> None:
    rule = make_rule(
        [
            webhook("hook", receiver.url("/ok")),
            {"kind": "slack", "name": "chat", "url": receiver.url("/slack")},
        ]
    )
    stored = store_rule(engine, rule)
    upsert_messages(engine, messages_for(stored, 3))
    stats = Deliverer(engine, FAST).run(until_idle=True)
    assert stats.delivered == 6
    hooks = receiver.on("/ok")
    assert sorted(h.headers["x-trace-dedupe-key"] for h in hooks) == [
        f"k-{i:06d}" for i in range(3)
    ]
    for hit in hooks:
        ts, sig = hit.headers["x-trace-timestamp"], hit.headers["x-trace-signature"]
        assert verify_signature(SECRET, ts, hit.body, sig)
        assert not verify_signature("another-secret-0123456789", ts, hit.body, sig)
        assert not verify_signature(SECRET, ts, hit.body + b" ", sig)
        assert json.loads(hit.body)["alert"]["org"] == "acme"
    assert sorted(json.loads(h.body)["text"] for h in receiver.on("/slack")) == [
        f"alert k-{i}" for i in range(3)
    ]
    assert count(engine, "SELECT count(*) FROM trace_alert_deliveries WHERE state='delivered'") == 6


def test_5xx_backs_off_goes_dead_and_replay_delivers_once_more(
    engine: sa.Engine,
    receiver: Receiver,
    worker_env: dict[str, str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    stored = store_rule(engine, make_rule([webhook("hook", receiver.url("/toggle"))]))
    (message,) = messages_for(stored, 1)
    upsert_messages(engine, [message])
    deliverer = Deliverer(engine, FAST)
    deadline = time.monotonic() + 20
    while count(engine, "SELECT count(*) FROM trace_alert_deliveries WHERE state='dead'") == 0:
        assert time.monotonic() < deadline
        deliverer.run(until_idle=True)
        time.sleep(0.05)
    hits = receiver.on("/toggle")
    assert len(hits) == FAST.max_attempts
    with engine.connect() as conn:
        waits = [
            (row.next_attempt_at - row.finished_at).total_seconds()
            for row in conn.execute(
                sa.text(
                    "SELECT next_attempt_at, finished_at FROM trace_alert_delivery_attempts "
                    "WHERE outcome = 'retry' ORDER BY attempt"
                )
            )
        ]
    # jitter over the upper half of 0.2 * 2^(n-1): [0.1, 0.2] then [0.2, 0.4]
    assert len(waits) == 2 and 0.1 <= waits[0] <= 0.2 and 0.2 <= waits[1] <= 0.4, waits

    for key, value in worker_env.items():
        monkeypatch.setenv(key, value)
    assert trace_cli(["dlq", "list", "--json"]) == 0
    receiver.healthy = True
    assert trace_cli(["dlq", "replay", "--all"]) == 0
    # a duplicate upsert meanwhile (the buffer redelivered the message) changes nothing
    assert upsert_messages(engine, [message, message]) == 0
    deliverer.run(until_idle=True)
    assert count(engine, "SELECT count(*) FROM trace_alerts") == 1
    row = "SELECT state || ':' || replays FROM trace_alert_deliveries"
    with engine.connect() as conn:
        assert conn.execute(sa.text(row)).scalar_one() == "delivered:1"
    assert receiver.keys("/toggle").count(message.dedupe_key) == FAST.max_attempts + 1


def test_dlq_cli_lists_dead_letters(
    engine: sa.Engine,
    receiver: Receiver,
    worker_env: dict[str, str],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    stored = store_rule(engine, make_rule([webhook("hook", receiver.url("/fail"))]))
    upsert_messages(engine, messages_for(stored, 2))
    deliverer = Deliverer(engine, DeliveryPolicy(max_attempts=1, timeout_s=2.0))
    deliverer.run(until_idle=True)
    for key, value in worker_env.items():
        monkeypatch.setenv(key, value)
    capsys.readouterr()
    assert trace_cli(["dlq", "list", "--json"]) == 0
    dead = json.loads(capsys.readouterr().out)
    assert sorted(d["dedupe_key"] for d in dead) == ["k-000000", "k-000001"]
    assert {d["channel"] for d in dead} == {"acme/hook"}
    assert all("HTTP 500" in d["last_error"] for d in dead)
    assert trace_cli(["dlq", "replay", "--key", "k-000001"]) == 0
    assert "replayed 1 dead letter" in capsys.readouterr().out
    assert count(engine, "SELECT count(*) FROM trace_alert_deliveries WHERE state='pending'") == 1


def test_hanging_receiver_times_out_and_blocks_no_other_channel(
    engine: sa.Engine, receiver: Receiver
) -> None:
    policy = DeliveryPolicy(max_attempts=2, backoff_base_s=0.1, timeout_s=0.8, concurrency=4)
    stuck = store_rule(engine, make_rule([webhook("stuck", receiver.url("/hang"))], rule_id="a"))
    slow = store_rule(
        engine, make_rule([webhook("slow", receiver.url("/slow"), rate_per_s=100)], rule_id="b")
    )
    upsert_messages(engine, messages_for(stuck, 1, prefix="stuck"))
    upsert_messages(engine, messages_for(slow, 12, prefix="slow"))
    deliverer = Deliverer(engine, policy)
    runner = threading.Thread(target=deliverer.run, kwargs={"until_idle": True})
    started = time.monotonic()
    runner.start()
    # 12 slow (0.3 s) deliveries on 3 free slots take ~1.2 s, within the first hang's timeout
    # plus its backoff: the hanging alert does not hold them back
    while count(engine, "SELECT count(*) FROM trace_alert_deliveries WHERE state='delivered'") < 12:
        assert time.monotonic() - started < 3.0, "slow deliveries were blocked"
        time.sleep(0.05)
    runner.join(timeout=20)
    assert not runner.is_alive()
    with engine.connect() as conn:
        state, error = conn.execute(
            sa.text(
                "SELECT state, last_error FROM trace_alert_deliveries WHERE channel='acme/stuck'"
            )
        ).one()
    assert state == "dead" and "timed out" in error
    assert len(receiver.on("/hang")) == 2


def test_channel_rate_limit(engine: sa.Engine, receiver: Receiver) -> None:
    stored = store_rule(engine, make_rule([webhook("hook", receiver.url("/ok"), rate_per_s=5)]))
    upsert_messages(engine, messages_for(stored, 15))
    deliverer = Deliverer(engine, FAST)
    runner = threading.Thread(target=deliverer.run, kwargs={"poll_s": 0.05})
    runner.start()
    try:
        deadline = time.monotonic() + 15
        while len(receiver.on("/ok")) < 15:
            assert time.monotonic() < deadline
            time.sleep(0.05)
    finally:
        deliverer.stopping.set()
        runner.join(timeout=10)
    assert sorted(receiver.keys("/ok")) == [f"k-{i:06d}" for i in range(15)]
    # when each send was claimed, by the database's clock (the one the token bucket runs on,
    # so the bound is exact, whatever the load on this machine)
    with engine.connect() as conn:
        times = [
            row.started_at.timestamp()
            for row in conn.execute(
                sa.text("SELECT started_at FROM trace_alert_delivery_attempts ORDER BY 1")
            )
        ]
    assert len(times) == 15
    # burst of 5, then 5 per second: the 15th no earlier than 2 s after the first
    assert times[-1] - times[0] >= 2.0 - 1e-3, times[-1] - times[0]
    assert deliverer.stats.rate_limited > 0
    in_any_second = max(sum(1 for t in times if s <= t < s + 1.0) for s in times)
    assert in_any_second <= 10  # burst + rate
