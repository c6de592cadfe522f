"""One organisation's runaway transform never stalls another's runs or the platform's: against
a real `dagster dev` (deployment dagster.yaml: 2 run slots, a pool per organisation limited to
one step), organisation A's SQL transform that runs until TRACE_UDF_SQL_TIMEOUT_S is launched
twice from the UI; its second run waits in the queue without a run slot while organisation B's
transform and a raw ingest run are dequeued past it and succeed; both A runs end with the
timeout's failure message."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from infra.bench.ui_backfill import LAUNCH, DagsterDev
from infra.local.services import PostgresServer
from tests.udf.test_sql_udfs import GOOD, UDF, World, module_world

BIN = Path(sys.executable).parent
TIMEOUT_S = "30"  # TRACE_UDF_SQL_TIMEOUT_S here: ~3 times what B's and the ingest run take
RUNAWAY = "org_initech__runaway"
OTHER = "org_hooli__token_activity"
RAW = ["blocks", "transactions", "logs"]
LIMIT_S = 300.0  # a safety bound on a hung daemon, not an assertion on speed

RUNAWAY_YAML = f"""\
format_version: 1
name: {RUNAWAY}
description: Never finishes (a cross join with a huge series)
inputs:
  - dataset: erc20_transfers
    columns: [token]
partitioning: block_range
mode: replace
schema:
  - {{name: token, type: binary, doc: ERC-20 contract}}
  - {{name: n, type: int64, doc: rows}}
code:
  kind: sql
  sql: |
    SELECT token, count(*) AS n
    FROM erc20_transfers, generate_series(1, 1000000000000) AS g(i)
    GROUP BY token
"""

ADD_PARTITION = """mutation($key: String!) { addDynamicPartition(partitionsDefName: "block_ranges",
  partitionKey: $key, repositorySelector: {repositoryName: "__repository__",
  repositoryLocationName: "trace"}) { __typename } }"""
BACKFILL = """query($id: String!) { partitionBackfillOrError(backfillId: $id) {
  ... on PartitionBackfill { status runs(limit: 5) { runId status } } } }"""
FAILURE = """query($id: ID!) { runOrError(runId: $id) { ... on Run { status
  eventConnection(afterCursor: null) { events { __typename
    ... on ExecutionStepFailureEvent { error { message } } } } } } }"""


committed = module_world("pool", name="committed")


@pytest.fixture(scope="module")
def world(committed: World, tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    """The module's world with both organisations' transforms applied."""
    files = tmp_path_factory.mktemp("pool-udfs")
    for name, text in ((RUNAWAY, RUNAWAY_YAML), (OTHER, GOOD.replace(UDF, OTHER))):
        (files / f"{name}.yaml").write_text(text)
        applied = subprocess.run(
            [str(BIN / "trace"), "udf", "apply", str(files / f"{name}.yaml")],
            env=committed.cli_env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert applied.returncode == 0, applied.stderr
    yield committed


@pytest.fixture(scope="module")
def dagster(
    world: World, postgres: PostgresServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[DagsterDev]:
    env = {k: v for k, v in world.cli_env.items() if k != "DAGSTER_HOME"}
    env["TRACE_UDF_SQL_TIMEOUT_S"] = TIMEOUT_S
    with DagsterDev(env, postgres, tmp_path_factory.mktemp("pool-dagster")) as running:
        yield running


def _launch(dagster: DagsterDev, assets: list[str], key: str) -> str:
    """A backfill of one partition as the asset page's "Materialize" dialog launches it."""
    params = {
        "tags": [],
        "assetSelection": [{"path": [name]} for name in assets],
        "partitionNames": [key],
        "fromFailure": False,
    }
    launched = dagster.graphql(LAUNCH, {"p": params})["launchPartitionBackfill"]
    assert launched["__typename"] == "LaunchBackfillSuccess", launched
    return str(launched["backfillId"])


def _run_of(dagster: DagsterDev, backfill_id: str, statuses: set[str]) -> dict[str, str]:
    """The backfill's one run once it is in one of `statuses` (polled as the UI polls)."""
    deadline = time.monotonic() + LIMIT_S
    while True:
        backfill = dagster.graphql(BACKFILL, {"id": backfill_id})["partitionBackfillOrError"]
        runs = backfill["runs"]
        if runs and runs[0]["status"] in statuses:
            assert len(runs) == 1, backfill
            return dict(runs[0])
        assert time.monotonic() < deadline, backfill
        time.sleep(0.3)


def _step_errors(dagster: DagsterDev, run_id: str) -> list[str]:
    run = dagster.graphql(FAILURE, {"id": run_id})["runOrError"]
    events = run["eventConnection"]["events"]
    return [e["error"]["message"] for e in events if e["__typename"] == "ExecutionStepFailureEvent"]


def test_a_runaway_organisation_waits_for_itself_only(world: World, dagster: DagsterDev) -> None:
    first, second = world.keys[0], world.keys[1]
    for key in (first, second):
        added = dagster.graphql(ADD_PARTITION, {"key": key})["addDynamicPartition"]
        assert added["__typename"] in (
            "AddDynamicPartitionSuccess",
            "DuplicateDynamicPartitionError",
        )

    runaway_1 = _launch(dagster, [RUNAWAY], first)
    _run_of(dagster, runaway_1, {"STARTED"})
    runaway_2 = _launch(dagster, [RUNAWAY], second)
    queued = _run_of(dagster, runaway_2, {"QUEUED", "STARTING", "STARTED"})
    assert queued["status"] == "QUEUED"  # A's pool is full: queued, no run slot taken

    other = _launch(dagster, [OTHER], first)
    ingest = _launch(dagster, RAW, first)
    done = {"SUCCESS", "FAILURE", "CANCELED"}
    assert _run_of(dagster, other, done)["status"] == "SUCCESS"
    assert _run_of(dagster, ingest, done)["status"] == "SUCCESS"
    # both ran in the run slot A's first run left free, past A's second run, still queued
    assert _run_of(dagster, runaway_2, {"QUEUED", *done})["status"] == "QUEUED"

    timeout = f"the SQL of {RUNAWAY} ran longer than {TIMEOUT_S} s (TRACE_UDF_SQL_TIMEOUT_S)"
    for backfill_id in (runaway_1, runaway_2):
        run = _run_of(dagster, backfill_id, done)
        assert run["status"] == "FAILURE"
        errors = _step_errors(dagster, run["runId"])
        assert errors and all(timeout in e for e in errors), errors
