"""Email delivery over SMTP, against a real SMTP server (aiosmtpd) on loopback: the message a
recipient gets, STARTTLS with a verified certificate and AUTH, temporary refusals and an
unreachable server going through backoff to the dead letters, a permanent refusal (5xx) dead
at once, and `trace dlq replay` delivering them."""

from __future__ import annotations

import json
import time
from collections.abc import Callable

import pytest
import sqlalchemy as sa

from infra.local.services import free_port
from tests.alerts.conftest import (
    MAIL_PASSWORD,
    MailServer,
    SelfSignedTls,
    count,
    email_channel,
    make_rule,
    messages_for,
    store_rule,
)
from trace_assets.cli import main as trace_cli
from trace_resources.alert_pipeline.delivery import Deliverer, DeliveryPolicy
from trace_resources.alert_pipeline.dlq import replay
from trace_resources.alert_pipeline.rules import RuleError, parse_rule
from trace_resources.alert_pipeline.sink import upsert_messages
from trace_resources.sealed import Keyring, secret_context
from trace_resources.settings import get_settings

FAST = DeliveryPolicy(max_attempts=3, backoff_base_s=0.2, timeout_s=5.0, concurrency=4)
RECIPIENTS = ["ops@acme.example", "oncall@acme.example"]


def _delivery(engine: sa.Engine) -> tuple[str, int, str | None, bool]:
    """(state, attempts, last_error, backing off) of the one delivery row."""
    with engine.connect() as conn:
        row = conn.execute(
            sa.text(
                "SELECT state, attempts, last_error, next_attempt_at > now() AS backing_off "
                "FROM trace_alert_deliveries"
            )
        ).one()
    return row.state, row.attempts, row.last_error, row.backing_off


def _until_dead(engine: sa.Engine, deliverer: Deliverer, rows: int = 1) -> None:
    deadline = time.monotonic() + 30
    while count(engine, "SELECT count(*) FROM trace_alert_deliveries WHERE state='dead'") < rows:
        assert time.monotonic() < deadline, _delivery(engine)
        deliverer.run(until_idle=True)
        time.sleep(0.05)


def test_alert_mail_reaches_every_recipient_with_the_alert(
    engine: sa.Engine, mail_servers: Callable[..., MailServer]
) -> None:
    mail = mail_servers()
    stored = store_rule(engine, make_rule([email_channel("mail", mail.port)]))
    messages = messages_for(stored, 2)
    upsert_messages(engine, messages)
    stats = Deliverer(engine, FAST).run(until_idle=True)
    assert stats.delivered == 2 and stats.failed == 0

    received = mail.received()
    assert len(received) == 2
    by_key = {m.message["X-Trace-Dedupe-Key"]: m for m in received}
    assert sorted(by_key) == ["k-000000", "k-000001"]
    for message in messages:
        got = by_key[message.dedupe_key]
        assert got.sender == "trace@alerts.example"
        assert sorted(got.recipients) == sorted(RECIPIENTS)
        assert got.message["To"] == ", ".join(RECIPIENTS)
        assert got.message["Subject"] == f"[trace] {message.payload['text']}"
        body = got.message.get_content()
        assert message.payload["text"] in body
        alert = json.loads(body[body.index("{") :])
        assert alert == {"dedupe_key": message.dedupe_key, "alert": message.payload}
    # one stable Message-ID per alert: a retry of the same alert carries the same one
    assert len({m.message["Message-ID"] for m in received}) == 2
    assert count(engine, "SELECT count(*) FROM trace_alert_deliveries WHERE state='delivered'") == 2


def test_starttls_with_a_verified_certificate_and_auth(
    engine: sa.Engine,
    mail_servers: Callable[..., MailServer],
    self_signed_tls: SelfSignedTls,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    mail = mail_servers(tls=self_signed_tls.server_context)
    channel = email_channel(
        "mail", mail.port, security="starttls", username="trace", password=MAIL_PASSWORD
    )
    wrong = email_channel(
        "wrong", mail.port, security="starttls", username="trace", password="not-the-password"
    )
    stored = store_rule(engine, make_rule([channel, wrong]))
    upsert_messages(engine, messages_for(stored, 1))

    # the certificate is self-signed: until the client trusts it, nothing is sent
    Deliverer(engine, DeliveryPolicy(max_attempts=1, timeout_s=5.0)).run(until_idle=True)
    with engine.connect() as conn:
        errors: dict[str, str] = dict(
            conn.execute(sa.text("SELECT channel, last_error FROM trace_alert_deliveries")).all()
        )
    assert "TLS certificate verification failed" in errors["acme/mail"], errors
    assert mail.received() == []

    monkeypatch.setenv("SSL_CERT_FILE", str(self_signed_tls.ca_file))
    assert replay(engine) == 2
    Deliverer(engine, DeliveryPolicy(max_attempts=1, timeout_s=5.0)).run(until_idle=True)
    with engine.connect() as conn:
        states: dict[str, str] = dict(
            conn.execute(
                sa.text(
                    "SELECT channel, state || ':' || coalesce(last_error, '') FROM "
                    "trace_alert_deliveries"
                )
            ).all()
        )
    assert states["acme/mail"] == "delivered:"
    assert states["acme/wrong"].startswith("dead:") and "535" in states["acme/wrong"], states
    assert mail.logins == ["trace"]
    (got,) = mail.received()
    assert sorted(got.recipients) == sorted(RECIPIENTS)


def test_implicit_tls(
    engine: sa.Engine,
    mail_servers: Callable[..., MailServer],
    self_signed_tls: SelfSignedTls,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    mail = mail_servers(tls=self_signed_tls.server_context, implicit_tls=True)
    monkeypatch.setenv("SSL_CERT_FILE", str(self_signed_tls.ca_file))
    stored = store_rule(engine, make_rule([email_channel("mail", mail.port, security="ssl")]))
    upsert_messages(engine, messages_for(stored, 1))
    assert Deliverer(engine, FAST).run(until_idle=True).delivered == 1
    (got,) = mail.received()
    assert got.message["X-Trace-Dedupe-Key"] == "k-000000"


def test_refusals_back_off_or_go_dead_at_once_and_dlq_replay_delivers(
    engine: sa.Engine,
    mail_servers: Callable[..., MailServer],
    worker_env: dict[str, str],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    mail = mail_servers(healthy=False)
    mail.refuse_code = 450  # temporary: retried
    stored = store_rule(engine, make_rule([email_channel("mail", mail.port)]))
    upsert_messages(engine, messages_for(stored, 1))
    deliverer = Deliverer(engine, FAST)

    deliverer.run(until_idle=True)
    state, attempts, error, backing_off = _delivery(engine)
    assert (state, attempts, backing_off) == ("pending", 1, True)
    assert error is not None and "refused recipients" in error and "450" in error

    _until_dead(engine, deliverer)
    state, attempts, error, _ = _delivery(engine)
    assert (state, attempts) == ("dead", FAST.max_attempts)
    assert mail.received() == []

    for key, value in worker_env.items():
        monkeypatch.setenv(key, value)
    mail.refuse_code = 550  # permanent: dead at its first attempt, not retried
    assert trace_cli(["dlq", "replay", "--all"]) == 0
    deliverer.run(until_idle=True)
    state, attempts, error, _ = _delivery(engine)
    assert (state, attempts) == ("dead", 1) and error is not None and "550" in error
    capsys.readouterr()
    assert trace_cli(["dlq", "list", "--json"]) == 0
    (dead,) = json.loads(capsys.readouterr().out)
    assert dead["channel"] == "acme/mail" and "550" in dead["last_error"]
    assert dead["dead_reason"] == "permanent failure: not retried"
    mail.healthy = True
    assert trace_cli(["dlq", "replay", "--all"]) == 0
    deliverer.run(until_idle=True)
    assert _delivery(engine)[0] == "delivered"
    (got,) = mail.received()
    assert got.message["X-Trace-Dedupe-Key"] == "k-000000"


def test_unreachable_server_goes_dead_and_replay_delivers_once_it_is_up(
    engine: sa.Engine,
    mail_servers: Callable[..., MailServer],
    worker_env: dict[str, str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    port = free_port()  # nothing listens there yet
    stored = store_rule(engine, make_rule([email_channel("mail", port)]))
    upsert_messages(engine, messages_for(stored, 2))
    deliverer = Deliverer(engine, FAST)
    deliverer.run(until_idle=True)
    with engine.connect() as conn:
        rows = conn.execute(
            sa.text("SELECT state, attempts, last_error FROM trace_alert_deliveries")
        ).all()
    assert [(r.state, r.attempts) for r in rows] == [("pending", 1)] * 2
    assert all("connection refused" in r.last_error for r in rows), rows

    _until_dead(engine, deliverer, rows=2)
    mail = mail_servers(port)
    for key, value in worker_env.items():
        monkeypatch.setenv(key, value)
    assert trace_cli(["dlq", "replay", "--all"]) == 0
    deliverer.run(until_idle=True)
    assert count(engine, "SELECT count(*) FROM trace_alert_deliveries WHERE state='delivered'") == 2
    assert sorted(m.message["X-Trace-Dedupe-Key"] for m in mail.received()) == [
        "k-000000",
        "k-000001",
    ]


def test_email_channel_rate_limit_defers_without_spending_attempts(
    engine: sa.Engine, mail_servers: Callable[..., MailServer]
) -> None:
    mail = mail_servers()
    stored = store_rule(engine, make_rule([email_channel("mail", mail.port, rate_per_s=4)]))
    upsert_messages(engine, messages_for(stored, 10))
    deliverer = Deliverer(engine, FAST)
    deadline = time.monotonic() + 30
    while len(mail.received()) < 10:
        assert time.monotonic() < deadline, len(mail.received())
        deliverer.run(until_idle=True)
        time.sleep(0.05)
    assert deliverer.stats.rate_limited > 0
    # waiting for the rate is not an attempt: every alert went out on its first one
    assert count(engine, "SELECT max(attempts) FROM trace_alert_deliveries") == 1


@pytest.mark.parametrize(
    ("change", "where", "says"),
    [
        ({"to": ["not-an-address"]}, "channels.0.email.to.0", "should match pattern"),
        ({"to": ["a@b.example\r\nBcc: x@y.example"]}, "channels.0.email.to.0", "pattern"),
        ({"to": []}, "channels.0.email.to", "at least 1"),
        ({"smtp_port": 0}, "channels.0.email.smtp_port", "greater than 0"),
        ({"security": "tls"}, "channels.0.email.security", "'starttls', 'ssl' or 'none'"),
        ({"username": "u"}, "channels.0.email", "both `username` and `password`"),
        ({"username": "u", "password": "p"}, "channels.0.email", "clear text"),
    ],
)
def test_email_channel_validation_names_the_field(
    change: dict[str, object], where: str, says: str
) -> None:
    spec = {
        "org": "acme",
        "id": "r",
        "condition": {"kind": "watched_addresses", "addresses": ["0x" + "11" * 20]},
        "channels": [{**email_channel("mail", 25), **change}],
    }
    with pytest.raises(RuleError) as raised:
        parse_rule(spec)
    assert f"  {where}: " in str(raised.value) and says in str(raised.value), str(raised.value)


def test_smtp_password_is_stored_for_the_deliverer_but_never_printed() -> None:
    rule = make_rule(
        [email_channel("mail", 587, security="ssl", username="u", password=MAIL_PASSWORD)]
    )
    assert MAIL_PASSWORD not in repr(rule) and MAIL_PASSWORD not in rule.model_dump_json()
    keyring = Keyring.parse(get_settings().secrets_keys.get_secret_value())
    stored = rule.stored_json(keyring)["channels"][0]["password"]
    assert stored.startswith("enc:v1:") and MAIL_PASSWORD not in stored
    context = secret_context("acme", rule.id, "mail", "password")
    assert keyring.open(stored, context) == MAIL_PASSWORD
