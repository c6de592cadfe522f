"""Rules (validation, CLI versions) and evaluation over committed devnet ranges."""

from __future__ import annotations

import json
from pathlib import Path

import dagster as dg
import pytest
import sqlalchemy as sa

from tests.alerts.conftest import SECRET, count
from tests.derived.conftest import Env, aws_env, derived_env, raw_env  # noqa: F401
from trace_assets.alerts.assets import alert_evaluations, read_range
from trace_assets.cli import main as trace_cli
from trace_resources.alert_pipeline.queue import SqsBuffer
from trace_resources.alert_pipeline.resource import AlertsResource
from trace_resources.alert_pipeline.rules import RuleError, RuleStore, parse_rule
from trace_resources.alert_pipeline.sink import Sink


def test_rule_errors_name_the_fields() -> None:
    with pytest.raises(RuleError) as info:
        parse_rule(
            {
                "org": "Acme",
                "id": "big",
                "condition": {"kind": "erc20_transfer_above", "token": "0x12", "threshold": "1.5"},
                "channels": [{"kind": "webhook", "name": "h", "url": "ftp://x", "secret": "short"}],
                "colour": "red",
            }
        )
    text = str(info.value)
    for field in (
        "org:",
        "condition.erc20_transfer_above.token:",
        "condition.erc20_transfer_above.threshold:",
        "channels.0.webhook.url:",
        "channels.0.webhook.secret:",
        "colour: Extra inputs are not permitted",
    ):
        assert field in text, text
    with pytest.raises(RuleError, match="condition.custom_sql.sql: Value error, must be a SELECT"):
        parse_rule(
            {
                "org": "acme",
                "id": "x",
                "condition": {"kind": "custom_sql", "sql": "DELETE FROM erc20_transfers"},
                "channels": [{"kind": "slack", "name": "s", "url": "http://h"}],
            }
        )


def test_cli_create_list_update_disable(
    tmp_path: Path,
    worker_env: dict[str, str],
    engine: sa.Engine,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    for key, value in worker_env.items():
        monkeypatch.setenv(key, value)
    rule = tmp_path / "rule.yaml"
    rule.write_text(
        "org: acme\nid: whales\ncondition: {kind: erc20_transfer_above, token: '0x"
        + "ab" * 20
        + "', threshold: '1000'}\nchannels:\n  - {kind: slack, name: chat, url: 'http://127.0.0.1:9/chat'}\n"
    )
    assert trace_cli(["alerts", "rule", "create", str(rule)]) == 0
    assert trace_cli(["alerts", "rule", "create", str(rule)]) == 2  # exists: use update
    rule.write_text(rule.read_text().replace("'1000'", "'5000'"))
    assert trace_cli(["alerts", "rule", "update", str(rule)]) == 0
    assert trace_cli(["alerts", "rule", "disable", "acme", "whales"]) == 0
    capsys.readouterr()
    assert trace_cli(["alerts", "rule", "list", "--json"]) == 0
    (listed,) = json.loads(capsys.readouterr().out)
    assert listed["version"] == 3 and listed["enabled"] is False
    store = RuleStore(engine)
    v2 = store.get("acme", "whales", 2)
    assert v2 is not None and v2.rule.condition.threshold == "5000"  # type: ignore[union-attr]
    assert store.latest(enabled_only=True) == []


def test_evaluation_over_committed_ranges(
    derived_env: Env,  # noqa: F811
    engine: sa.Engine,
    data_dsn: str,
    s3_server: object,
    queue_name: str,
) -> None:
    env = derived_env
    reader = env.reader
    ranges = {k: read_range(reader, k) for k in env.keys}
    transfers = [
        (key, row)
        for key, data in ranges.items()
        if "erc20_transfers" in data.tables
        for row in data.tables["erc20_transfers"][1].to_pylist()
    ]
    token = transfers[0][1]["token"]
    values = sorted(int(r["value_string"]) for _, r in transfers if r["token"] == token)
    threshold = values[len(values) * 9 // 10]  # the top tenth alerts
    expected_above = sum(
        1 for _, r in transfers if r["token"] == token and int(r["value_string"]) > threshold
    )
    natives = sum(
        min(2, d.tables["native_transfers"][1].num_rows)
        for d in ranges.values()
        if "native_transfers" in d.tables
    )
    store = RuleStore(engine)
    hook = {"kind": "webhook", "name": "h", "url": "http://127.0.0.1:9/", "secret": SECRET}
    store.create(
        parse_rule(
            {
                "org": "acme",
                "id": "above",
                "condition": {
                    "kind": "erc20_transfer_above",
                    "token": "0x" + token.hex(),
                    "threshold": str(threshold),
                },
                "channels": [hook],
            }
        )
    )
    store.create(
        parse_rule(
            {
                "org": "beta",
                "id": "sql",
                "condition": {
                    "kind": "custom_sql",
                    "sql": "SELECT transaction_hash, value_string FROM native_transfers "
                    "ORDER BY block_number, transaction_index LIMIT 2",
                },
                "channels": [hook],
            }
        )
    )
    endpoint = s3_server.endpoint_url  # type: ignore[attr-defined]
    resources = {
        **env.resources(),
        "alerts": AlertsResource(data_dsn=data_dsn, sqs_endpoint_url=endpoint, queue=queue_name),
    }
    buffer = SqsBuffer(queue_name, endpoint_url=endpoint)
    sink = Sink(buffer, engine, batch=100)
    for _ in range(2):  # evaluating twice: the standing alerts are not published again
        for key in env.keys:
            result = dg.materialize(
                [alert_evaluations], instance=env.instance, resources=resources, partition_key=key
            )
            assert result.success
        while sink.cycle(wait_s=1):
            pass
    assert 0 < expected_above < 200 and natives > 0, (expected_above, natives)
    assert count(engine, "SELECT count(*) FROM trace_alerts WHERE org='acme'") == expected_above
    assert count(engine, "SELECT count(*) FROM trace_alerts WHERE org='beta'") == natives
    with engine.connect() as conn:
        rows = conn.execute(sa.text("SELECT payload FROM trace_alerts")).scalars().all()
    for payload in rows:  # every alert names the versions it was computed from
        assert payload["dataset_versions"] == ranges[payload["partition_key"]].versions
    # the second evaluation found every alert standing under its key: nothing re-sent
    assert sink.stats.received == sink.stats.inserted and sink.stats.duplicates == 0
