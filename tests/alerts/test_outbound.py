"""Hostile tenants (issue 15): channels that point inside the platform are refused when a rule
is written and at every delivery (DNS may change in between), nothing a receiver answers
reaches the tenant, redirects are not followed, and channel secrets are sealed at rest.

Real Postgres and real HTTP receivers on loopback; only DNS answers are replaced (there is no
DNS server), through the resolver the outbound policy uses."""

from __future__ import annotations

import ipaddress
import json
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pydantic
import pytest
import sqlalchemy as sa
from alembic.operations import Operations
from alembic.runtime.migration import MigrationContext

from tests.alerts.conftest import (
    SECRET,
    Receiver,
    email_channel,
    make_rule,
    messages_for,
    webhook,
)
from trace_assets.cli import main as trace_cli
from trace_resources.alert_pipeline import outbound
from trace_resources.alert_pipeline.delivery import Deliverer, DeliveryPolicy, verify_signature
from trace_resources.alert_pipeline.dlq import list_dead
from trace_resources.alert_pipeline.history import list_alerts
from trace_resources.alert_pipeline.outbound import OutboundPolicy
from trace_resources.alert_pipeline.rules import ChannelRefused, RuleStore
from trace_resources.alert_pipeline.sink import upsert_messages
from trace_resources.sealed import Keyring, SealError, secret_context
from trace_resources.settings import Settings
from trace_resources.storage.migrations.data import v0002_sealed_secrets

ONE = DeliveryPolicy(max_attempts=1, timeout_s=2.0)
PUBLIC_ONLY = OutboundPolicy()
LOOPBACK_ALLOWED = OutboundPolicy.parse("127.0.0.1/32")
KEY_A = "ka:" + "A" * 43 + "="
KEY_B = "kb:" + "B" * 43 + "="
LEAK = "internal-service-token-AKIA0123456789SECRET"

# every way of writing an internal address that a tenant tried, and what the refusal says
HOSTILE_URLS = [
    ("http://127.0.0.1/", "127.0.0.1 is a loopback address"),
    ("http://2130706433/", "2130706433 is a loopback address"),
    ("http://0x7f.1/", "0x7f.1 is a loopback address"),
    ("http://0x7f000001/", "is a loopback address"),
    ("http://127.1/", "127.1 is a loopback address"),
    ("http://0177.0.0.1/", "url does not parse"),
    ("http://127.0.0.1.:8080/", "is a loopback address"),
    ("http://[::1]/", "::1 is a loopback address"),
    ("http://[::ffff:127.0.0.1]/", "loopback address (IPv4-mapped)"),
    ("http://[::ffff:7f00:1]/", "loopback address (IPv4-mapped)"),
    ("http://[64:ff9b::7f00:1]/", "loopback address (NAT64)"),
    ("http://[64:ff9b::a9fe:a9fe]/", "cloud metadata address (NAT64)"),
    ("http://[2002:7f00:1::]/", "loopback address (6to4)"),
    ("http://[2001:0:4136:e378:8000:63bf:80ff:fffe]/", "loopback address (Teredo)"),
    ("http://[::7f00:1]/", "loopback address (IPv4-compatible)"),
    ("http://0.0.0.0/", "0.0.0.0 is an unspecified address"),
    ("http://0/", "is an unspecified address"),
    ("http://[::]/", "is an unspecified address"),
    ("http://169.254.169.254/latest/meta-data/", "169.254.169.254 is a cloud metadata address"),
    ("http://[fd00:ec2::254]/", "fd00:ec2::254 is a cloud metadata address"),
    ("http://169.254.1.1/", "a link-local address"),
    ("http://[fe80::1]/", "a link-local address"),
    ("http://10.0.0.5/", "10.0.0.5 is a private address"),
    ("http://172.16.3.4/", "a private address"),
    ("http://192.168.1.1:8080/", "a private address"),
    ("http://[fc00::1]/", "a private address"),
    ("http://100.64.0.1/", "100.64.0.1 is a shared address"),
    ("http://224.0.0.1/", "a multicast address"),
    ("http://[ff02::1]/", "a multicast address"),
    ("http://240.0.0.1/", "a reserved address"),
    ("http://255.255.255.255/", "a reserved address"),
    ("http://user@127.0.0.1:6379/", "127.0.0.1 is a loopback address"),
    ("https://localhost/", "localhost resolves to a loopback address"),
    ("http://does-not-exist.invalid/", "does-not-exist.invalid does not resolve"),
    ("http://127.0.0.1.nip.io/", "127.0.0.1.nip.io resolves to a loopback address"),
    ("http://metadata.google.internal/", "resolves to a cloud metadata address"),
    ("http://mixed.tenant.example/", "resolves to a private address"),
]

FAKE_DNS = {
    "127.0.0.1.nip.io": ["127.0.0.1"],
    "metadata.google.internal": ["169.254.169.254"],
    # one public answer does not make a name safe: every address is checked
    "mixed.tenant.example": ["93.184.216.34", "10.1.2.3"],
}


@pytest.fixture
def dns(monkeypatch: pytest.MonkeyPatch) -> dict[str, list[str]]:
    """The answers of the policy's resolver for made-up names (others: the real resolver,
    e.g. localhost from /etc/hosts)."""
    answers = dict(FAKE_DNS)
    real = outbound.resolve

    def resolve(host: str, port: int) -> list[Any]:
        if host in answers:
            return [ipaddress.ip_address(a) for a in answers[host]]
        return real(host, port)

    monkeypatch.setattr(outbound, "resolve", resolve)
    return answers


@pytest.mark.parametrize(("url", "says"), HOSTILE_URLS)
def test_hostile_webhook_and_slack_urls_are_refused_when_written(
    engine: sa.Engine, dns: dict[str, list[str]], url: str, says: str
) -> None:
    store = RuleStore(engine, outbound=PUBLIC_ONLY)
    for channel in (webhook("ops-hook", url), {"kind": "slack", "name": "ops-hook", "url": url}):
        with pytest.raises(ChannelRefused) as refused:
            store.create(make_rule([webhook("fine", "http://93.184.216.34/"), channel]))
        message = str(refused.value)
        assert message.startswith("channel ops-hook: ") and says in message, message
        assert "TRACE_ALERT_OUTBOUND_ALLOW" in message
    assert store.latest("acme") == []


@pytest.mark.parametrize(
    "host", ["127.0.0.1", "2130706433", "localhost", "::1", "169.254.169.254", "10.0.0.25"]
)
def test_hostile_smtp_hosts_are_refused_when_written(engine: sa.Engine, host: str) -> None:
    store = RuleStore(engine, outbound=PUBLIC_ONLY)
    with pytest.raises(ChannelRefused, match=r"^channel mail: .* address"):
        store.create(make_rule([{**email_channel("mail", 25), "smtp_host": host}]))
    assert store.latest("acme") == []


def test_a_disabled_rule_may_keep_a_refused_channel(engine: sa.Engine) -> None:
    """Disabling a rule whose receiver is now refused must still work."""
    stored = RuleStore(engine, outbound=LOOPBACK_ALLOWED).create(
        make_rule([webhook("hook", "http://127.0.0.1:9/")])
    )
    disabled = RuleStore(engine, outbound=PUBLIC_ONLY).disable("acme", stored.rule.id)
    assert disabled.version == 2 and not disabled.rule.enabled


def _deliveries(engine: sa.Engine) -> list[tuple[str, str, str | None]]:
    with engine.connect() as conn:
        rows = conn.execute(
            sa.text("SELECT channel, state, last_error FROM trace_alert_deliveries ORDER BY 1")
        ).all()
    return [(r.channel, r.state, r.last_error) for r in rows]


def test_dns_rebinding_after_the_check_is_refused_at_delivery(
    engine: sa.Engine, receiver: Receiver, dns: dict[str, list[str]]
) -> None:
    # public when the rule is written ...
    dns["hooks.tenant.example"] = ["93.184.216.34"]
    url = f"http://hooks.tenant.example:{receiver.port}/ok"
    stored = RuleStore(engine, outbound=PUBLIC_ONLY).create(make_rule([webhook("hook", url)]))
    # ... loopback (where the receiver listens) when the alert is delivered
    dns["hooks.tenant.example"] = ["127.0.0.1"]
    upsert_messages(engine, messages_for(stored, 1))
    stats = Deliverer(engine, ONE, outbound=PUBLIC_ONLY).run(until_idle=True)
    assert stats.dead == 1 and receiver.hits == []
    assert _deliveries(engine) == [
        (
            "acme/hook",
            "dead",
            "refused by outbound policy: hooks.tenant.example resolves to a loopback address",
        )
    ]


def test_connections_go_to_the_checked_address(
    engine: sa.Engine, receiver: Receiver, dns: dict[str, list[str]]
) -> None:
    """The name exists only in the policy's resolver: the delivery reaching the receiver
    proves the socket connected to the address the policy checked, not to a second lookup
    (which could answer differently: DNS rebinding)."""
    dns["receiver.tenant.example"] = ["127.0.0.1"]
    url = f"http://receiver.tenant.example:{receiver.port}/ok"
    stored = RuleStore(engine, outbound=LOOPBACK_ALLOWED).create(make_rule([webhook("hook", url)]))
    upsert_messages(engine, messages_for(stored, 1))
    assert Deliverer(engine, ONE, outbound=LOOPBACK_ALLOWED).run(until_idle=True).delivered == 1
    (hit,) = receiver.on("/ok")
    assert hit.headers["host"] == f"receiver.tenant.example:{receiver.port}"
    assert verify_signature(
        SECRET, hit.headers["x-trace-timestamp"], hit.body, hit.headers["x-trace-signature"]
    )


def test_allow_list_lets_internal_receivers_in_and_nothing_else(
    engine: sa.Engine, receiver: Receiver
) -> None:
    stored = RuleStore(engine, outbound=LOOPBACK_ALLOWED).create(
        make_rule([webhook("hook", receiver.url("/ok"))])
    )
    upsert_messages(engine, messages_for(stored, 2))
    # an operator who removed the allow-list: the next attempts are refused, nothing is sent
    assert Deliverer(engine, ONE, outbound=PUBLIC_ONLY).run(until_idle=True).dead == 2
    assert receiver.hits == []
    assert {e for _, _, e in _deliveries(engine)} == {
        "refused by outbound policy: 127.0.0.1 is a loopback address"
    }
    # allowed by host name and port instead of by address
    by_host = OutboundPolicy.parse(f"127.0.0.1:{receiver.port}")
    stored = RuleStore(engine, outbound=by_host).create(
        make_rule([webhook("hook", receiver.url("/ok"))], rule_id="again")
    )
    upsert_messages(engine, messages_for(stored, 1, prefix="again"))
    assert Deliverer(engine, ONE, outbound=by_host).run(until_idle=True).delivered == 1
    assert len(receiver.on("/ok")) == 1
    with pytest.raises(ChannelRefused, match="127.0.0.1 is a loopback address"):
        RuleStore(engine, outbound=by_host).create(
            make_rule([webhook("hook", "http://127.0.0.1:1/")], rule_id="other-port")
        )


@pytest.fixture
def leaky() -> Iterator[Callable[[str], str]]:
    """A receiver answering with internal-looking text: /fail 500 (body and reason phrase),
    /redirect 302 to /landed on loopback, /teapot an unknown status."""
    landed: list[str] = []

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: Any) -> None:
            pass

        def do_POST(self) -> None:
            self.rfile.read(int(self.headers.get("Content-Length") or 0))
            if self.path == "/landed":
                landed.append(self.path)
            body = f'{{"error": "db down", "token": "{LEAK}"}}'.encode()
            if self.path == "/redirect":
                self.send_response(302, f"Found {LEAK}")
                self.send_header("Location", f"http://127.0.0.1:{self.server.server_port}/landed")
            elif self.path == "/teapot":
                self.send_response(599, LEAK)
            else:
                self.send_response(500, f"Internal {LEAK}")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield lambda path: f"http://127.0.0.1:{server.server_address[1]}{path}"
    finally:
        assert landed == [], "a redirect was followed"
        server.shutdown()
        server.server_close()


def test_receiver_answers_never_reach_the_tenant(
    engine: sa.Engine, leaky: Callable[[str], str]
) -> None:
    rule = make_rule(
        [
            webhook("fail", leaky("/fail")),
            webhook("moved", leaky("/redirect")),
            {"kind": "slack", "name": "odd", "url": leaky("/teapot")},
            webhook("closed", "http://127.0.0.1:1/"),
        ]
    )
    stored = RuleStore(engine, outbound=LOOPBACK_ALLOWED).create(rule)
    upsert_messages(engine, messages_for(stored, 1))
    assert Deliverer(engine, ONE, outbound=LOOPBACK_ALLOWED).run(until_idle=True).dead == 4
    assert _deliveries(engine) == [
        ("acme/closed", "dead", "connection refused"),
        ("acme/fail", "dead", "HTTP 500 Internal Server Error"),
        ("acme/moved", "dead", "HTTP 302 Found (redirects are not followed)"),
        ("acme/odd", "dead", "HTTP 599"),
    ]
    # what the API and `trace dlq list` serve
    (alert,) = list_alerts(engine, "acme", limit=10).alerts
    dead = list_dead(engine)
    served = json.dumps(
        [d.__dict__ for d in alert.deliveries] + [d.__dict__ for d in dead], default=str
    )
    assert "HTTP 500 Internal Server Error" in served
    assert LEAK not in served and "db down" not in served


# -- secrets at rest ---------------------------------------------------------------------------


def _stored_specs(engine: sa.Engine) -> str:
    with engine.connect() as conn:
        return json.dumps(
            [row.spec for row in conn.execute(sa.text("SELECT spec FROM trace_alert_rules"))]
        )


def _secret_rule(rule_id: str = "big") -> Any:
    return make_rule(
        [
            webhook("hook", "http://127.0.0.1:9/"),
            email_channel(
                "mail", 465, security="ssl", username="u", password="smtp-pass-" + SECRET
            ),
        ],
        rule_id=rule_id,
    )


def test_secrets_are_sealed_in_postgres_and_the_deliverer_opens_them(
    engine: sa.Engine, receiver: Receiver
) -> None:
    keyring = Keyring.parse(KEY_A)
    store = RuleStore(engine, outbound=LOOPBACK_ALLOWED, keyring=keyring)
    stored = store.create(make_rule([webhook("hook", receiver.url("/ok"))]))
    store.create(_secret_rule("mail"))
    rows = _stored_specs(engine)
    assert SECRET not in rows and "smtp-pass-" not in rows
    assert rows.count('"enc:v1:ka:') == 3
    # a rule read back holds the sealed value, not the secret
    read = store.get("acme", "big")
    assert read is not None and SECRET not in read.rule.declaration_json()["channels"][0]["secret"]
    # the deliverer opens it to sign
    upsert_messages(engine, messages_for(stored, 1))
    assert (
        Deliverer(engine, ONE, outbound=LOOPBACK_ALLOWED, keyring=keyring)
        .run(until_idle=True)
        .delivered
        == 1
    )
    (hit,) = receiver.on("/ok")
    assert verify_signature(
        SECRET, hit.headers["x-trace-timestamp"], hit.body, hit.headers["x-trace-signature"]
    )
    # a disabled copy keeps the sealed secret (re-sealed, still the same secret)
    disabled = store.disable("acme", "big")
    value = disabled.rule.declaration_json()["channels"][0]["secret"]
    assert keyring.open(value, secret_context("acme", "big", "hook", "secret")) == SECRET
    # a sealed value moved to another rule does not open there
    with pytest.raises(SealError):
        keyring.open(value, secret_context("acme", "other", "hook", "secret"))


def test_rotation_rewraps_and_old_keys_open_until_rotated(
    engine: sa.Engine,
    receiver: Receiver,
    worker_env: dict[str, str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    old = Keyring.parse(KEY_A)
    store = RuleStore(engine, outbound=LOOPBACK_ALLOWED, keyring=old)
    stored = store.create(make_rule([webhook("hook", receiver.url("/ok"))]))
    store.create(_secret_rule("mail"))
    # a legacy row with secrets in clear (before sealing)
    legacy = _secret_rule("legacy").declaration_json()
    with engine.begin() as conn:
        conn.execute(
            sa.text(
                "INSERT INTO trace_alert_rules (org, rule_id, version, spec, enabled) "
                "VALUES ('acme', 'legacy', 1, CAST(:spec AS jsonb), true)"
            ),
            {"spec": json.dumps(legacy)},
        )
    assert SECRET in _stored_specs(engine)

    # the new key first, the old one kept: old secrets still open
    both = Keyring.parse(f"{KEY_B},{KEY_A}")
    upsert_messages(engine, messages_for(stored, 1))
    assert (
        Deliverer(engine, ONE, outbound=LOOPBACK_ALLOWED, keyring=both)
        .run(until_idle=True)
        .delivered
        == 1
    )

    for key, value in worker_env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("TRACE_SECRETS_KEYS", f"{KEY_B},{KEY_A}")
    assert trace_cli(["secrets", "rotate"]) == 0
    rows = _stored_specs(engine)
    assert SECRET not in rows and "enc:v1:ka:" not in rows and rows.count('"enc:v1:kb:') == 5
    assert trace_cli(["secrets", "rotate"]) == 0  # idempotent
    assert _stored_specs(engine) == rows

    # the old key may go now; without the new one nothing opens
    upsert_messages(engine, messages_for(stored, 1, prefix="after"))
    assert (
        Deliverer(engine, ONE, outbound=LOOPBACK_ALLOWED, keyring=Keyring.parse(KEY_B))
        .run(until_idle=True)
        .delivered
        == 1
    )
    upsert_messages(engine, messages_for(stored, 1, prefix="lost"))
    assert (
        Deliverer(engine, ONE, outbound=LOOPBACK_ALLOWED, keyring=old).run(until_idle=True).dead
        == 1
    )
    assert len(receiver.on("/ok")) == 2


def test_migration_seals_secrets_stored_in_clear(
    engine: sa.Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    clear = _secret_rule("legacy").declaration_json()
    with engine.begin() as conn:
        conn.execute(
            sa.text(
                "INSERT INTO trace_alert_rules (org, rule_id, version, spec, enabled) "
                "VALUES ('acme', 'legacy', 1, CAST(:spec AS jsonb), true)"
            ),
            {"spec": json.dumps(clear)},
        )
    monkeypatch.setenv("TRACE_SECRETS_KEYS", KEY_A)
    with engine.begin() as conn, Operations.context(MigrationContext.configure(conn)):
        v0002_sealed_secrets.upgrade()
    rows = _stored_specs(engine)
    assert SECRET not in rows and rows.count('"enc:v1:ka:') == 2
    with engine.begin() as conn, Operations.context(MigrationContext.configure(conn)):
        v0002_sealed_secrets.downgrade()
    assert json.loads(_stored_specs(engine)) == [clear]


def test_prod_refuses_the_development_secrets_key() -> None:
    with pytest.raises(pydantic.ValidationError, match="TRACE_SECRETS_KEYS still holds"):
        Settings(environment="prod")
    assert Settings(environment="prod", secrets_keys=KEY_A).environment == "prod"
    assert Settings(environment="local").secrets_keys.get_secret_value()
    with pytest.raises(pydantic.ValidationError, match="must be 32 bytes"):
        Settings(secrets_keys="k1:dG9vLXNob3J0")
