"""Organisations' SQL transforms end to end, on the real services: a declaration applied with
`trace udf apply`, materialised over the devnet's ranges with `dagster asset materialize`,
committed through the commit protocol, equal to the same logic in polars, readable by its
organisation only through the query service; bad declarations refused with one line naming
file, line and field; a tripped quality rule commits nothing."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dagster as dg
import httpx
import polars as pl
import pytest
import yaml
from dagster._core.storage.tags import (
    ASSET_PARTITION_RANGE_END_TAG,
    ASSET_PARTITION_RANGE_START_TAG,
)
from polars.testing import assert_frame_equal

from infra.local.dagster_cli import materialize_command
from infra.local.query_service import QueryServer, settings_env
from infra.local.services import MotoS3Server, PostgresServer
from tests.conftest import CHAIN_ID, RANGE_SIZE, Devnet, NewDatabase
from tests.query.conftest import Tokens, bearer, keyring_spec
from trace_assets.cli import main as trace_main
from trace_assets.definitions import build_definitions, build_resources
from trace_assets.derived.assets import DERIVED_ASSETS
from trace_assets.partitions import block_ranges
from trace_assets.raw.chain import raw_chain
from trace_assets.udfs import build_udf_asset
from trace_resources.chain.ranges import complete_ranges
from trace_resources.instance.run_launcher import DEFAULT_PRELOAD, pool_signature
from trace_resources.sandbox import shared
from trace_resources.settings import QuerySettings
from trace_resources.storage import udfs as udf_store
from trace_resources.storage.commit import DatasetReader
from trace_resources.storage.object_store import s3_store
from trace_resources.storage.state import engine_for
from trace_resources.storage.version_store import VersionStore
from trace_resources.tokens import issue_token
from trace_resources.udfs import UdfDeclaration

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
UDF = "org_acme__token_activity"

GOOD = f"""\
format_version: 1
name: {UDF}
description: Per block range and ERC-20 token, its transfers, senders and first/last block
inputs:
  - dataset: erc20_transfers
    columns: [block_number, token, from_address, value_string]
partitioning: block_range
mode: replace
schema:
  - {{name: token, type: binary, doc: ERC-20 contract (20 bytes)}}
  - {{name: transfers, type: int64, doc: Transfer events of the token in the range}}
  - {{name: senders, type: int64, doc: distinct senders}}
  - {{name: first_block, type: uint64, doc: first block with a transfer of the token}}
  - {{name: last_block, type: uint64, doc: last block with a transfer of the token}}
  - {{name: longest_value, type: int64, doc: most decimal digits of one amount}}
quality:
  - {{name: one_row_per_token, kind: unique, columns: [token]}}
  - {{name: has_transfers, kind: range, column: transfers, min: 1}}
  - {{name: token_not_null, kind: not_null, columns: [token]}}
code:
  kind: sql
  sql: |
    SELECT token,
           count(*) AS transfers,
           count(DISTINCT from_address) AS senders,
           min(block_number) AS first_block,
           max(block_number) AS last_block,
           max(length(value_string)) AS longest_value
    FROM erc20_transfers
    GROUP BY token
    ORDER BY token
"""


@dataclass
class World:
    settings: QuerySettings
    keys: list[str]
    cli_env: dict[str, str]

    @property
    def reader(self) -> DatasetReader:
        store = s3_store(self.settings.bucket_datasets, endpoint_url=self.settings.s3_endpoint_url)
        return DatasetReader(store, VersionStore(engine_for(self.settings.state_dsn)))


def _ranged(keys: list[str]) -> dict[str, str]:
    return {ASSET_PARTITION_RANGE_START_TAG: keys[0], ASSET_PARTITION_RANGE_END_TAG: keys[-1]}


@contextlib.contextmanager
def committed_world(
    tag: str,
    postgres: PostgresServer,
    new_database: NewDatabase,
    s3_server: MotoS3Server,
    devnet: Devnet,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[World]:
    """The devnet's ranges of the raw datasets and erc20_transfers, committed in process, in
    databases and buckets named after `tag` (one per test module)."""
    s3_server.create_buckets([f"{tag}-datasets", f"{tag}-results"])
    settings = QuerySettings(
        environment="test",
        rpc_url=devnet.url,
        chain_id=CHAIN_ID,
        range_size=RANGE_SIZE,
        state_dsn=new_database(f"{tag}_state", "state"),
        data_dsn=new_database(f"{tag}_data", "data"),
        object_store="s3",
        s3_endpoint_url=s3_server.endpoint_url,
        bucket_datasets=f"{tag}-datasets",
        bucket_results=f"{tag}-results",
        rpc_retry_budget_s=20,
        rpc_max_attempts=5,
        query_token_keys=keyring_spec(),
        query_token_signing_kid="k-new",
        query_cache_dir=tmp_path_factory.mktemp(f"{tag}-query-cache"),
    )
    home = tmp_path_factory.mktemp(f"{tag}-dagster-home")
    (home / "dagster.yaml").write_text((REPO / "dagster_home" / "dagster.yaml").read_text())
    cli_env = {
        **os.environ,
        **s3_server.env(),
        **settings_env(settings),
        "DAGSTER_HOME": str(home),
        **postgres.dagster_env(),
    }
    keys = [r.key for r in complete_ranges(-1, devnet.finalized, RANGE_SIZE)]
    erc20 = next(a for a in DERIVED_ASSETS if a.key == dg.AssetKey("erc20_transfers"))
    with pytest.MonkeyPatch.context() as mp:
        for key, value in s3_server.env().items():
            mp.setenv(key, value)
        instance = dg.DagsterInstance.ephemeral()
        instance.add_dynamic_partitions(block_ranges.name or "", keys)
        for selection in (raw_chain, erc20):
            result = dg.materialize(
                [raw_chain, erc20],
                instance=instance,
                resources=build_resources(settings),
                tags=_ranged(keys),
                selection=dg.AssetSelection.assets(selection),
            )
            assert result.success
        instance.dispose()
        try:
            yield World(settings, keys, cli_env)
        finally:
            shared.close("udf-sql-sandbox")  # the in-process sandbox pool of the quality-gate test


def module_world(tag: str, name: str = "world") -> Any:
    """A module-scoped fixture `name` yielding the module's own `committed_world` (databases
    and buckets named after `tag` and the process)."""

    @pytest.fixture(scope="module", name=name)
    def fixture(
        postgres: PostgresServer,
        new_database: NewDatabase,
        s3_server: MotoS3Server,
        devnet: Devnet,
        tmp_path_factory: pytest.TempPathFactory,
    ) -> Iterator[World]:
        with committed_world(
            f"{tag}{os.getpid()}", postgres, new_database, s3_server, devnet, tmp_path_factory
        ) as made:
            yield made

    return fixture


world = module_world("udf")


def _run(world: World, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        list(args), env=world.cli_env, capture_output=True, text=True, timeout=timeout
    )


@pytest.fixture(scope="module")
def applied(world: World, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("udf-files") / "token_activity.yaml"
    path.write_text(GOOD)
    done = _run(world, str(BIN / "trace"), "udf", "apply", str(path), "--by", "alice")
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"applied {UDF}: version 1;")
    return path


@pytest.fixture(scope="module")
def materialised(world: World, applied: Path) -> subprocess.CompletedProcess[str]:
    """The transform over every range, in one run of the Dagster CLI (a new process, which
    loads the applied transform with the code location)."""
    sync = _run(world, str(BIN / "trace"), "partitions", "sync", timeout=120)
    assert sync.returncode == 0, sync.stderr
    return _run(world, *materialize_command(UDF, world.keys[0], world.keys[-1]))


def expected_rows(transfers: pl.DataFrame) -> pl.DataFrame:
    """The transform's logic in polars: per block range and token."""
    return (
        transfers.with_columns((pl.col("block_number") // RANGE_SIZE).alias("range"))
        .group_by("range", "token")
        .agg(
            pl.len().cast(pl.Int64).alias("transfers"),
            pl.col("from_address").n_unique().cast(pl.Int64).alias("senders"),
            pl.col("block_number").min().alias("first_block"),
            pl.col("block_number").max().alias("last_block"),
            pl.col("value_string").str.len_chars().max().cast(pl.Int64).alias("longest_value"),
        )
        .sort("range", "token")
        .drop("range")
    )


def test_materialised_from_the_dagster_cli_equals_polars(
    world: World, materialised: subprocess.CompletedProcess[str]
) -> None:
    assert materialised.returncode == 0, materialised.stderr[-3000:]
    assert materialised.stderr.count("RUN_SUCCESS") == 1  # one run for every range
    reader = world.reader
    committed = reader.resolve(UDF)
    assert sorted(committed) == world.keys  # a version per range, committed
    assert all(r.version == 1 for r in committed.values())
    transfers = pl.from_arrow(reader.read("erc20_transfers", world.keys))
    got = pl.from_arrow(reader.read(UDF, world.keys))
    assert isinstance(transfers, pl.DataFrame) and isinstance(got, pl.DataFrame)
    assert got.height > len(world.keys)  # several tokens per range: real rows, not a stub
    expected = expected_rows(transfers)
    assert_frame_equal(got.sort("first_block", "token"), expected.sort("first_block", "token"))
    # the per-range semantics: a token appears once per range in which it moved
    assert (
        got.height
        == transfers.select((pl.col("block_number") // RANGE_SIZE), "token").unique().height
    )


def test_the_code_location_shows_the_transform_with_its_lineage(
    world: World, applied: Path
) -> None:
    defs = build_definitions(world.settings)
    graph = defs.resolve_asset_graph()
    key = dg.AssetKey(UDF)
    assert key in graph.get_all_asset_keys()
    node = graph.get(key)
    assert node.parent_keys == {dg.AssetKey("erc20_transfers")}
    assert node.partitions_def == block_ranges
    spec = next(s for s in defs.resolve_all_asset_specs() if s.key == key)
    lineage = spec.metadata["dagster/column_lineage"]
    assert {d.column_name for d in lineage.deps_by_column["token"]} == {
        "block_number",
        "token",
        "from_address",
        "value_string",
    }
    assert spec.owners == ["team:acme"] and spec.group_name == "org_acme"
    checks = {c.name for c in defs.resolve_asset_graph().asset_check_keys if c.asset_key == key}
    assert checks == {"one_row_per_token", "has_transfers", "token_not_null"}


def _error_body(response: httpx.Response, name: str) -> tuple[int, str]:
    text = json.dumps(response.json(), sort_keys=True)
    return response.status_code, text.replace(name, "X")


@pytest.fixture(scope="module")
def server(
    world: World, s3_server: MotoS3Server, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[QueryServer]:
    env = {**settings_env(world.settings), **s3_server.env()}
    log = tmp_path_factory.mktemp("udf-uvicorn") / "uvicorn.log"
    with QueryServer(env, log_file=log) as running:
        yield running


@pytest.fixture
def client(server: QueryServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=60) as http:
        yield http


def test_only_its_organisation_reads_it(
    world: World, materialised: subprocess.CompletedProcess[str], client: httpx.Client
) -> None:
    assert materialised.returncode == 0, materialised.stderr[-3000:]
    tokens = Tokens(world.settings)
    rows = world.reader.read(UDF, world.keys).num_rows

    def query(org: str, dataset: str) -> httpx.Response:
        return client.post(
            "/v1/query",
            headers=bearer(tokens.org(org)),
            json={"sql": f"SELECT count(*) AS n FROM {dataset}"},
        )

    mine = query("acme", UDF)
    assert mine.status_code == 200, mine.text
    assert mine.json()["rows"] == [[rows]]
    listed = client.get("/v1/datasets", headers=bearer(tokens.org("acme"))).json()["data"]
    assert UDF in {d["name"] for d in listed}

    theirs = query("globex", UDF)
    missing = query("globex", "org_acme__no_such_transform")
    assert theirs.status_code != 200
    assert _error_body(theirs, UDF) == _error_body(missing, "org_acme__no_such_transform")
    listed = client.get("/v1/datasets", headers=bearer(tokens.org("globex"))).json()["data"]
    assert UDF not in {d["name"] for d in listed}


def test_post_transforms_applies_with_the_capability_only(
    world: World, materialised: subprocess.CompletedProcess[str], client: httpx.Client
) -> None:
    tokens = Tokens(world.settings)

    def manager(org: str) -> dict[str, str]:
        jwt = issue_token(
            tokens.keyring,
            world.settings,
            org=org,
            subject="ops",
            capabilities=["transforms:manage"],
        )[0]
        return bearer(jwt)

    # reads the organisation's own committed transform: its output is an input like any other
    on_mine = GOOD.replace(UDF, "org_acme__busiest").replace(
        "  - dataset: erc20_transfers\n    columns: [block_number, token, from_address, "
        "value_string]",
        f"  - dataset: {UDF}\n    columns: [token, transfers, senders, first_block, last_block, "
        "longest_value]",
    )
    on_mine = on_mine[: on_mine.index("    SELECT token,")] + (
        "    SELECT token, transfers, senders, first_block, last_block, longest_value\n"
        f"    FROM {UDF}\n    WHERE transfers > 1\n"
    )
    body = {"yaml": on_mine, "file": "busiest.yaml"}
    plain = client.post("/v1/transforms", headers=bearer(tokens.org("acme")), json=body)
    assert plain.status_code == 403 and plain.json()["error"]["code"] == "missing_capability"
    created = client.post("/v1/transforms", headers=manager("acme"), json=body)
    assert created.status_code == 201, created.text
    assert created.json()["name"] == "org_acme__busiest" and created.json()["version"] == 1
    again = client.post("/v1/transforms", headers=manager("acme"), json=body)
    assert again.status_code == 200 and again.json()["changed"] is False

    # another organisation can neither name it nor read acme's transform
    named = client.post("/v1/transforms", headers=manager("globex"), json=body)
    assert named.status_code == 422
    assert named.json()["error"]["details"] == [
        "busiest.yaml:2: name: 'org_acme__busiest' belongs to organisation 'acme'; "
        "organisation 'globex' declares org_globex__<name>"
    ]
    stolen = client.post(
        "/v1/transforms",
        headers=manager("globex"),
        json={"yaml": on_mine.replace("org_acme__busiest", "org_globex__busiest")},
    )
    assert stolen.status_code == 422
    [line] = stolen.json()["error"]["details"]
    assert line.startswith(
        f"transform.yaml:5: inputs[0].dataset: unknown dataset {UDF!r} (or not readable by "
        "organisation 'globex'); readable: "
    )
    assert UDF not in line.split("readable: ")[1]

    mine = client.get("/v1/transforms", headers=bearer(tokens.org("acme"))).json()
    assert {"org_acme__busiest", UDF} <= {t["name"] for t in mine["data"]}
    theirs = client.get("/v1/transforms", headers=bearer(tokens.org("globex"))).json()
    assert theirs == {"data": [], "count": 0}


BAD = {
    "unknown_input": (
        ("dataset: erc20_transfers", "dataset: erc20_transferz"),
        ":5: inputs[0].dataset: unknown dataset 'erc20_transferz' (or not readable by "
        "organisation 'acme'); readable: ",
    ),
    "unknown_column": (
        ("from_address, value_string]", "from_address, value_string, amount]"),
        ":6: inputs[0].columns[4]: unknown column 'amount' of erc20_transfers; it has: chain_id, ",
    ),
    "wrong_type": (
        ("type: uint64, doc: first", "type: uint46, doc: first"),
        ":13: schema[3].type: unknown type 'uint46'; use one of ",
    ),
    "type_differs": (
        ("name: senders, type: int64", "name: senders, type: string"),
        ":12: schema[2].type: the SELECT returns 'senders' as BIGINT, declared string (VARCHAR)",
    ),
    "not_a_select": (
        ("    SELECT token,\n", "    DELETE FROM erc20_transfers; SELECT token,\n"),
        ":22: code.sql: write exactly one SELECT statement, not 2 statements",
    ),
    "delete": (
        (GOOD[GOOD.index("    SELECT token,") :], "    DELETE FROM erc20_transfers\n"),
        ":22: code.sql: only a SELECT may compute a transform, this is DELETE",
    ),
    "undeclared_dataset": (
        ("    FROM erc20_transfers\n", "    FROM erc20_transfers JOIN logs USING (block_number)\n"),
        ":22: code.sql: reads 'logs', not declared in inputs (erc20_transfers); add it to "
        "inputs with the columns it reads",
    ),
    "undeclared_column": (
        ("max(block_number) AS last_block", "max(log_index) AS last_block"),
        ':22: code.sql: Binder Error: Referenced column "log_index" not found',
    ),
    "not_prefixed": (
        (f"name: {UDF}", "name: acme_token_activity"),
        ":2: name: 'acme_token_activity' must be named org_<org>__<name>",
    ),
    "platform_rule_kind": (
        (
            "quality:\n",
            "quality:\n  - {name: mine, kind: sql, query: SELECT * FROM data}\n",
        ),
        ":17: quality[0].kind: 'sql' rules are the platform's; a transform's rules are ",
    ),
}


def test_bad_declarations_get_one_line_naming_file_line_and_field(
    world: World,
    applied: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture,
) -> None:
    for key, value in settings_env(world.settings).items():
        monkeypatch.setenv(key, value)
    for name, ((old, new), expected) in BAD.items():
        assert old in GOOD, name
        path = tmp_path / f"{name}.yaml"
        path.write_text(GOOD.replace(old, new, 1))
        for action in ("validate", "apply"):
            assert trace_main(["udf", action, str(path)]) == 2, name
            err = capsys.readouterr().err
            assert err.count("\n") == 1, (name, err)  # one line
            assert err.startswith(f"trace: UdfError: {path}{expected}"), (name, err)
    # the refused applies stored nothing: the transform is still at its first version
    history = udf_store.history(engine_for(world.settings.state_dsn), UDF)
    assert [h.version for h in history] == [1] and history[0].source == GOOD


def test_apply_stores_versions_and_list_shows_the_newest(
    world: World, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    for key, value in settings_env(world.settings).items():
        monkeypatch.setenv(key, value)
    path = tmp_path / "versions.yaml"
    text = GOOD.replace(UDF, "org_acme__versions")
    path.write_text(text)
    assert trace_main(["udf", "apply", str(path), "--by", "bob"]) == 0
    assert "applied org_acme__versions: version 1" in capsys.readouterr().out
    assert trace_main(["udf", "apply", str(path), "--by", "bob"]) == 0
    assert "unchanged org_acme__versions: version 1" in capsys.readouterr().out
    path.write_text(text.replace("Per block range", "For each block range"))
    assert trace_main(["udf", "apply", str(path), "--by", "bob"]) == 0
    assert "applied org_acme__versions: version 2" in capsys.readouterr().out
    history = udf_store.history(engine_for(world.settings.state_dsn), "org_acme__versions")
    assert [h.version for h in history] == [1, 2]
    assert history[1].source == path.read_text() and history[1].applied_by == "bob"
    assert trace_main(["udf", "list", "--org", "acme"]) == 0
    listed = [line.split()[:2] for line in capsys.readouterr().out.splitlines()]
    assert ["org_acme__versions", "v2"] in listed
    assert trace_main(["udf", "list", "--org", "initech"]) == 2
    assert "unknown organisation 'initech'" in capsys.readouterr().err


def _failed_run(world: World, declaration: str) -> str:
    """Materialise a transform over two ranges in process; the failure's description."""
    udf = UdfDeclaration.model_validate(yaml.safe_load(declaration))
    asset = build_udf_asset(udf, 1)
    instance = dg.DagsterInstance.ephemeral()
    instance.add_dynamic_partitions(block_ranges.name or "", world.keys)
    with pytest.MonkeyPatch.context() as mp:
        for key, value in world.cli_env.items():
            if key.startswith(("AWS_", "TRACE_")):
                mp.setenv(key, value)
        result = dg.materialize(
            [asset],
            instance=instance,
            resources=build_resources(world.settings),
            tags=_ranged(world.keys[:2]),
            raise_on_error=False,
        )
    instance.dispose()
    assert not result.success
    failure = result.failure_data_for_node(asset.op.name)
    assert failure is not None and failure.user_failure_data is not None
    return failure.user_failure_data.description or ""


def test_output_that_breaks_its_rules_or_schema_commits_nothing(
    world: World, applied: Path
) -> None:
    """The circuit breaker: the rows are computed in the sandbox, then a blocking rule fails
    on them, or a column declared not nullable holds nulls: the run fails saying which, and
    no version of the transform is committed."""
    strict = GOOD.replace(UDF, "org_acme__strict").replace(
        "{name: has_transfers, kind: range, column: transfers, min: 1}",
        "{name: has_transfers, kind: range, column: transfers, min: 1000000}",
    )
    description = _failed_run(world, strict)
    assert "org_acme__strict was not committed: 1 blocking quality rule(s) failed" in description
    assert "has_transfers" in description
    assert world.reader.resolve("org_acme__strict") == {}

    nulls = GOOD.replace(UDF, "org_acme__nulls").replace(
        "max(length(value_string)) AS longest_value",
        "CAST(NULL AS BIGINT) AS longest_value",
    )
    description = _failed_run(world, nulls)
    assert description.startswith(
        f"org_acme__nulls partition {world.keys[0]}: column 'longest_value' holds "
    )
    assert "null(s) but is declared not nullable" in description
    assert world.reader.resolve("org_acme__nulls") == {}


def test_an_applied_transform_makes_the_warm_run_worker_stale(
    world: World, applied: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The warm run workers preload the code location: a transform applied since they started
    must replace them, or a run of it would find no asset."""
    for key, value in settings_env(world.settings).items():
        monkeypatch.setenv(key, value)
    before = pool_signature(DEFAULT_PRELOAD)
    assert before == pool_signature(DEFAULT_PRELOAD)  # nothing changed: the pool is kept
    path = tmp_path / "warm.yaml"
    path.write_text(GOOD.replace(UDF, "org_acme__warm"))
    assert trace_main(["udf", "apply", str(path)]) == 0
    assert pool_signature(DEFAULT_PRELOAD) != before


def test_lineage_impacted_reaches_the_transform(
    world: World, applied: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    for key, value in settings_env(world.settings).items():
        monkeypatch.setenv(key, value)
    assert trace_main(["lineage", "impacted", "--dataset", "logs", "--columns", "topic1"]) == 0
    impacted = dict(line.split("\t") for line in capsys.readouterr().out.splitlines())
    # logs.topic1 -> erc20_transfers.from_address -> every column of the transform (no
    # lineage declared: each output column depends on every declared input column)
    assert "from_address" in impacted["erc20_transfers"].split(",")
    assert impacted[UDF].split(",") == [
        "token",
        "transfers",
        "senders",
        "first_block",
        "last_block",
        "longest_value",
    ]


def test_a_transform_can_not_read_itself_through_another(
    world: World,
    applied: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture,
) -> None:
    for key, value in settings_env(world.settings).items():
        monkeypatch.setenv(key, value)
    downstream = tmp_path / "downstream.yaml"
    downstream.write_text(
        GOOD.replace(UDF, "org_acme__downstream")
        .replace("dataset: erc20_transfers", f"dataset: {UDF}")
        .replace("columns: [block_number, token, from_address, value_string]", "columns: [token]")
        .split("schema:")[0]
        + "schema:\n  - {name: token, type: binary, doc: ERC-20 contract}\n"
        + f"code:\n  kind: sql\n  sql: SELECT DISTINCT token FROM {UDF}\n"
    )
    assert trace_main(["udf", "apply", str(downstream)]) == 0, capsys.readouterr().err
    capsys.readouterr()
    loop = tmp_path / "loop.yaml"
    loop.write_text(
        GOOD.replace("dataset: erc20_transfers", "dataset: org_acme__downstream")
        .replace("columns: [block_number, token, from_address, value_string]", "columns: [token]")
        .split("schema:")[0]
        + "schema:\n  - {name: token, type: binary, doc: ERC-20 contract}\n"
        + "code:\n  kind: sql\n  sql: SELECT token FROM org_acme__downstream\n"
    )
    assert trace_main(["udf", "apply", str(loop)]) == 2
    assert capsys.readouterr().err == (
        f"trace: UdfError: {loop}:5: inputs[0].dataset: 'org_acme__downstream' reads this "
        f"transform's output ({UDF} -> org_acme__downstream -> {UDF}); a transform can not "
        "read itself, even through others\n"
    )
    assert [h.version for h in udf_store.history(engine_for(world.settings.state_dsn), UDF)] == [1]
