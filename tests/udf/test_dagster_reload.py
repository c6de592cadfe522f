"""Declaring a transform reloads the running Dagster deployment: against a real `dagster dev`
(webserver, daemon, code server; one per module), `trace udf apply` with TRACE_DAGSTER_URL
set reloads the code location, the transform is in the UI's asset list without a restart,
and a backfill of one of its partitions launched with the UI's own GraphQL mutation
materialises it: committed, with the rows polars computes."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import polars as pl
import pytest
from polars.testing import assert_frame_equal

from infra.bench.ui_backfill import DONE, LAUNCH, DagsterDev
from infra.local.services import PostgresServer
from tests.conftest import RANGE_SIZE
from tests.udf.test_sql_udfs import GOOD, UDF, World, expected_rows, module_world

BIN = Path(sys.executable).parent
ASSETS = "{ assetNodes { assetKey { path } } }"
ADD_PARTITION = """mutation($key: String!) { addDynamicPartition(partitionsDefName: "block_ranges",
  partitionKey: $key, repositorySelector: {repositoryName: "__repository__",
  repositoryLocationName: "trace"}) { __typename } }"""
BACKFILL = """query($id: String!) { partitionBackfillOrError(backfillId: $id) {
  ... on PartitionBackfill { status runs(limit: 5) { runId status } } } }"""
MATERIALISED = """query($key: AssetKeyInput!, $p: String!) { assetOrError(assetKey: $key) {
  ... on Asset { assetMaterializations(partitions: [$p]) { partition runId } } } }"""
BACKFILL_LIMIT_S = 300.0  # a safety bound on a hung daemon, not an assertion on speed


world = module_world("rld")


@pytest.fixture(scope="module")
def dagster(
    world: World, postgres: PostgresServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[DagsterDev]:
    env = {k: v for k, v in world.cli_env.items() if k != "DAGSTER_HOME"}
    with DagsterDev(env, postgres, tmp_path_factory.mktemp("reload-dagster")) as running:
        yield running


def add_partitions(dagster: DagsterDev, keys: list[str]) -> None:
    """The ranges in block order, as the chain-head sensor adds them (Dagster orders dynamic
    partitions as added, and a later test module's partition ranges go by that order)."""
    for each in keys:
        added = dagster.graphql(ADD_PARTITION, {"key": each})["addDynamicPartition"]
        assert added["__typename"] in (
            "AddDynamicPartitionSuccess",
            "DuplicateDynamicPartitionError",
        )


def _asset_names(dagster: DagsterDev) -> set[str]:
    return {"/".join(n["assetKey"]["path"]) for n in dagster.graphql(ASSETS)["assetNodes"]}


def test_apply_reloads_the_ui_and_the_ui_materialises_the_transform(
    world: World, dagster: DagsterDev, tmp_path: Path
) -> None:
    assert "erc20_transfers" in _asset_names(dagster) and UDF not in _asset_names(dagster)
    path = tmp_path / "token_activity.yaml"
    path.write_text(GOOD)
    env = {**world.cli_env, "DAGSTER_HOME": str(dagster.home), "TRACE_DAGSTER_URL": dagster.url}
    applied = subprocess.run(
        [str(BIN / "trace"), "udf", "apply", str(path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert applied.returncode == 0, applied.stderr
    assert applied.stdout == (
        f"applied {UDF}: version 1; reloaded the Dagster code location 'trace' at {dagster.url}\n"
    )
    assert UDF in _asset_names(dagster)  # no restart: the same webserver shows it

    key = world.keys[1]
    add_partitions(dagster, world.keys[:2])
    params = {  # what the asset page's "Materialize" dialog sends for one partition
        "tags": [],
        "assetSelection": [{"path": [UDF]}],
        "partitionNames": [key],
        "fromFailure": False,
    }
    launched = dagster.graphql(LAUNCH, {"p": params})["launchPartitionBackfill"]
    assert launched["__typename"] == "LaunchBackfillSuccess", launched
    deadline = time.monotonic() + BACKFILL_LIMIT_S
    while (
        status := dagster.graphql(BACKFILL, {"id": launched["backfillId"]})[
            "partitionBackfillOrError"
        ]
    )["status"] not in DONE:
        assert time.monotonic() < deadline, status
        time.sleep(0.5)
    assert status["status"] == "COMPLETED_SUCCESS", status
    assert [r["status"] for r in status["runs"]] == ["SUCCESS"]

    events = dagster.graphql(MATERIALISED, {"key": {"path": [UDF]}, "p": key})["assetOrError"]
    assert [e["partition"] for e in events["assetMaterializations"]] == [key]
    assert events["assetMaterializations"][0]["runId"] == status["runs"][0]["runId"]
    reader = world.reader
    assert sorted(reader.resolve(UDF)) == [key]  # only the partition the UI asked for
    transfers = pl.from_arrow(reader.read("erc20_transfers", [key]))
    got = pl.from_arrow(reader.read(UDF, [key]))
    assert isinstance(transfers, pl.DataFrame) and isinstance(got, pl.DataFrame)
    assert got.height > 0 and transfers["block_number"].min() // RANGE_SIZE == 1
    assert_frame_equal(got.sort("token"), expected_rows(transfers).sort("token"))
