"""`trace alerts backtest`: a rule over committed history — how often it would have fired,
after dedupe and the channels' rate limits — sending nothing."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
import yaml

from tests.alerts.conftest import Receiver, count, webhook
from tests.derived.conftest import Env, aws_env, derived_env, raw_env  # noqa: F401
from trace_assets.alerts.backtest import simulate_bucket
from trace_assets.cli import main as trace_cli
from trace_resources.alert_pipeline.delivery import Deliverer, DeliveryPolicy
from trace_resources.alert_pipeline.queue import SqsBuffer
from trace_resources.alert_pipeline.resource import AlertsResource, ledger
from trace_resources.alert_pipeline.sink import Sink
from trace_resources.registry import arrow_schema, declarations

SCHEMA = arrow_schema(declarations()["erc20_transfers"])


def test_the_token_bucket_is_the_deliverers() -> None:
    # burst max(1, 0.5) = 1: the first alert goes, the next two wait 2 s and 4 s for tokens,
    # and ten seconds later the bucket is full again
    assert simulate_bucket([0, 0, 0, 10], 0.5) == (2, 2, 4.0)
    assert simulate_bucket([0.0] * 5, 10) == (5, 0, 0.0)  # burst 10
    assert simulate_bucket([0.0] * 12, 10) == (10, 2, pytest.approx(0.2))


@pytest.fixture
def cli_env(
    derived_env: Env,  # noqa: F811
    worker_env: dict[str, str],
    monkeypatch: pytest.MonkeyPatch,
) -> Env:
    for key, value in worker_env.items():
        monkeypatch.setenv(key, value)
    settings = derived_env.settings
    monkeypatch.setenv("TRACE_STATE_DSN", settings.state_dsn)
    monkeypatch.setenv("TRACE_BUCKET_DATASETS", settings.bucket_datasets)
    return derived_env


def run(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    capsys.readouterr()
    code = trace_cli(["alerts", "backtest", *args])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_backtest_reports_without_sending(
    cli_env: Env,
    engine: sa.Engine,
    data_dsn: str,
    buffer: SqsBuffer,
    receiver: Receiver,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    env = cli_env
    per_range = {k: env.reader.read("erc20_transfers", [k], SCHEMA) for k in env.keys}
    token = per_range[env.keys[0]]["token"][0].as_py()
    values = sorted(
        int(v)
        for t in per_range.values()
        for tok, v in zip(t["token"].to_pylist(), t["value_string"].to_pylist(), strict=True)
        if tok == token
    )
    threshold = values[len(values) // 2]

    def above(keys: list[str]) -> int:
        return sum(
            1
            for k in keys
            for tok, v in zip(
                per_range[k]["token"].to_pylist(),
                per_range[k]["value_string"].to_pylist(),
                strict=True,
            )
            if tok == token and int(v) > threshold
        )

    expected = above(env.keys)
    rule: dict[str, Any] = {
        "org": "acme",
        "id": "half",
        "condition": {
            "kind": "erc20_transfer_above",
            "token": "0x" + token.hex(),
            "threshold": str(threshold),
        },
        "channels": [
            webhook("roomy", receiver.url("/ok"), rate_per_s=100000),
            {"kind": "slack", "name": "trickle", "url": receiver.url("/ok"), "rate_per_s": 1e-6},
        ],
    }
    rule_file = tmp_path / "rule.yaml"
    rule_file.write_text(yaml.safe_dump(rule))

    code, out, err = run(["--rule", str(rule_file), "--json"], capsys)
    assert code == 0, err
    report = json.loads(out)
    assert report["ranges_scanned"] == len(env.keys)
    assert (report["first_range"], report["last_range"]) == (env.keys[0], env.keys[-1])
    assert 1 < expected == report["alerts_raised"] == report["distinct_alerts"]
    roomy, trickle = report["channels"]
    assert (roomy["name"], roomy["would_deliver"], roomy["rate_limited"]) == ("roomy", expected, 0)
    # one token per ~11.6 days: the first alert goes, every later one waits
    assert (trickle["would_deliver"], trickle["rate_limited"]) == (1, expected - 1)
    assert trickle["max_delay_s"] > 0
    assert len(report["examples"]) == min(5, expected)
    assert all(e["partition_key"] in env.keys for e in report["examples"])

    # a window: by partition keys, and by blocks (ranges overlapping them)
    some = env.keys[1:3]
    span = f"{some[0]}..{some[-1]}"
    code, out, err = run(["--rule", str(rule_file), "--partitions", span, "--json"], capsys)
    assert code == 0, err
    assert (json.loads(out)["ranges_scanned"], json.loads(out)["alerts_raised"]) == (2, above(some))
    first_block = int(some[0].split("-")[0])
    last_block = int(some[-1].split("-")[0])  # the first block of the last range
    window = ["--from-block", str(first_block + 1), "--to-block", str(last_block)]
    code, out, err = run(["--rule", str(rule_file), *window], capsys)
    assert code == 0, err
    assert f"ranges scanned:      2 ({some[0]} .. {some[-1]})" in out
    assert f"alerts raised:       {above(some)}" in out
    assert "channel trickle (slack, 1e-06/s): would deliver 1 on time" in out

    # bad input says what was wrong
    code, _, err = run(["--rule", str(rule_file), "--partitions", "1..2"], capsys)
    assert code == 2 and "'1' is not a block-range key" in err
    forbidden = {
        **rule,
        "condition": {"kind": "custom_sql", "sql": "SELECT * FROM platform_internal"},
    }
    rule_file.write_text(yaml.safe_dump(forbidden))
    code, _, err = run(["--rule", str(rule_file)], capsys)
    assert code == 2 and "reads 'platform_internal', which is not a dataset" in err

    # nothing was sent: the buffer is empty, nothing stored, nothing delivered
    assert buffer.approximate_depth() == 0
    assert Sink(buffer, engine).cycle(wait_s=1) == 0
    assert count(engine, "SELECT count(*) FROM trace_alerts") == 0
    with AlertsResource(data_dsn=data_dsn).engine().connect() as conn:  # the ledger too
        assert conn.execute(sa.select(sa.func.count()).select_from(ledger)).scalar() == 0
    stats = Deliverer(engine, DeliveryPolicy(timeout_s=2.0)).run(until_idle=True)
    assert stats.delivered == 0 and receiver.hits == []
