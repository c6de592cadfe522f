"""A backfill launched the way the Dagster UI launches it (GraphQL `launchPartitionBackfill`
against a real `dagster dev` webserver and daemon) runs all its ranges in one run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

from infra.local.services import PostgresServer, free_port
from tests.conftest import RANGE_SIZE, Devnet
from trace_resources.chain.ranges import complete_ranges
from trace_resources.settings import Settings
from trace_resources.storage.catalog import summarise_datasets
from trace_resources.storage.state import engine_for

REPO = Path(__file__).resolve().parents[2]
LAUNCH = """mutation($p: LaunchBackfillParams!) { launchPartitionBackfill(backfillParams: $p) {
  __typename ... on LaunchBackfillSuccess { backfillId } ... on PythonError { message } } }"""
STATUS = """query($id: String!) { partitionBackfillOrError(backfillId: $id) {
  ... on PartitionBackfill { status numPartitions runs(limit: 20) { runId status } } } }"""
ADD_PARTITION = """mutation($key: String!) { addDynamicPartition(partitionsDefName: "block_ranges",
  partitionKey: $key, repositorySelector: {repositoryName: "__repository__",
  repositoryLocationName: "trace"}) { __typename } }"""


def _graphql(url: str, query: str, variables: dict[str, object]) -> dict[str, object]:
    response = httpx.post(
        f"{url}/graphql", json={"query": query, "variables": variables}, timeout=30
    )
    response.raise_for_status()
    return response.json()["data"]


def test_ui_backfill_runs_ranges_in_one_run(
    devnet: Devnet, postgres: PostgresServer, test_settings: Settings, tmp_path: Path
) -> None:
    home = tmp_path / "dagster_home"
    home.mkdir()
    (home / "dagster.yaml").write_text((REPO / "dagster_home" / "dagster.yaml").read_text())
    db = f"dagster_ui_{os.getpid()}"
    postgres.psql(f'CREATE DATABASE "{db}" OWNER trace')
    port = free_port()
    env = {
        **os.environ,
        "DAGSTER_HOME": str(home),
        "TRACE_DAGSTER_PG_HOST": "127.0.0.1",
        "TRACE_DAGSTER_PG_PORT": str(postgres.port),
        "TRACE_DAGSTER_PG_USER": postgres.user,
        "TRACE_DAGSTER_PG_PASSWORD": postgres.password,
        "TRACE_DAGSTER_PG_DB": db,
        "TRACE_RPC_URL": test_settings.rpc_url,
        "TRACE_RANGE_SIZE": str(RANGE_SIZE),
        "TRACE_STATE_DSN": test_settings.state_dsn,
        "TRACE_OBJECT_STORE": "s3",
        "TRACE_S3_ENDPOINT_URL": test_settings.s3_endpoint_url or "",
        "TRACE_BUCKET_DATASETS": test_settings.bucket_datasets,
        "TRACE_SENSORS_RUNNING": "false",  # this test drives the backfill, not the sensor
    }
    log = (tmp_path / "dagster.log").open("w")
    dagster = subprocess.Popen(
        [
            str(Path(sys.executable).with_name("dagster")),
            "dev",
            "-w",
            "workspace.yaml",
            "-h",
            "127.0.0.1",
            "-p",
            str(port),
        ],
        cwd=REPO,
        env=env,
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=log,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(f"{url}/server_info", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, (tmp_path / "dagster.log").read_text()[-3000:]
            time.sleep(1)
        keys = [r.key for r in complete_ranges(-1, devnet.finalized, RANGE_SIZE)][:3]
        for key in keys:  # what the UI's "add partition" does
            added = _graphql(url, ADD_PARTITION, {"key": key})["addDynamicPartition"]
            assert added["__typename"] == "AddDynamicPartitionSuccess", added
        launched = _graphql(
            url,
            LAUNCH,
            {
                "p": {
                    "partitionNames": keys,
                    "assetSelection": [
                        {"path": [name]} for name in ("blocks", "transactions", "logs")
                    ],
                    "fromFailure": False,
                }
            },
        )["launchPartitionBackfill"]
        assert launched["__typename"] == "LaunchBackfillSuccess", launched
        deadline = time.monotonic() + 180
        while True:
            backfill = _graphql(url, STATUS, {"id": launched["backfillId"]})[
                "partitionBackfillOrError"
            ]
            if (
                backfill["status"] not in ("REQUESTED",)
                and backfill["runs"]
                and all(r["status"] in ("SUCCESS", "FAILURE", "CANCELED") for r in backfill["runs"])
            ):
                break
            assert time.monotonic() < deadline, backfill
            time.sleep(2)
        assert backfill["status"] == "COMPLETED_SUCCESS"
        assert [r["status"] for r in backfill["runs"]] == ["SUCCESS"]  # three ranges, one run
        summary = {s.dataset: s for s in summarise_datasets(engine_for(test_settings.state_dsn))}
        assert summary["logs"].partitions == 3 and summary["blocks"].rows == 3 * RANGE_SIZE
    finally:
        os.killpg(dagster.pid, signal.SIGINT)
        try:
            dagster.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(dagster.pid, signal.SIGKILL)
            dagster.wait()
        log.close()
