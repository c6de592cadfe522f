"""Custom SQL conditions see, for the evaluated range, every dataset their organisation may
read (the one rule of `trace_resources.storage.access`: declared public datasets, published
ones, its own `org_<org>__*`) — and are refused, naming the table, when they read anything
else."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import dagster as dg
import pyarrow as pa
import pytest
import sqlalchemy as sa
import yaml

from tests.alerts.conftest import SECRET
from tests.derived.conftest import Env, aws_env, derived_env, raw_env  # noqa: F401
from trace_assets.alerts.assets import alert_evaluations
from trace_assets.alerts.scope import AlertScope, scope_check
from trace_assets.cli import main as trace_cli
from trace_resources.alert_pipeline.queue import SqsBuffer
from trace_resources.alert_pipeline.resource import AlertsResource
from trace_resources.alert_pipeline.rules import RuleError, RuleStore, parse_rule
from trace_resources.alert_pipeline.sink import Sink
from trace_resources.registry import arrow_schema, declarations
from trace_resources.storage.access import readable_datasets
from trace_resources.storage.commit import PartitionData
from trace_resources.storage.paths import UNPARTITIONED
from trace_resources.storage.state import engine_for
from trace_resources.tokens import Principal

HOOK = {"kind": "webhook", "name": "h", "url": "http://127.0.0.1:9/", "secret": SECRET}
BLOCKS_WITH_TRANSFERS = (
    "SELECT b.block_number AS alert_key, b.timestamp FROM blocks b "
    "WHERE b.block_number IN (SELECT block_number FROM erc20_transfers)"
)
TO_WATCHED = (
    "SELECT t.transaction_hash, t.log_index FROM erc20_transfers t "
    "JOIN org_acme__watch w ON t.to_address = w.address"
)
DEPLOYMENTS = "SELECT contract_address FROM contracts"  # derived, declared public
INTERNAL = "SELECT * FROM platform_internal"  # committed, neither declared nor published


def sql_rule(rule_id: str, sql: str, org: str = "acme") -> Any:
    return parse_rule(
        {
            "org": org,
            "id": rule_id,
            "condition": {"kind": "custom_sql", "sql": sql},
            "channels": [HOOK],
        }
    )


def publish(env: Env, dataset: str, action: str = "add") -> None:
    assert trace_cli(["public", action, dataset]) == 0


@pytest.fixture
def cli_env(derived_env: Env, data_dsn: str, monkeypatch: pytest.MonkeyPatch) -> Env:  # noqa: F811
    monkeypatch.setenv("TRACE_STATE_DSN", derived_env.settings.state_dsn)
    monkeypatch.setenv("TRACE_DATA_DSN", data_dsn)
    return derived_env


def test_conditions_are_checked_against_what_the_org_may_read(
    cli_env: Env, engine: sa.Engine, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    env = cli_env
    with env.state.writer(env.objects) as writer:  # beta's own dataset
        table = pa.table({"address": pa.array([b"\x11" * 20], pa.binary())})
        writer.write("org_beta__labels", UNPARTITIONED, PartitionData(table))
        writer.write("platform_internal", UNPARTITIONED, PartitionData(table))
    store = RuleStore(engine, check=scope_check(env.settings.state_dsn))

    assert store.create(sql_rule("blocks", BLOCKS_WITH_TRANSFERS)).version == 1
    assert store.create(sql_rule("deployments", DEPLOYMENTS)).version == 1
    assert store.create(sql_rule("own", "SELECT * FROM org_beta__labels", org="beta"))
    for sql, table_name in (
        (INTERNAL, "platform_internal"),  # the platform's, unpublished
        ("SELECT * FROM no_such_dataset", "no_such_dataset"),
        ("SELECT * FROM org_beta__labels", "org_beta__labels"),  # another org's own
    ):
        with pytest.raises(RuleError) as info:
            store.create(sql_rule("nope", sql))
        message = str(info.value)
        assert f"reads '{table_name}', which is not a dataset organisation 'acme' may read" in (
            message
        )
        assert "condition.custom_sql.sql" in message and "blocks" in message  # what it may read
    assert store.get("acme", "nope") is None  # nothing stored

    # the CLI refuses it the same way; published, the dataset is readable
    rule_file = tmp_path / "internal.yaml"
    rule_file.write_text(yaml.safe_dump(sql_rule("internal", INTERNAL).declaration_json()))
    capsys.readouterr()
    assert trace_cli(["alerts", "rule", "create", str(rule_file)]) == 2
    assert "reads 'platform_internal', which is not a dataset" in capsys.readouterr().err
    publish(env, "platform_internal")
    try:
        assert trace_cli(["alerts", "rule", "create", str(rule_file)]) == 0
    finally:
        publish(env, "platform_internal", "remove")

    # SQL that does not parse is refused when the rule file is read
    with pytest.raises(RuleError, match="condition.custom_sql.sql: Value error, does not parse"):
        sql_rule("bad", "SELECT FROM WHERE")


def test_evaluation_reads_the_datasets_the_condition_names(
    cli_env: Env,
    engine: sa.Engine,
    data_dsn: str,
    s3_server: Any,
    queue_name: str,
) -> None:
    env = cli_env
    schema = arrow_schema(declarations()["erc20_transfers"])
    counts = {k: env.reader.read("erc20_transfers", [k], schema).num_rows for k in env.keys}
    key = max(counts, key=lambda k: counts[k])
    transfers = env.reader.read("erc20_transfers", [key], schema)
    watched = transfers["to_address"][0].as_py()
    to_watched = sum(1 for a in transfers["to_address"].to_pylist() if a == watched)
    blocks_with_transfers = len(set(transfers["block_number"].to_pylist()))
    with env.state.writer(env.objects) as writer:  # acme's own, unpartitioned dataset
        table = pa.table({"address": pa.array([watched], pa.binary())})
        watch = writer.write("org_acme__watch", UNPARTITIONED, PartitionData(table))
        writer.write("platform_internal", UNPARTITIONED, PartitionData(table))

    store = RuleStore(engine, check=scope_check(env.settings.state_dsn))
    store.create(sql_rule("blocks", BLOCKS_WITH_TRANSFERS))
    store.create(sql_rule("watch", TO_WATCHED))
    publish(env, "platform_internal")
    store.create(sql_rule("internal", INTERNAL))
    publish(env, "platform_internal", "remove")  # no longer readable: skipped, not run

    resources = {
        **env.resources(),
        "alerts": AlertsResource(
            data_dsn=data_dsn, sqs_endpoint_url=s3_server.endpoint_url, queue=queue_name
        ),
    }
    result = dg.materialize(
        [alert_evaluations], instance=env.instance, resources=resources, partition_key=key
    )
    assert result.success
    [mat] = result.asset_materializations_for_node("alert_evaluations")
    errors: dict[str, str] = mat.metadata["trace/rule_errors"].value  # type: ignore[assignment]
    assert list(errors) == ["acme/internal@v1"]
    refused = errors["acme/internal@v1"]
    assert "reads platform_internal, which organisation 'acme' may not read" in refused

    sink = Sink(SqsBuffer(queue_name, endpoint_url=s3_server.endpoint_url), engine, batch=100)
    while sink.cycle(wait_s=1):
        pass
    with engine.connect() as conn:
        stored = conn.execute(sa.text("SELECT payload FROM trace_alerts")).scalars().all()
    by_rule: dict[str, list[dict[str, Any]]] = {}
    for payload in stored:
        by_rule.setdefault(payload["rule_id"], []).append(payload)
    assert sorted(by_rule) == ["blocks", "watch"]
    assert len(by_rule["blocks"]) == blocks_with_transfers
    assert len(by_rule["watch"]) == to_watched
    versions = env.state.versions()
    current = {
        name: versions.read.current_version_numbers(name, [key])[key]
        for name in ("blocks", "erc20_transfers", "native_transfers")
    }
    for payload in by_rule["blocks"]:  # the versions of every dataset the condition read
        assert payload["dataset_versions"] == current
    for payload in by_rule["watch"]:
        assert payload["dataset_versions"] == {
            "erc20_transfers": current["erc20_transfers"],
            "native_transfers": current["native_transfers"],
            "org_acme__watch": watch.version.version,
        }


def test_a_condition_reads_nothing_its_organisations_token_may_not(
    cli_env: Env, engine: sa.Engine
) -> None:
    """The store check and the evaluation (`AlertScope.refusals`) admit exactly the datasets a
    plain token of the organisation reads in the query service (`readable_datasets`)."""
    env = cli_env
    table = pa.table({"address": pa.array([b"\x11" * 20], pa.binary())})
    with env.state.writer(env.objects) as writer:
        for name in ("org_acme__watch", "org_beta__labels", "platform_internal"):
            writer.write(name, UNPARTITIONED, PartitionData(table))
    token = Principal(org="acme", subject="alice", kind="org", jti="j", expires_at=0)
    with engine_for(env.settings.state_dsn).connect() as conn:
        token_reads = readable_datasets(conn, "acme", token)
    candidates = [
        *declarations(),
        "org_acme__watch",
        "org_acme__never_committed",
        "org_beta__labels",
        "ORG_BETA__LABELS",
        "org_acme___watch",
        "platform_internal",
        "no_such_dataset",
    ]
    store = RuleStore(engine, check=scope_check(env.settings.state_dsn))
    scope = AlertScope(env.settings.state_dsn)
    admitted = set()
    for i, name in enumerate(candidates):
        rule = sql_rule(f"token-{i}", f'SELECT * FROM "{name}"')
        try:
            store.create(rule)
            admitted.add(name.lower())
        except RuleError:
            assert store.get("acme", f"token-{i}") is None
        refused = scope.refusals(rule)
        assert refused == ([] if name.lower() in token_reads else [name.lower()])
    assert admitted == {n.lower() for n in candidates} & set(token_reads)
    assert admitted == {*declarations(), "org_acme__watch"}
