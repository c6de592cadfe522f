"""Delivery retries over a period: an outage longer than the old attempt budget, a deliverer
restarted mid-schedule, `Retry-After` honoured, permanent failures dead at once, the retry
period (the operator's, or a channel's within bounds) ending in the dead letters, and
`trace dlq` replaying them. Real receivers on loopback, real deliverers (in process and as
`python -m` processes); schedules are asserted on the attempts recorded in the database."""

from __future__ import annotations

import email.utils
import json
import signal
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from pydantic import ValidationError

from infra.local.services import free_port
from infra.local.webhook_receiver import WebhookReceiver
from tests.alerts.conftest import (
    SECRET,
    Receiver,
    Workers,
    make_rule,
    messages_for,
    store_rule,
    wait_for,
    webhook,
)
from trace_assets.cli import main as trace_cli
from trace_resources.alert_pipeline.delivery import (
    Deliverer,
    DeliveryPolicy,
    expected_attempts,
    parse_retry_after,
)
from trace_resources.alert_pipeline.delivery import main as delivery_main
from trace_resources.alert_pipeline.outbound import OutboundPolicy
from trace_resources.alert_pipeline.rules import RuleStore
from trace_resources.alert_pipeline.sink import upsert_messages
from trace_resources.settings import get_settings

OLD_MAX_ATTEMPTS = 6  # what dead-lettered a delivery before retries had a period


def attempts(engine: sa.Engine, channel: str | None = None) -> list[sa.Row[Any]]:
    """Every recorded attempt (of one channel), in order."""
    query = "SELECT * FROM trace_alert_delivery_attempts"
    if channel is not None:
        query += " WHERE channel = :channel"
    query += " ORDER BY dedupe_key, channel, replay, attempt"
    with engine.connect() as conn:
        return list(conn.execute(sa.text(query), {"channel": channel}).all())


def deliveries(engine: sa.Engine) -> dict[tuple[str, str], sa.Row[Any]]:
    with engine.connect() as conn:
        rows = conn.execute(sa.text("SELECT * FROM trace_alert_deliveries")).all()
    return {(r.dedupe_key, r.channel): r for r in rows}


def run_until(deliverer: Deliverer, engine: sa.Engine, done: str, timeout_s: float) -> None:
    """Run the deliverer in turns until the SQL count `done` is positive."""
    deadline = time.monotonic() + timeout_s
    while True:
        with engine.connect() as conn:
            if conn.execute(sa.text(done)).scalar_one():
                return
        assert time.monotonic() < deadline, deliveries(engine)
        deliverer.run(until_idle=True)
        time.sleep(0.02)


@pytest.fixture
def short_schedule(worker_env: dict[str, str]) -> dict[str, str]:
    """A deliverer process's environment with a schedule of a fraction of a second."""
    return {
        **worker_env,
        "TRACE_ALERT_BACKOFF_BASE_S": "0.2",
        "TRACE_ALERT_BACKOFF_MAX_S": "0.5",
        "TRACE_ALERT_RETRY_PERIOD_MIN_S": "1",
        "TRACE_ALERT_RETRY_PERIOD_S": "120",
        "TRACE_ALERT_DELIVERY_TIMEOUT_S": "1",
    }


@pytest.fixture
def cli_env(worker_env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    for key, value in worker_env.items():
        monkeypatch.setenv(key, value)
    yield


def test_outage_past_the_old_budget_and_a_deliverer_restart_lose_nothing(
    engine: sa.Engine, workers: Workers, short_schedule: dict[str, str]
) -> None:
    port = free_port()  # the receiver is down: nothing listens there yet
    stored = store_rule(engine, make_rule([webhook("hook", f"http://127.0.0.1:{port}/hook")]))
    keys = [m.dedupe_key for m in messages_for(stored, 3)]
    upsert_messages(engine, messages_for(stored, 3))
    module = "trace_resources.alert_pipeline.delivery"
    first = workers.start(module, short_schedule)
    workers.wait_for_log(first, "deliverer ready")
    assert "for 2m (about" in workers.log(first)  # the schedule it runs, in its log

    def fewest_attempts() -> int:
        return min(r.attempts for r in deliveries(engine).values())

    # still retrying after the attempt count that used to dead-letter it
    wait_for(
        lambda: fewest_attempts() > OLD_MAX_ATTEMPTS, 60, "attempts", lambda: deliveries(engine)
    )
    first.send_signal(signal.SIGKILL)  # mid-schedule: the schedule is in PostgreSQL
    first.wait(timeout=10)
    before = deliveries(engine)
    assert {r.state for r in before.values()} == {"pending"}
    assert all(r.last_error == "connection refused" for r in before.values())
    assert all(r.retry_until is not None for r in before.values())

    second = workers.start(module, short_schedule)
    workers.wait_for_log(second, "deliverer ready")

    def resumed() -> bool:
        now = deliveries(engine)
        return all(now[k].attempts > before[k].attempts for k in before)

    wait_for(resumed, 60, "the restarted deliverer to go on", lambda: deliveries(engine))
    after = deliveries(engine)
    # the same schedule goes on: attempts counted on, the period's end unchanged
    assert all(after[k].retry_until == before[k].retry_until for k in before)
    assert all(after[k].state == "pending" for k in before)

    with WebhookReceiver(SECRET, port) as hook:  # the receiver is back
        wait_for(
            lambda: all(r.state == "delivered" for r in deliveries(engine).values()),
            60,
            "deliveries",
            lambda: deliveries(engine),
        )
        got = hook.snapshot()
    # exactly once visible: one delivery per idempotency key, every signature valid
    assert sorted(d.dedupe_key for d in got) == keys
    assert hook.distinct_keys() == set(keys) and hook.rejected == 0
    workers.signal(second, signal.SIGTERM)
    assert second.wait(timeout=30) == 0

    rows = attempts(engine)
    for key in keys:
        mine = [r for r in rows if r.dedupe_key == key]
        # every attempt recorded, numbered without a gap, the last one delivered
        assert [r.attempt for r in mine] == list(range(1, len(mine) + 1))
        assert len(mine) == deliveries(engine)[(key, "acme/hook")].attempts > OLD_MAX_ATTEMPTS
        assert mine[-1].outcome == "delivered"
        assert {r.outcome for r in mine[:-1]} <= {"retry", "lost"}  # lost: the killed one's
        assert all(r.error == "connection refused" for r in mine[:-1] if r.outcome == "retry")
        for earlier, later in zip(mine, mine[1:], strict=False):
            if earlier.outcome == "retry":  # never before it was due
                assert later.started_at >= earlier.next_attempt_at


def test_retry_after_is_honoured_in_seconds_and_as_a_date_within_bounds(
    engine: sa.Engine, receiver: Receiver
) -> None:
    policy = DeliveryPolicy(
        backoff_base_s=0.05,
        backoff_max_s=0.1,
        retry_period_s=60,
        retry_period_min_s=0.5,
        retry_after_max_s=2.5,
        timeout_s=2.0,
    )
    dates: list[str] = []

    def in_two_seconds() -> tuple[int, dict[str, str]]:
        # an HTTP date (whole seconds): 1-2 s after this answer
        when = datetime.now(UTC) + timedelta(seconds=2)
        dates.append(email.utils.format_datetime(when, usegmt=True))
        return 429, {"Retry-After": dates[-1]}

    receiver.script["/busy"] = [
        (503, {"Retry-After": "1"}),
        in_two_seconds,
        (429, {"Retry-After": "86400"}),  # a day: cut to the operator's 2.5 s
        (503, {}),  # no Retry-After: the backoff alone
    ]
    receiver.script["/later"] = [(503, {"Retry-After": "86400"})]
    rule = make_rule(
        [
            webhook("busy", receiver.url("/busy")),
            # a 1 s period: a Retry-After of 2.5 s ends after it, so it is dead at once
            webhook("later", receiver.url("/later"), retry_period_s=1),
        ]
    )
    stored = RuleStore(engine, retry_bounds=(0.5, 60)).create(rule)
    upsert_messages(engine, messages_for(stored, 1))
    deliverer = Deliverer(engine, policy)
    run_until(
        deliverer,
        engine,
        "SELECT count(*) FROM trace_alert_deliveries WHERE channel = 'acme/busy' "
        "AND state = 'delivered'",
        30,
    )
    busy = attempts(engine, "acme/busy")
    assert [r.outcome for r in busy] == ["retry"] * 4 + ["delivered"]
    first, second, third, fourth, fifth = busy
    assert (first.retry_after_s, third.retry_after_s, fourth.retry_after_s) == (1, 86400, None)
    # the next attempt never before the receiver's Retry-After (the database's clock)
    assert first.next_attempt_at - first.finished_at >= timedelta(seconds=1)
    assert second.started_at >= first.finished_at + timedelta(seconds=1)
    assert second.retry_after_s is not None and second.retry_after_s > 0
    assert third.started_at >= email.utils.parsedate_to_datetime(dates[0])
    # a Retry-After beyond the bound is cut to it (the backoff, 0.1 s at most, is shorter)
    assert third.next_attempt_at - third.finished_at == timedelta(seconds=2.5)
    assert fourth.started_at >= third.next_attempt_at
    assert fourth.next_attempt_at - fourth.finished_at <= timedelta(seconds=0.1)
    assert fifth.started_at >= fourth.next_attempt_at
    assert [len(receiver.on(p)) for p in ("/busy", "/later")] == [5, 1]

    later = deliveries(engine)[("k-000000", "acme/later")]
    assert (later.state, later.attempts) == ("dead", 1)
    assert later.dead_reason == "Retry-After 2.5s ends after the retry period"
    assert later.last_error == "HTTP 503 Service Unavailable"


def test_permanent_failures_are_dead_at_once_and_transient_ones_retried(
    engine: sa.Engine, receiver: Receiver
) -> None:
    # a receiver the outbound policy refuses (here: loopback, not allowed): dead at once
    refused = store_rule(
        engine, make_rule([webhook("inside", receiver.url("/ok"))], rule_id="inside")
    )
    upsert_messages(engine, messages_for(refused, 1, prefix="in"))
    public_only = OutboundPolicy()
    Deliverer(engine, DeliveryPolicy(timeout_s=2.0), outbound=public_only).run(until_idle=True)
    inside = deliveries(engine)[("in-000000", "acme/inside")]
    assert (inside.state, inside.attempts) == ("dead", 1)
    assert inside.dead_reason == "permanent failure: not retried"
    assert inside.last_error.startswith("refused by outbound policy: 127.0.0.1 is a loopback")
    assert receiver.on("/ok") == []

    codes = (400, 401, 404, 410, 408, 429, 500, 502)
    stored = store_rule(
        engine, make_rule([webhook(f"s{c}", receiver.url(f"/status/{c}")) for c in codes])
    )
    upsert_messages(engine, messages_for(stored, 1))
    # two attempts at most (the safety bound), so the transient ones end quickly too
    policy = DeliveryPolicy(max_attempts=2, backoff_base_s=0.05, timeout_s=2.0)
    run_until(
        Deliverer(engine, policy),
        engine,
        "SELECT count(*) = 0 FROM trace_alert_deliveries WHERE state = 'pending'",
        30,
    )
    rows = deliveries(engine)
    outcome = {c: (rows[("k-000000", f"acme/s{c}")].attempts) for c in codes}
    assert outcome == {400: 1, 401: 1, 404: 1, 410: 1, 408: 2, 429: 2, 500: 2, 502: 2}
    assert {rows[("k-000000", f"acme/s{c}")].dead_reason for c in (400, 401, 404, 410)} == {
        "permanent failure: not retried"
    }
    assert {rows[("k-000000", f"acme/s{c}")].dead_reason for c in (408, 429, 500, 502)} == {
        "2 attempts (TRACE_ALERT_DELIVERY_MAX_ATTEMPTS)"
    }


def test_retry_period_ends_in_the_dead_letters_per_channel_and_replay_delivers(
    engine: sa.Engine,
    receiver: Receiver,
    cli_env: None,
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
) -> None:
    policy = DeliveryPolicy(
        backoff_base_s=0.1,
        backoff_max_s=0.3,
        retry_period_s=1.5,  # the operator's default
        retry_period_min_s=0.5,
        retry_period_max_s=2.0,
        timeout_s=2.0,
    )
    periods = {"own": 0.6, "default": 1.5, "clamped": 2.0}
    rule = make_rule(
        [
            webhook("own", receiver.url("/toggle"), retry_period_s=0.6),
            webhook("default", receiver.url("/toggle")),
            # allowed when written; the operator has lowered the bound since: 2 s it is
            webhook("clamped", receiver.url("/toggle"), retry_period_s=1000),
        ]
    )
    stored = RuleStore(engine, retry_bounds=(0.5, 5000)).create(rule)
    upsert_messages(engine, messages_for(stored, 1))
    deliverer = Deliverer(engine, policy)
    run_until(
        deliverer,
        engine,
        "SELECT count(*) = 3 FROM trace_alert_deliveries WHERE state = 'dead'",
        30,
    )
    rows = deliveries(engine)
    for name, period in periods.items():
        row = rows[("k-000000", f"acme/{name}")]
        mine = attempts(engine, f"acme/{name}")
        # the period counts from the first failure, by the channel's own or the default
        assert row.retry_until - mine[0].finished_at == timedelta(seconds=period), name
        assert row.dead_reason == "retry period over" and row.attempts == len(mine) >= 2
        # retried on schedule up to the period's end, never scheduled past it; the last
        # attempt happened when it ended and dead-lettered the delivery
        assert all(r.next_attempt_at <= row.retry_until for r in mine[:-1]), name
        assert [r.outcome for r in mine] == ["retry"] * (len(mine) - 1) + ["dead"]
        assert mine[-1].finished_at >= row.retry_until and row.dead_at >= row.retry_until

    capsys.readouterr()
    assert trace_cli(["dlq", "list", "--json"]) == 0
    dead = json.loads(capsys.readouterr().out)
    assert sorted(d["channel"] for d in dead) == ["acme/clamped", "acme/default", "acme/own"]
    assert {(d["last_error"], d["dead_reason"]) for d in dead} == {
        ("HTTP 500 Internal Server Error", "retry period over")
    }
    assert trace_cli(["dlq", "list"]) == 0
    assert "retry period over" in capsys.readouterr().out

    receiver.healthy = True
    assert trace_cli(["dlq", "replay", "--channel", "acme/default"]) == 0
    replayed = deliveries(engine)[("k-000000", "acme/default")]
    assert (replayed.state, replayed.attempts, replayed.retry_until) == ("pending", 0, None)
    deliverer.run(until_idle=True)
    assert deliveries(engine)[("k-000000", "acme/default")].state == "delivered"
    again = [r for r in attempts(engine, "acme/default") if r.replay == 1]
    assert [(r.attempt, r.outcome) for r in again] == [(1, "delivered")]
    capsys.readouterr()
    assert trace_cli(["dlq", "list", "--json"]) == 0  # the other two stay dead letters
    assert len(json.loads(capsys.readouterr().out)) == 2

    # a channel's period outside the operator's bounds is refused when the rule is written
    spec = {
        "org": "acme",
        "id": "too-short",
        "condition": {"kind": "watched_addresses", "addresses": ["0x" + "11" * 20]},
        "channels": [webhook("hook", "http://127.0.0.1:9/x", retry_period_s=5)],
    }
    path = tmp_path / "rule.json"
    path.write_text(json.dumps(spec))
    capsys.readouterr()
    assert trace_cli(["alerts", "rule", "create", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "channel hook: retry_period_s 5 is outside" in err
    assert "bounds 60..604800 s" in err


def test_schedule_helpers_and_inconsistent_settings(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # the documented default: 24 h on base 1 s, capped at 1 h, is about 44 attempts
    assert expected_attempts(DeliveryPolicy()) == 44
    assert parse_retry_after("120") == 120.0
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT", now=1445412470.0) == 10.0
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT", now=1445412490.0) == 0.0
    assert parse_retry_after("soon") is None and parse_retry_after("-5") is None
    assert parse_retry_after(None) is None

    # a default period outside its own bounds: the deliverer says so in one line
    monkeypatch.setenv("TRACE_ALERT_RETRY_PERIOD_S", "30")
    with pytest.raises(ValidationError):
        get_settings()
    assert delivery_main([]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "TRACE_ALERT_RETRY_PERIOD_S (30) must lie within TRACE_ALERT_RETRY_PERIOD_MIN_S" in err
