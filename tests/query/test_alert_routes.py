"""Alert rules and alerts through the query service (real uvicorn, Postgres data): the rule
lifecycle, field-level validation errors, who may change rules, organisation isolation,
secrets never returned, and alerts listed with their per-channel delivery state after a real
deliverer sent them to a receiver on loopback."""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest
import sqlalchemy as sa

from infra.local.query_service import QueryServer, settings_env
from infra.local.services import free_port
from tests.query.conftest import Tokens, World, bearer
from trace_resources.alert_pipeline import tables as t
from trace_resources.alert_pipeline.delivery import Deliverer, DeliveryPolicy
from trace_resources.alert_pipeline.queue import BufferMessage
from trace_resources.alert_pipeline.rules import RuleStore
from trace_resources.alert_pipeline.sink import upsert_messages
from trace_resources.errors import ConfigError
from trace_resources.sealed import Keyring as SecretsKeyring
from trace_resources.sealed import secret_context
from trace_resources.tokens import issue_token

HOOK_SECRET = "webhook-secret-never-returned-0123"
SMTP_PASSWORD = "smtp-password-never-returned"
TOKEN = "0x" + "ab" * 20
MASK = "**********"


def new_org() -> str:
    return f"org_{uuid.uuid4().hex[:10]}"


def manager(tokens: Tokens, org: str, subject: str = "alice") -> str:
    return issue_token(
        tokens.keyring, tokens.settings, org=org, subject=subject, capabilities=["alerts:manage"]
    )[0]


def declaration(rule_id: str = "big-moves", threshold: str = "1000", **changes: Any) -> dict:
    rule: dict[str, Any] = {
        "id": rule_id,
        "description": "large transfers",
        "condition": {"kind": "erc20_transfer_above", "token": TOKEN, "threshold": threshold},
        "channels": [
            {
                "kind": "webhook",
                "name": "hook",
                "url": "http://127.0.0.1:9/h",
                "secret": HOOK_SECRET,
            },
            {
                "kind": "email",
                "name": "mail",
                "to": ["ops@acme.example"],
                "from_address": "trace@acme.example",
                "smtp_host": "127.0.0.1",
                "smtp_port": 2525,
                "security": "starttls",
                "username": "trace",
                "password": SMTP_PASSWORD,
            },
        ],
    }
    rule.update(changes)
    return rule


def error(response: httpx.Response, status: int, code: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    body: dict[str, Any] = response.json()["error"]
    assert body["code"] == code, response.text
    return body


def no_secrets(response: httpx.Response) -> httpx.Response:
    assert HOOK_SECRET not in response.text and SMTP_PASSWORD not in response.text
    return response


def data_engine(world: World) -> sa.Engine:
    return t.data_engine(world.settings.data_dsn)


def test_rule_lifecycle_create_list_get_update_disable(
    client: httpx.Client, tokens: Tokens, world: World
) -> None:
    org = new_org()
    headers = bearer(manager(tokens, org))

    created = no_secrets(client.post("/v1/alerts/rules", json=declaration(), headers=headers))
    assert created.status_code == 201, created.text
    body = created.json()
    assert (body["org"], body["id"], body["version"], body["enabled"]) == (
        org,
        "big-moves",
        1,
        True,
    )
    assert body["kind"] == "erc20_transfer_above"
    assert body["rule"]["org"] == org  # filled from the token
    hook, mail = body["rule"]["channels"]
    assert hook["secret"] == MASK and mail["password"] == MASK
    assert mail["to"] == ["ops@acme.example"] and mail["username"] == "trace"

    # the deliverer (and `trace alerts rule`) see the same rule, its secrets sealed: the row in
    # Postgres holds neither secret, and only the keyring opens them
    stored = RuleStore(data_engine(world)).get(org, "big-moves")
    assert stored is not None and stored.version == 1
    with data_engine(world).connect() as conn:
        row = json.dumps(
            conn.execute(
                sa.text("SELECT spec FROM trace_alert_rules WHERE org = :org"), {"org": org}
            ).scalar_one()
        )
    assert HOOK_SECRET not in row and SMTP_PASSWORD not in row and row.count("enc:v1:") == 2
    sealed = stored.rule.channel("hook").secret.get_secret_value()  # type: ignore[union-attr]
    keyring = SecretsKeyring.parse(world.settings.secrets_keys.get_secret_value())
    context = secret_context(org, "big-moves", "hook", "secret")
    assert sealed.startswith("enc:v1:") and keyring.open(sealed, context) == HOOK_SECRET

    again = client.post("/v1/alerts/rules", json=declaration(), headers=headers)
    assert "PUT /v1/alerts/rules/big-moves" in error(again, 409, "rule_exists")["message"]

    updated = no_secrets(
        client.put(
            "/v1/alerts/rules/big-moves",
            json={k: v for k, v in declaration(threshold="5000").items() if k != "id"},
            headers=headers,
        )
    )
    assert updated.status_code == 200, updated.text
    assert updated.json()["version"] == 2
    assert updated.json()["rule"]["condition"]["threshold"] == "5000"

    other = client.post("/v1/alerts/rules", json=declaration("quiet"), headers=headers)
    assert other.status_code == 201, other.text
    disabled = no_secrets(client.post("/v1/alerts/rules/quiet/disable", headers=headers))
    assert disabled.status_code == 200, disabled.text
    assert (disabled.json()["version"], disabled.json()["enabled"]) == (2, False)
    # disabling a disabled rule writes no new version
    assert client.post("/v1/alerts/rules/quiet/disable", headers=headers).json()["version"] == 2

    listed = no_secrets(client.get("/v1/alerts/rules", headers=headers)).json()
    assert listed["count"] == 2
    assert [(r["id"], r["version"], r["enabled"]) for r in listed["data"]] == [
        ("big-moves", 2, True),
        ("quiet", 2, False),
    ]
    enabled_only = client.get("/v1/alerts/rules", params={"enabled": "true"}, headers=headers)
    assert [r["id"] for r in enabled_only.json()["data"]] == ["big-moves"]
    disabled_only = client.get("/v1/alerts/rules", params={"enabled": "false"}, headers=headers)
    assert [r["id"] for r in disabled_only.json()["data"]] == ["quiet"]

    current = no_secrets(client.get("/v1/alerts/rules/big-moves", headers=headers)).json()
    assert current["version"] == current["latest_version"] == 2
    assert [v["version"] for v in current["versions"]] == [1, 2]
    first = no_secrets(
        client.get("/v1/alerts/rules/big-moves", params={"version": 1}, headers=headers)
    ).json()
    assert (first["version"], first["latest_version"]) == (1, 2)
    assert first["rule"]["condition"]["threshold"] == "1000"
    missing = client.get("/v1/alerts/rules/big-moves", params={"version": 9}, headers=headers)
    assert "at version 9" in error(missing, 404, "unknown_rule")["message"]

    # re-enable through an update
    back = client.put(
        "/v1/alerts/rules/quiet", json=declaration("quiet", enabled=True), headers=headers
    )
    assert (back.json()["version"], back.json()["enabled"]) == (3, True), back.text


@pytest.mark.parametrize(
    ("change", "locs"),
    [
        (
            {
                "condition": {"kind": "erc20_transfer_above", "token": "0x12", "threshold": "-1"},
            },
            [
                ["body", "condition", "erc20_transfer_above", "token"],
                ["body", "condition", "erc20_transfer_above", "threshold"],
            ],
        ),
        (
            {"channels": [{"kind": "webhook", "name": "h", "url": "ftp://x", "secret": "short"}]},
            [
                ["body", "channels", "0", "webhook", "url"],
                ["body", "channels", "0", "webhook", "secret"],
            ],
        ),
        (
            {
                "channels": [
                    {
                        "kind": "email",
                        "name": "m",
                        "to": ["not an address"],
                        "from_address": "trace@acme.example",
                        "smtp_host": "127.0.0.1",
                        "security": "none",
                        "username": "u",
                        "password": "p",
                    }
                ]
            },
            [["body", "channels", "0", "email", "to", "0"]],
        ),
        (
            {"condition": {"kind": "custom_sql", "sql": "DELETE FROM x"}},
            [["body", "condition", "custom_sql", "sql"]],
        ),
        ({"condition": {"kind": "no_such_kind"}}, [["body", "condition"]]),
        ({"id": "Bad Id!"}, [["body", "id"]]),
        ({"colour": "red"}, [["body", "colour"]]),
        ({"channels": []}, [["body", "channels"]]),
    ],
)
def test_invalid_rules_get_field_level_errors_and_write_nothing(
    client: httpx.Client,
    tokens: Tokens,
    world: World,
    change: dict[str, Any],
    locs: list[list[str]],
) -> None:
    org = new_org()
    response = client.post(
        "/v1/alerts/rules", json=declaration(**change), headers=bearer(manager(tokens, org))
    )
    body = error(response, 422, "invalid_request")
    found = [d["loc"] for d in body["details"]]
    for loc in locs:
        assert loc in found, (loc, found)
    assert all(d["msg"] for d in body["details"])
    assert body["message"].startswith(".".join(body["details"][0]["loc"]) + ": ")
    assert RuleStore(data_engine(world)).latest(org) == []


def test_rule_level_errors_name_their_field(client: httpx.Client, tokens: Tokens) -> None:
    org = new_org()
    headers = bearer(manager(tokens, org))
    hook = {"kind": "webhook", "name": "same", "url": "http://x/", "secret": HOOK_SECRET}
    twice = client.post(
        "/v1/alerts/rules", json=declaration(channels=[hook, hook]), headers=headers
    )
    body = error(twice, 422, "invalid_request")
    assert body["details"][0]["loc"] == ["body", "channels"]
    assert "channel names must be unique" in body["message"]

    mail = declaration()["channels"][1]
    clear = client.post(
        "/v1/alerts/rules",
        json=declaration(channels=[{**mail, "security": "none"}]),
        headers=headers,
    )
    body = error(clear, 422, "invalid_request")
    assert body["details"][0]["loc"] == ["body", "channels", "0", "email"]
    assert "clear text" in body["message"]
    assert SMTP_PASSWORD not in clear.text  # not even echoed back in the error

    assert client.post("/v1/alerts/rules", json=declaration(), headers=headers).status_code == 201
    # what GET returned, sent back: the mask is not a secret
    shown = client.get("/v1/alerts/rules/big-moves", headers=headers).json()["rule"]
    shown["channels"][0]["secret"] = HOOK_SECRET
    resent = client.put("/v1/alerts/rules/big-moves", json=shown, headers=headers)
    body = error(resent, 400, "invalid_rule")
    assert body["details"] == [
        {"loc": ["body", "channels", "1", "email", "password"], "msg": "send the secret itself"}
    ]
    renamed = client.put(
        "/v1/alerts/rules/big-moves", json=declaration("other-id"), headers=headers
    )
    assert error(renamed, 400, "invalid_rule")["details"][0]["loc"] == ["body", "id"]
    absent = client.put("/v1/alerts/rules/nope", json=declaration("nope"), headers=headers)
    error(absent, 404, "unknown_rule")
    assert client.get("/v1/alerts/rules/big-moves", headers=headers).json()["version"] == 1


def test_custom_sql_reads_only_what_the_token_may_read(
    client: httpx.Client, tokens: Tokens, world: World
) -> None:
    """The query service's access rule (raw, published, own datasets; narrowed by the token)
    plus the alert datasets; another organisation's dataset reads like a missing one."""
    acme = bearer(manager(tokens, "acme"))
    suffix = uuid.uuid4().hex[:8]

    def create(sql: str, headers: dict[str, str] = acme, rule_id: str = "") -> httpx.Response:
        condition = {"kind": "custom_sql", "sql": sql}
        rule_id = rule_id or f"sql-{uuid.uuid4().hex[:8]}"
        return client.post(
            "/v1/alerts/rules", json=declaration(rule_id, condition=condition), headers=headers
        )

    for sql in (
        "SELECT * FROM blocks WHERE gas_used > 0",
        "SELECT l.* FROM org_acme__labels l JOIN erc20_transfers t ON t.from_address = l.address",
        "WITH n AS (SELECT * FROM native_transfers) SELECT * FROM n",
    ):
        assert create(sql).status_code == 201, create(sql).text

    theirs = create("SELECT * FROM org_globex__secret")
    nobody = create("SELECT * FROM org_nobody__nothing")
    a, b = error(theirs, 400, "invalid_rule"), error(nobody, 400, "invalid_rule")
    assert a["details"][0]["loc"] == ["body", "condition", "custom_sql", "sql"]
    assert a["message"].replace("org_globex__secret", "X") == b["message"].replace(
        "org_nobody__nothing", "X"
    )
    assert "GET /v1/datasets" in a["message"]

    # a token narrowed to some datasets may not alert on the others
    narrowed = issue_token(
        tokens.keyring,
        tokens.settings,
        org="acme",
        subject="carol",
        datasets=["blocks"],
        capabilities=["alerts:manage"],
    )[0]
    labels = "SELECT * FROM org_acme__labels"
    error(create(labels, bearer(narrowed)), 400, "invalid_rule")
    assert create("SELECT * FROM blocks", bearer(narrowed)).status_code == 201

    # the check applies to updates too, and a disabled rule is not evaluated, so not checked
    rule_id = f"upd-{suffix}"
    assert create("SELECT * FROM blocks", rule_id=rule_id).status_code == 201
    bad = declaration(rule_id, condition={"kind": "custom_sql", "sql": "SELECT * FROM x_y"})
    error(client.put(f"/v1/alerts/rules/{rule_id}", json=bad, headers=acme), 400, "invalid_rule")
    off = client.put(f"/v1/alerts/rules/{rule_id}", json={**bad, "enabled": False}, headers=acme)
    assert off.status_code == 200, off.text


def test_reading_needs_an_org_token_and_changing_needs_alerts_manage(
    client: httpx.Client, tokens: Tokens
) -> None:
    org = new_org()
    boss = bearer(manager(tokens, org))
    reader = bearer(tokens.org(org, "bob"))
    task = bearer(tokens.task(["blocks"], org=org))
    assert client.post("/v1/alerts/rules", json=declaration(), headers=boss).status_code == 201

    for response in (
        client.post("/v1/alerts/rules", json=declaration("x"), headers=reader),
        client.put("/v1/alerts/rules/big-moves", json=declaration(), headers=reader),
        client.post("/v1/alerts/rules/big-moves/disable", headers=reader),
    ):
        message = error(response, 403, "missing_capability")["message"]
        assert "alerts:manage" in message
    assert client.get("/v1/alerts/rules/big-moves", headers=reader).json()["enabled"] is True
    assert client.get("/v1/alerts", headers=reader).status_code == 200

    for response in (
        client.get("/v1/alerts/rules", headers=task),
        client.get("/v1/alerts", headers=task),
        client.post("/v1/alerts/rules/big-moves/disable", headers=task),
    ):
        error(response, 403, "task_token_not_allowed")
    error(client.get("/v1/alerts/rules"), 401, "missing_token")

    with pytest.raises(ConfigError, match="capabilities go on org tokens"):
        issue_token(
            tokens.keyring,
            tokens.settings,
            org=org,
            subject="t",
            datasets=["blocks"],
            task="nightly",
            capabilities=["alerts:manage"],
        )
    with pytest.raises(ConfigError, match="unknown capability 'alerts:admin'"):
        issue_token(
            tokens.keyring, tokens.settings, org=org, subject="t", capabilities=["alerts:admin"]
        )
    # a task token that claims a capability (signed with a real key) is refused outright
    now = int(time.time())
    forged = jwt.encode(
        {
            "iss": tokens.settings.query_token_issuer,
            "aud": tokens.settings.query_token_audience,
            "sub": "t",
            "org": org,
            "iat": now,
            "exp": now + 600,
            "jti": str(uuid.uuid4()),
            "scope": {"kind": "task", "datasets": ["blocks"], "capabilities": ["alerts:manage"]},
        },
        tokens.keyring.keys["k-new"].signing_key,  # type: ignore[arg-type]
        algorithm="EdDSA",
        headers={"kid": "k-new"},
    )
    refused = client.post("/v1/alerts/rules/big-moves/disable", headers=bearer(forged))
    assert "only org tokens carry capabilities" in error(refused, 401, "invalid_token")["message"]


def test_another_organisations_rules_and_alerts_are_out_of_reach(
    client: httpx.Client, tokens: Tokens, world: World
) -> None:
    acme, globex = new_org(), new_org()
    a, g = bearer(manager(tokens, acme)), bearer(manager(tokens, globex))
    assert client.post("/v1/alerts/rules", json=declaration(), headers=a).status_code == 201
    stored = RuleStore(data_engine(world)).get(acme, "big-moves")
    assert stored is not None
    upsert_messages(data_engine(world), [alert_message(stored, "acme-1")])

    # globex asking for acme's rule reads exactly like asking for one that does not exist
    for existing, missing in (
        (
            client.get("/v1/alerts/rules/big-moves", headers=g),
            client.get("/v1/alerts/rules/no-such-rule", headers=g),
        ),
        (
            client.put("/v1/alerts/rules/big-moves", json=declaration(), headers=g),
            client.put(
                "/v1/alerts/rules/no-such-rule", json=declaration("no-such-rule"), headers=g
            ),
        ),
        (
            client.post("/v1/alerts/rules/big-moves/disable", headers=g),
            client.post("/v1/alerts/rules/no-such-rule/disable", headers=g),
        ),
    ):
        assert existing.status_code == missing.status_code == 404
        assert existing.json()["error"]["message"].replace("big-moves", "ID") == missing.json()[
            "error"
        ]["message"].replace("no-such-rule", "ID")
    assert client.get("/v1/alerts/rules", headers=g).json() == {"data": [], "count": 0}
    assert client.get("/v1/alerts", headers=g).json()["data"] == []
    wrong = client.post("/v1/alerts/rules", json=declaration(org=acme), headers=g)
    assert acme in error(wrong, 403, "wrong_org")["message"]

    # the same rule id in globex is globex's own rule
    assert client.post("/v1/alerts/rules", json=declaration(), headers=g).status_code == 201
    assert client.post("/v1/alerts/rules/big-moves/disable", headers=g).status_code == 200
    mine = client.get("/v1/alerts/rules/big-moves", headers=a).json()
    assert (mine["org"], mine["version"], mine["enabled"]) == (acme, 1, True)
    assert [x["dedupe_key"] for x in client.get("/v1/alerts", headers=a).json()["data"]] == [
        "acme-1"
    ]


# -- alerts and their delivery state --------------------------------------------------------


def alert_message(
    stored: Any, key: str, *, partition: str = "000000000000-000000000049", kind: str = "alert"
) -> BufferMessage:
    """An alert as the evaluation publishes it (what the sink upserts)."""
    rule = stored.rule
    payload = {
        "type": kind,
        "org": rule.org,
        "rule_id": rule.id,
        "rule_version": stored.version,
        "rule_kind": rule.condition.kind,
        "dataset": "erc20_transfers",
        "partition_key": partition,
        "text": f"[{rule.org}/{rule.id}] {kind} {key}",
    }
    destination = {
        "org": rule.org,
        "rule_id": rule.id,
        "rule_version": stored.version,
        "channels": [c.name for c in rule.channels],
    }
    return BufferMessage(key, payload, destination)


@pytest.fixture
def receiver_url() -> Iterator[str]:
    """A webhook receiver on loopback that answers 200."""

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: Any) -> None:
            pass

        def do_POST(self) -> None:
            self.rfile.read(int(self.headers.get("Content-Length") or 0))
            self.send_response(200)
            self.send_header("Content-Length", "0")
            self.end_headers()

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/hook"
    finally:
        server.shutdown()
        server.server_close()


def test_alerts_are_listed_newest_first_with_their_delivery_state(
    client: httpx.Client, tokens: Tokens, world: World, receiver_url: str
) -> None:
    org = new_org()
    headers = bearer(manager(tokens, org))
    refused_port = free_port()  # nothing listens there: those deliveries fail
    rule = declaration(
        channels=[
            {"kind": "webhook", "name": "hook", "url": receiver_url, "secret": HOOK_SECRET},
            {"kind": "slack", "name": "chat", "url": f"http://127.0.0.1:{refused_port}/slack"},
        ]
    )
    assert client.post("/v1/alerts/rules", json=rule, headers=headers).status_code == 201
    other = declaration("other", channels=rule["channels"][:1])
    assert client.post("/v1/alerts/rules", json=other, headers=headers).status_code == 201
    engine = data_engine(world)
    store = RuleStore(engine)
    big, small = store.get(org, "big-moves"), store.get(org, "other")
    assert big is not None and small is not None
    # three batches, three sink transactions: three distinct created_at
    upsert_messages(engine, [alert_message(big, "a-1"), alert_message(big, "a-2")])
    upsert_messages(engine, [alert_message(small, "b-1", partition="000000000050-000000000099")])
    upsert_messages(engine, [alert_message(big, "retract:a-1", kind="retraction")])

    deliverer = Deliverer(engine, DeliveryPolicy(max_attempts=1, timeout_s=2.0))
    try:
        deliverer.run(until_idle=True)
    finally:
        deliverer.close()

    listed = no_secrets(client.get("/v1/alerts", headers=headers)).json()
    keys = [a["dedupe_key"] for a in listed["data"]]
    assert keys == ["retract:a-1", "b-1", "a-2", "a-1"]
    assert listed["count"] == 4 and listed["next_cursor"] is None
    by_key = {a["dedupe_key"]: a for a in listed["data"]}
    first = by_key["a-1"]
    assert (first["kind"], first["rule_id"], first["rule_version"]) == ("alert", "big-moves", 1)
    assert first["partition_key"] == "000000000000-000000000049"
    assert first["text"] == f"[{org}/big-moves] alert a-1"
    states = {d["channel"]: d for d in first["deliveries"]}
    assert set(states) == {"hook", "chat"}
    assert states["hook"]["state"] == "delivered" and states["hook"]["delivered_at"]
    assert states["hook"]["attempts"] == 1 and states["hook"]["last_error"] is None
    assert states["chat"]["state"] == "dead" and states["chat"]["dead_at"]
    assert states["chat"]["last_error"] == "connection refused"
    assert [d["channel"] for d in by_key["b-1"]["deliveries"]] == ["hook"]

    def keys_of(**params: Any) -> list[str]:
        response = client.get("/v1/alerts", params=params, headers=headers)
        assert response.status_code == 200, response.text
        return [a["dedupe_key"] for a in response.json()["data"]]

    assert keys_of(rule_id="other") == ["b-1"]
    assert keys_of(kind="retraction") == ["retract:a-1"]
    assert keys_of(kind="alert", rule_id="big-moves") == ["a-2", "a-1"]
    assert keys_of(partition_key="000000000050-000000000099") == ["b-1"]
    assert keys_of(rule_id="no-such-rule") == []

    # pages of 3 then 1, by cursor: every alert once, in order
    page = client.get("/v1/alerts", params={"limit": 3}, headers=headers).json()
    assert [a["dedupe_key"] for a in page["data"]] == keys[:3] and page["next_cursor"]
    rest = client.get(
        "/v1/alerts", params={"limit": 3, "cursor": page["next_cursor"]}, headers=headers
    ).json()
    assert [a["dedupe_key"] for a in rest["data"]] == keys[3:] and rest["next_cursor"] is None
    bad = client.get("/v1/alerts", params={"cursor": "not-a-cursor"}, headers=headers)
    assert "next_cursor" in error(bad, 400, "bad_pagination")["message"]
    error(client.get("/v1/alerts", params={"limit": 0}, headers=headers), 422, "bad_pagination")
    error(client.get("/v1/alerts", params={"kind": "x"}, headers=headers), 422, "invalid_request")


def test_alert_routes_answer_503_while_the_data_database_is_down(
    world: World, tokens: Tokens, tmp_path: Path
) -> None:
    port = free_port()  # no Postgres there
    settings = world.settings.model_copy(
        update={"data_dsn": f"postgresql+psycopg2://trace:trace@127.0.0.1:{port}/nowhere"}
    )
    # the environment (AWS_* of the moto server included) is inherited by the child
    server = QueryServer(settings_env(settings), log_file=tmp_path / "uvicorn.log")
    server.start()
    try:
        with httpx.Client(base_url=server.url, timeout=30) as http:
            headers = bearer(tokens.org(new_org()))
            error(http.get("/v1/alerts/rules", headers=headers), 503, "alerts_unavailable")
            error(http.get("/v1/alerts", headers=headers), 503, "alerts_unavailable")
            # the rest of the service is unaffected
            assert (
                http.post(
                    "/v1/query", json={"sql": "SELECT count(*) FROM blocks"}, headers=headers
                ).status_code
                == 200
            )
    finally:
        server.stop()


def test_openapi_documents_the_alert_routes(server: QueryServer) -> None:
    doc = httpx.get(f"{server.url}/openapi.json", timeout=30).json()
    paths = doc["paths"]
    assert set(paths["/v1/alerts/rules"]) == {"get", "post"}
    assert set(paths["/v1/alerts/rules/{rule_id}"]) == {"get", "put"}
    assert "post" in paths["/v1/alerts/rules/{rule_id}/disable"]
    assert "get" in paths["/v1/alerts"]
    schemas = doc["components"]["schemas"]
    assert "EmailChannel" in str(schemas) and "AlertsPublic" in schemas


# -- the outbound policy (issue 15) ------------------------------------------------------------

HOSTILE = [
    ("http://127.0.0.1:6379/", "127.0.0.1 is a loopback address"),
    ("http://2130706433/", "2130706433 is a loopback address"),
    ("http://0x7f.1/", "0x7f.1 is a loopback address"),
    ("http://127.1/", "127.1 is a loopback address"),
    ("http://[::1]/", "::1 is a loopback address"),
    ("http://[::ffff:127.0.0.1]/", "(IPv4-mapped)"),
    ("http://[64:ff9b::7f00:1]/", "(NAT64)"),
    ("http://169.254.169.254/latest/meta-data/", "a cloud metadata address"),
    ("http://[fd00:ec2::254]/", "a cloud metadata address"),
    ("http://0.0.0.0/", "an unspecified address"),
    ("http://10.0.0.5/", "a private address"),
    ("http://100.64.0.1/", "a shared address"),
    ("http://localhost:8700/", "localhost resolves to a loopback address"),
]


@pytest.fixture(scope="module")
def public_only(world: World, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A query service with no outbound allow-list (the tests' own allows loopback)."""
    settings = world.settings.model_copy(update={"alert_outbound_allow": ""})
    log = tmp_path_factory.mktemp("public-only") / "uvicorn.log"
    server = QueryServer({**settings_env(settings), "TRACE_ALERT_OUTBOUND_ALLOW": ""}, log_file=log)
    server.start()
    try:
        yield server.url
    finally:
        server.stop()


def test_hostile_channels_answer_400_naming_the_channel(public_only: str, tokens: Tokens) -> None:
    org = new_org()
    headers = bearer(manager(tokens, org))
    with httpx.Client(base_url=public_only, timeout=30) as http:
        for url, says in HOSTILE:
            hook = {"kind": "webhook", "name": "ops-hook", "url": url, "secret": HOOK_SECRET}
            body = declaration(channels=[hook])
            message = error(
                no_secrets(http.post("/v1/alerts/rules", json=body, headers=headers)),
                400,
                "channel_refused",
            )["message"]
            assert message.startswith("channel ops-hook: ") and says in message, (url, message)
            assert "TRACE_ALERT_OUTBOUND_ALLOW" in message
        mail = {**declaration()["channels"][1], "smtp_host": "169.254.169.254"}
        refused = http.post("/v1/alerts/rules", json=declaration(channels=[mail]), headers=headers)
        assert (
            "channel mail: 169.254.169.254 is a cloud metadata address"
            in error(refused, 400, "channel_refused")["message"]
        )
        assert http.get("/v1/alerts/rules", headers=headers).json()["count"] == 0
        # a public receiver is accepted; an update pointing it inside is refused
        public = {
            "kind": "webhook",
            "name": "ops-hook",
            "url": "http://93.184.216.34/",
            "secret": HOOK_SECRET,
        }
        created = http.post(
            "/v1/alerts/rules", json=declaration(channels=[public]), headers=headers
        )
        assert created.status_code == 201, created.text
        inside = {**public, "url": "http://[::ffff:7f00:1]/"}
        update = {k: v for k, v in declaration(channels=[inside]).items() if k != "id"}
        error(
            http.put("/v1/alerts/rules/big-moves", json=update, headers=headers),
            400,
            "channel_refused",
        )
        # a retry period outside the operator's bounds (default 60 s..7 days), new or updated
        brief = {**public, "retry_period_s": 5}
        update = {k: v for k, v in declaration(channels=[brief]).items() if k != "id"}
        for answer in (
            http.put("/v1/alerts/rules/big-moves", json=update, headers=headers),
            http.post(
                "/v1/alerts/rules",
                json=declaration(rule_id="brief", channels=[brief]),
                headers=headers,
            ),
        ):
            assert error(answer, 400, "channel_refused")["message"].startswith(
                "channel ops-hook: retry_period_s 5 is outside the operator's bounds 60..604800 s"
            )
        # a value shaped like a stored (sealed) secret is not accepted as a secret
        sealed = {**public, "secret": "enc:v1:k1:AAAA:BBBB"}
        error(
            http.post(
                "/v1/alerts/rules",
                json=declaration(rule_id="other", channels=[sealed]),
                headers=headers,
            ),
            400,
            "invalid_rule",
        )
