"""Environment promotion (`trace promote`) between two environments on the test cluster: dev
and staging, each with its own state and data databases and declarations directory.

dev differs from staging in every kind: a dataset description and a retention policy changed,
a dataset staging lacks, a transform, an alert rule staging lacks (and one only staging has),
saved queries added, changed and removed.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest
import sqlalchemy as sa
import yaml

from infra.local.services import MotoS3Server, PostgresServer
from tests.conftest import NewDatabase
from trace_assets.alerts.scope import scope_check
from trace_assets.cli import main
from trace_resources import promotion
from trace_resources.alert_pipeline.rules import AlertRule, RuleError, RuleStore, parse_rule
from trace_resources.alert_pipeline.tables import data_engine
from trace_resources.environments import (
    Environment,
    EnvironmentsError,
    environment,
    load_environments,
)
from trace_resources.registry import DATASETS_DIR, arrow_schema, load_declarations
from trace_resources.resources import ObjectStoreResource
from trace_resources.storage import saved_queries
from trace_resources.storage import udfs as udf_store
from trace_resources.storage.commit import DatasetWriter, PartitionData
from trace_resources.storage.state import dispose_engine, engine_for
from trace_resources.storage.version_store import VersionStore
from trace_resources.udfs.registry import apply as apply_udf

SIGKILLED = -9
UDF = """\
format_version: 1
name: org_acme__token_counts
description: ERC-20 transfers per token and block range
inputs:
  - dataset: erc20_transfers
    columns: [token]
partitioning: block_range
mode: replace
schema:
  - {name: token, type: binary, doc: ERC-20 contract (20 bytes)}
  - {name: transfers, type: int64, doc: Transfer events of the token in the range}
code:
  kind: sql
  sql: SELECT token, count(*) AS transfers FROM erc20_transfers GROUP BY token
"""


def rule(rule_id: str, threshold: str) -> dict[str, Any]:
    return {
        "org": "acme",
        "id": rule_id,
        "condition": {
            "kind": "erc20_transfer_above",
            "token": "0x" + "11" * 20,
            "threshold": threshold,
        },
        "channels": [
            {
                "kind": "webhook",
                "name": "ops",
                "url": "http://127.0.0.1:9/hook",
                "secret": "s" * 32,
            }
        ],
    }


@dataclass
class World:
    dev: Environment
    staging: Environment
    file: Path
    leaf: str  # a dataset only dev declares
    committed: str  # a dataset staging holds a committed version of
    objects: ObjectStoreResource


def _leaf(directory: Path) -> str:
    decls = load_declarations(directory)
    read = {up for d in decls.values() for up in d.upstream}
    return sorted(n for n, d in decls.items() if d.kind == "derived" and n not in read)[0]


def _edit(path: Path, **fields: Any) -> None:
    data = yaml.safe_load(path.read_text())
    path.write_text(yaml.safe_dump({**data, **fields}, sort_keys=False))


_VALUES = {
    "bool": True,
    "uint8": 1,
    "uint32": 1,
    "uint64": 1,
    "int32": 1,
    "int64": 1,
    "double": 1.0,
    "string": "x",
    "binary": b"x",
    "date32[day]": date(2026, 1, 1),
    "timestamp[us, tz=UTC]": datetime(2026, 1, 1, tzinfo=UTC),
    "list<item: string>": ["x"],
}


def _commit_one_row(state_dsn: str, objects: ObjectStoreResource, dataset: str) -> None:
    schema = arrow_schema(load_declarations()[dataset])
    table = pa.table({f.name: [_VALUES[str(f.type)]] for f in schema}, schema=schema)
    with DatasetWriter(objects.datasets(), VersionStore(engine_for(state_dsn))) as writer:
        writer.write(dataset, "000000000000-000000000049", PartitionData(table))


@pytest.fixture(scope="module")
def world(
    tmp_path_factory: pytest.TempPathFactory,
    postgres: PostgresServer,
    new_database: NewDatabase,
    s3_server: MotoS3Server,
) -> Iterator[World]:
    root = tmp_path_factory.mktemp("environments")
    envs: dict[str, dict[str, str]] = {}
    for name in ("dev", "staging"):
        shutil.copytree(DATASETS_DIR, root / name)
        envs[name] = {
            "state_dsn": new_database(f"promote_{name}_state_{os.getpid()}", "state"),
            "data_dsn": new_database(f"promote_{name}_data_{os.getpid()}", "data"),
            "datasets_dir": name,
        }
    file = root / "environments.yaml"
    file.write_text(yaml.safe_dump({"format_version": 1, "environments": envs}))
    found = load_environments(file)
    dev, staging = found["dev"], found["staging"]

    leaf = _leaf(DATASETS_DIR)
    (staging.datasets_dir / f"{leaf}.yaml").unlink()
    _edit(dev.datasets_dir / "blocks.yaml", description="Blocks, as promoted from dev.")
    _edit(dev.datasets_dir / "logs.yaml", retention={"keep_last": 3, "older_than": "30d"})

    # the dataset staging has committed: its schema is what a promotion must not break
    bucket = f"promote-{os.getpid()}"
    s3_server.s3_client().create_bucket(Bucket=bucket)
    objects = ObjectStoreResource(
        kind="s3",
        endpoint_url=s3_server.endpoint_url,
        access_key_id="testing",
        secret_access_key="testing",
        bucket_datasets=bucket,
    )
    _commit_one_row(staging.state_dsn, objects, "native_transfers")

    apply_udf(engine_for(dev.state_dsn), UDF, "token_counts.yaml", "alice")
    dev_rules = RuleStore(data_engine(dev.data_dsn))
    dev_rules.create(parse_rule(rule("big-moves", "1000")))
    RuleStore(data_engine(staging.data_dsn)).create(parse_rule(rule("staging-only", "5")))
    for env, queries in (
        (dev, {"top-tokens": "SELECT 1", "daily": "SELECT 2 AS daily"}),
        (staging, {"top-tokens": "SELECT 0", "old-report": "SELECT 3"}),
    ):
        for name, sql in queries.items():
            saved_queries.create_saved_query(
                engine_for(env.state_dsn),
                org="acme",
                name=name,
                sql=sql,
                description=None,
                created_by="bob",
            )
    yield World(dev, staging, file, leaf, "native_transfers", objects)
    for env in (dev, staging):
        dispose_engine(env.state_dsn)
        data_engine(env.data_dsn).dispose()


def dump(env: Environment) -> dict[str, Any]:
    """Everything promotion may touch in `env`, every column of every row, and every file of
    its declarations directory (leftover temporary files included)."""
    out: dict[str, Any] = {
        "files": {p.name: p.read_text() for p in sorted(env.datasets_dir.iterdir())}
    }
    for dsn, tables in (
        (env.state_dsn, ("trace_udf_versions", "trace_query_saved_queries")),
        (env.data_dsn, ("trace_alert_rules",)),
    ):
        engine = sa.create_engine(dsn)
        try:
            with engine.connect() as conn:
                for table in tables:
                    rows = conn.execute(sa.text(f"SELECT * FROM {table}")).mappings().all()
                    out[table] = sorted((dict(r) for r in rows), key=repr)
        finally:
            engine.dispose()
    return out


def test_dry_run_shows_the_diff_and_changes_nothing(
    world: World, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    before = dump(world.staging)
    monkeypatch.setenv("TRACE_ENVIRONMENTS_FILE", str(world.file))
    assert main(["promote", "--from", "dev", "--to", "staging"]) == 0
    out = capsys.readouterr().out
    assert "datasets: 1 added, 2 changed, 0 removed" in out
    assert f"+ {world.leaf}" in out and "~ blocks" in out and "~ logs" in out
    assert "+description: Blocks, as promoted from dev." in out
    assert "+retention:" in out and "+  keep_last: 3" in out
    assert "udfs: 1 added, 0 changed, 0 removed" in out and "+ org_acme__token_counts" in out
    assert "alert_rules: 1 added, 0 changed, 1 removed" in out
    assert "--- alert_rules acme/staging-only" in out and "+enabled: false" in out
    assert "+ acme/big-moves" in out and "- acme/staging-only" in out
    assert "saved_queries: 1 added, 1 changed, 1 removed" in out
    assert "-sql: SELECT 0" in out and "+sql: SELECT 1" in out
    assert "dry run: nothing written; add --apply" in out and "refused" not in out
    assert dump(world.staging) == before


WIDE = "org_acme__wide_counts"


def test_an_incompatible_schema_change_is_refused_and_nothing_applied(world: World) -> None:
    # staging committed a version of the transform WIDE with `transfers` as a string; dev's
    # declaration of WIDE makes it int64
    table = pa.table({"token": [b"x"], "transfers": ["1"]})
    with DatasetWriter(
        world.objects.datasets(), VersionStore(engine_for(world.staging.state_dsn))
    ) as w:
        w.write(WIDE, "000000000000-000000000049", PartitionData(table))
    dev_state = engine_for(world.dev.state_dsn)
    apply_udf(dev_state, UDF.replace("org_acme__token_counts", WIDE), "wide.yaml", "alice")
    before = dump(world.staging)
    path = world.dev.datasets_dir / f"{world.committed}.yaml"
    original = path.read_text()
    data = yaml.safe_load(original)
    retyped = data["schema"][0]["name"]
    data["schema"][0]["type"] = "string" if data["schema"][0]["type"] != "string" else "int64"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    try:
        planned = promotion.plan(world.dev, world.staging)
        with pytest.raises(promotion.PromotionError) as refused:
            promotion.apply(world.dev, world.staging, "carol")
    finally:
        path.write_text(original)
        with dev_state.begin() as conn:
            udf_store.undo_versions_after(conn, WIDE, 0)
    message = str(refused.value)
    assert "refused, nothing applied" in message and "\n" not in message
    assert f"dataset {world.committed}: its new schema breaks" in message
    assert f"retyped ['{retyped}']" in message
    assert f"transform {WIDE}: its new schema breaks" in message
    assert "retyped ['transfers']" in message
    assert len(planned.problems) == 2 and "refused (apply would change nothing)" in planned.report()
    assert dump(world.staging) == before
    assert promotion.promotion_log(world.staging) == []


def test_an_item_its_store_refuses_midway_leaves_nothing_applied(world: World) -> None:
    """The UDF and the declaration files are written before the alert rule is refused."""
    before = dump(world.staging)

    def refuse(rule: AlertRule) -> None:
        raise RuleError(f"rule {rule.id} reads a dataset acme may not read")

    planned = promotion.plan(world.dev, world.staging, rule_check=refuse)
    assert planned.problems == [
        "alert rule acme/big-moves: rule big-moves reads a dataset acme may not read"
    ]
    with pytest.raises(promotion.PromotionError, match="alert rule acme/big-moves: refused"):
        promotion.apply(world.dev, world.staging, "carol", rule_check=refuse)
    assert dump(world.staging) == before
    assert promotion.promotion_log(world.staging) == []


def test_apply_then_rollback_leaves_staging_exactly_as_it_was(
    world: World, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("TRACE_ENVIRONMENTS_FILE", str(world.file))
    before = dump(world.staging)
    planned, entry = promotion.apply(
        world.dev, world.staging, "carol", rule_check=scope_check(world.staging.state_dsn)
    )
    assert entry is not None and entry.actor == "carol"
    assert planned.of("udfs", "added") == ["org_acme__token_counts"]

    # staging now holds what dev holds: a second promotion finds nothing to do
    again = promotion.plan(world.dev, world.staging)
    assert again.changes == []
    assert promotion.apply(world.dev, world.staging, "carol")[1] is None
    files = dump(world.staging)["files"]
    assert files == dump(world.dev)["files"]
    rules = {
        s.rule.id: s.rule.enabled for s in RuleStore(data_engine(world.staging.data_dsn)).latest()
    }
    assert rules == {"big-moves": True, "staging-only": False}
    queries = saved_queries.org_saved_queries(engine_for(world.staging.state_dsn), "acme")
    assert {q["name"]: q["sql"] for q in queries} == {
        "daily": "SELECT 2 AS daily",
        "top-tokens": "SELECT 1",
    }
    [logged] = promotion.promotion_log(world.staging)
    assert (logged.id, logged.source_env, logged.actor) == (entry.id, "dev", "carol")
    capsys.readouterr()
    assert main(["promote", "log", "--env", "staging", "--json"]) == 0
    [listed] = json.loads(capsys.readouterr().out)
    assert (listed["id"], listed["from"], listed["to"], listed["actor"]) == (
        entry.id,
        "dev",
        "staging",
        "carol",
    )
    assert listed["completed"] is True
    assert {"kind": "udfs", "key": "org_acme__token_counts", "action": "added"} in listed["changes"]

    # an item edited in staging since is not silently overwritten by the rollback
    staging_state = engine_for(world.staging.state_dsn)
    edit = {"org": "acme", "name": "daily", "description": None, "created_by": "erin"}
    with staging_state.begin() as conn:
        saved_queries.put_saved_query(conn, sql="SELECT 22", **edit)
    with pytest.raises(promotion.PromotionError, match="changed in staging since: saved_queries"):
        promotion.rollback(world.staging, entry.id, "dave")
    with staging_state.begin() as conn:
        saved_queries.put_saved_query(conn, sql="SELECT 2 AS daily", **edit)

    assert main(["promote", "rollback", str(entry.id), "--env", "staging", "--actor", "dave"]) == 0
    out = capsys.readouterr().out
    assert f"rolled back promotion {entry.id} (dev -> staging" in out
    assert "staging: reload its code location" in out
    assert dump(world.staging) == before
    [logged] = promotion.promotion_log(world.staging)
    assert logged.rolled_back_by == "dave"
    with pytest.raises(promotion.PromotionError, match="already rolled back by dave"):
        promotion.rollback(world.staging, entry.id, "dave")


def test_a_promotion_killed_after_its_state_commit_is_finished_by_the_next_one(
    world: World,
) -> None:
    """SIGKILLed between the state commit (transforms, saved queries, the log) and the alert
    rules and files: the next promotion into staging finishes it; its rollback undoes it all."""
    before = dump(world.staging)
    env = {
        **os.environ,
        "TRACE_ENVIRONMENTS_FILE": str(world.file),
        "TRACE_CRASH_POINT": "promote.after_state_commit",
    }
    args = ["promote", "--from", "dev", "--to", "staging", "--apply", "--actor", "frank"]
    killed = subprocess.run(
        [sys.executable, "-m", "trace_assets.cli", *args], env=env, capture_output=True, timeout=120
    )
    assert killed.returncode == SIGKILLED, killed.stderr
    [unfinished] = [p for p in promotion.promotion_log(world.staging) if p.rolled_back_at is None]
    assert unfinished.actor == "frank" and not unfinished.completed
    halfway = dump(world.staging)
    assert halfway["trace_udf_versions"] != before["trace_udf_versions"]  # committed
    assert halfway["trace_alert_rules"] == before["trace_alert_rules"]  # not yet written
    assert {n for n in halfway["files"] if n.startswith(".")} == {
        f".{world.leaf}.yaml.promotion-{unfinished.id}",
        f".blocks.yaml.promotion-{unfinished.id}",
        f".logs.yaml.promotion-{unfinished.id}",
    }

    # the next promotion finishes it first, then finds nothing left to promote
    assert promotion.apply(world.dev, world.staging, "carol")[1] is None
    finished = dump(world.staging)
    assert finished["files"] == dump(world.dev)["files"]
    rules = RuleStore(data_engine(world.staging.data_dsn)).latest()
    assert {s.rule.id: s.rule.enabled for s in rules} == {"big-moves": True, "staging-only": False}
    [done] = [p for p in promotion.promotion_log(world.staging) if p.id == unfinished.id]
    assert done.completed
    # the rules' specs (sealed channel secrets) were kept only until it was finished
    assert any("spec" in e for e in unfinished.changes)
    assert not any("spec" in e for e in done.changes)

    promotion.rollback(world.staging, unfinished.id, "frank")
    assert dump(world.staging) == before


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("environments: {}", "environments: Dictionary should have at least 1 item"),
        (
            "environments: {dev: {state_dsn: x, data_dsn: y}}",
            "environments.dev.datasets_dir: Field required",
        ),
        (
            "environments: {dev: {state_dsn: '${PROMOTE_TEST_UNSET}', data_dsn: y, "
            "datasets_dir: d}}",
            "environments.dev.state_dsn: ${PROMOTE_TEST_UNSET} is not set; export",
        ),
        ("environments: {Dev!: {state_dsn: x, data_dsn: y, datasets_dir: d}}", "name: String"),
        ("environments: [dev", "not valid YAML"),
    ],
)
def test_a_bad_environments_file_says_what_to_fix(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "environments.yaml"
    path.write_text(text)
    with pytest.raises(EnvironmentsError) as bad:
        load_environments(path)
    assert str(bad.value).startswith(f"{path}: ") and message in str(bad.value)
    assert "\n" not in str(bad.value)


def test_an_unknown_environment_is_named_with_the_known_ones(world: World) -> None:
    with pytest.raises(EnvironmentsError, match=r"unknown environment 'prod'; .* dev, staging"):
        environment(world.file, "prod")


def test_a_diff_shows_that_a_channel_secret_changed_but_not_the_secret() -> None:
    old, new = rule("r", "1"), rule("r", "1")
    new["channels"][0]["secret"] = "t" * 32
    shown = promotion.Change("alert_rules", "acme/r", "changed", old, new).diff()
    assert "-  secret: <secret sha256:" in shown and "+  secret: <secret sha256:" in shown
    assert "s" * 32 not in shown and "t" * 32 not in shown
