"""Message history (correlation id): one finalized block followed from the head follower (the
block seen finalized, its commit) through the alert sink (the alert raised) to the webhook
delivery, each hop in its own process, read back with `trace history` and through the query
service's `GET /v1/history/{id}`, where another organisation's token gets the 404 of an unknown
id."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

import httpx
import pytest

from infra.local.alert_workers import AlertWorkers
from infra.local.query_service import QueryServer, settings_env
from infra.local.webhook_receiver import WebhookReceiver
from tests.head.conftest import FINALITY, SECRET, WATCHED, Chain, Lake, MakeLake, wait_for
from trace_assets.cli import main as trace
from trace_resources import event_history
from trace_resources.settings import QuerySettings
from trace_resources.tokens import Keyring, generate_key, issue_token


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def delivered(lake: Lake, correlation_id: str) -> bool:
    engines = [lake.versions().engine, lake.data_engine()]
    return any(h.hop == "alert.delivered" for h in event_history.read_hops(engines, correlation_id))


def test_one_correlation_id_is_followed_from_its_finalized_block_to_its_webhook_delivery(
    chain: Chain,
    make_lake: MakeLake,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    lake = make_lake(10_000)
    follower = lake.process()
    with WebhookReceiver(SECRET) as hook:
        lake.rule("acme", "watch", f"{hook.url}/acme")
        follower.start()
        with AlertWorkers(lake.env, lake.root):
            follower.wait_ready()
            tx = chain.send(WATCHED, 515_151)
            block = int(chain.receipt(tx)["blockNumber"], 16)
            chain.mine(FINALITY)  # finalized now
            wait_for(lambda: len(hook.snapshot()) >= 1, "the alert at the webhook", 120)
            [delivery] = hook.snapshot()
            assert delivery.alert["row"]["transaction_hash"] == tx
            correlation_id = delivery.correlation_id  # the webhook's X-Trace-Correlation-Id
            assert correlation_id
            # the deliverer records its hop just after the receiver answered
            wait_for(lambda: delivered(lake, correlation_id), "the delivery's hop", 60)
        assert follower.stop() == 0

    # `trace history --json` (the command in process, with the follower's settings): the
    # path, in time order, each hop from its own process
    for name, value in lake.env.items():
        if name.startswith("TRACE_"):
            monkeypatch.setenv(name, value)
    capsys.readouterr()
    assert trace(["history", correlation_id, "--json"]) == 0
    history = json.loads(capsys.readouterr().out)
    hops: list[dict[str, Any]] = history["hops"]
    # the alert is published before the commit (a crash between them never loses it), so the
    # sink may store it, and the deliverer send it, before the blocks commit (CI saw the commit
    # last): the commit follows the block; the alert's own hops keep their order
    names = [h["hop"] for h in hops]
    assert names[0] == "block.finalized" and names.count("commit") == 1, names
    assert [n for n in names if n != "commit"] == [
        "block.finalized",
        "alert.raised",
        "alert.delivered",
    ], names
    assert [h["at"] for h in hops] == sorted(h["at"] for h in hops)
    by_name = {h["hop"]: h for h in hops}
    finalized, commit = by_name["block.finalized"], by_name["commit"]
    raised, sent = by_name["alert.raised"], by_name["alert.delivered"]
    assert finalized["details"]["first"] <= block <= finalized["details"]["last"]
    assert finalized["org"] is None and commit["org"] is None
    assert commit["details"]["versions"]["native_transfers"] >= 1
    # the committed version's outbox event carries the id too
    with lake.versions().engine.connect() as conn:
        stamped = conn.exec_driver_sql(
            "SELECT correlation_id FROM trace_outbox WHERE dataset = 'native_transfers' "
            "AND partition_key = %s AND version = %s",
            (finalized["details"]["partition"], commit["details"]["versions"]["native_transfers"]),
        ).scalar_one()
    assert stamped == correlation_id
    assert raised["org"] == sent["org"] == "acme"
    assert raised["details"]["dedupe_key"] == sent["details"]["dedupe_key"] == delivery.dedupe_key
    assert sent["details"]["channel"] == "acme/hook"
    assert finalized["process"].startswith("trace-head-follower@")
    assert raised["process"].startswith("trace-alert-sink@")
    assert sent["process"].startswith("trace-alert-deliverer@")

    # the table prints the same path; an unknown id and a malformed one are one-line errors
    assert trace(["history", correlation_id]) == 0
    table = capsys.readouterr().out
    for name in ("block.finalized", "commit", "alert.raised", "alert.delivered"):
        assert name in table
    assert trace(["history", "f" * 32]) == 1
    assert "no history for correlation id" in capsys.readouterr().err
    assert trace(["history", "../etc; drop"]) == 2
    assert "is not a correlation id" in capsys.readouterr().err
    assert trace(["history", correlation_id, "--org", "globex"]) == 1

    # the query service: acme finds the id on its alert and reads the same path; globex's
    # token gets exactly the 404 of an id that does not exist
    settings = QuerySettings(
        **lake.settings.model_dump(exclude={"query_token_keys", "query_token_signing_kid"}),
        query_token_keys=generate_key("k-history", "EdDSA")[0],
    )
    keyring = Keyring.from_settings(settings)
    acme = issue_token(keyring, settings, org="acme", subject="alice")[0]
    globex = issue_token(keyring, settings, org="globex", subject="bob")[0]
    server = QueryServer({**lake.env, **settings_env(settings)}, log_file=lake.root / "q.log")
    with server, httpx.Client(base_url=server.url, timeout=30) as http:
        alerts = http.get("/v1/alerts", headers=bearer(acme)).json()["data"]
        assert [a["correlation_id"] for a in alerts] == [correlation_id]
        answer = http.get(f"/v1/history/{correlation_id}", headers=bearer(acme))
        assert answer.status_code == 200, answer.text
        assert [h["hop"] for h in answer.json()["hops"]] == [h["hop"] for h in hops]
        foreign = http.get(f"/v1/history/{correlation_id}", headers=bearer(globex))
        missing = http.get(f"/v1/history/{'0' * 32}", headers=bearer(globex))
        assert foreign.status_code == missing.status_code == 404
        assert foreign.json()["error"]["code"] == missing.json()["error"]["code"]


def test_an_org_sees_the_public_hops_and_its_own_and_never_another_orgs() -> None:
    def hop(name: str, org: str | None) -> event_history.Hop:
        return event_history.Hop("c1", name, datetime(2026, 1, 1, tzinfo=UTC), "p", org, {})

    public = [hop("block.finalized", None), hop("commit", None)]
    both = [*public, hop("alert.raised", "acme"), hop("alert.raised", "globex")]
    assert [h.org for h in event_history.visible_to(both, "acme") or []] == [None, None, "acme"]
    assert event_history.visible_to([*public, hop("alert.raised", "acme")], "globex") is None
    assert event_history.visible_to(public, "globex") == public  # a block without alerts
    assert event_history.visible_to([], "acme") is None
    assert event_history.visible_to(both, None) == both  # the operator's `trace history`
