"""A backfill launched the way the Dagster UI launches it (GraphQL `launchPartitionBackfill`
against a real `dagster dev` webserver and daemon) runs all its ranges in one run, started by
the repository's warm run launcher; the UI's Terminate cancels a run it started. `trace
backfill` launches and follows a run on the same deployment."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
from dagster._core.storage.tags import HIDDEN_TAG_PREFIX

from infra.local.services import PostgresServer, free_port
from tests.conftest import RANGE_SIZE, Devnet
from tests.utils.fault_proxy import Fault, FaultProxy
from trace_resources.chain.ranges import complete_ranges
from trace_resources.instance.run_launcher import WORKER_TAG
from trace_resources.settings import Settings
from trace_resources.storage.read_model import ReadModel
from trace_resources.storage.state import engine_for

REPO = Path(__file__).resolve().parents[2]
LAUNCH = """mutation($p: LaunchBackfillParams!) { launchPartitionBackfill(backfillParams: $p) {
  __typename ... on LaunchBackfillSuccess { backfillId } ... on PythonError { message } } }"""
STATUS = """query($id: String!) { partitionBackfillOrError(backfillId: $id) {
  ... on PartitionBackfill { status numPartitions runs(limit: 20) { runId status } } } }"""
RUN = """query($id: ID!) { runOrError(runId: $id) { ... on Run { status tags { key value } } } }"""
TERMINATE = """mutation($id: String!) { terminateRun(runId: $id) { __typename
  ... on TerminateRunFailure { message } ... on PythonError { message } } }"""
EVENTS = """query($id: ID!) { logsForRun(runId: $id) { ... on EventConnection {
  events { __typename } } } }"""
ADD_PARTITION = """mutation($key: String!) { addDynamicPartition(partitionsDefName: "block_ranges",
  partitionKey: $key, repositorySelector: {repositoryName: "__repository__",
  repositoryLocationName: "trace"}) { __typename } }"""


def _graphql(url: str, query: str, variables: dict[str, object]) -> dict[str, object]:
    response = httpx.post(
        f"{url}/graphql", json={"query": query, "variables": variables}, timeout=30
    )
    response.raise_for_status()
    return response.json()["data"]


def _backfill(url: str, keys: list[str]) -> str:
    launched = _graphql(
        url,
        LAUNCH,
        {
            "p": {
                "partitionNames": keys,
                "assetSelection": [{"path": [name]} for name in ("blocks", "transactions", "logs")],
                "fromFailure": False,
            }
        },
    )["launchPartitionBackfill"]
    assert launched["__typename"] == "LaunchBackfillSuccess", launched
    return str(launched["backfillId"])


def _run(url: str, run_id: str) -> tuple[str, dict[str, str]]:
    run = _graphql(url, RUN, {"id": run_id})["runOrError"]
    return run["status"], {t["key"]: t["value"] for t in run["tags"]}


def _retried(url: str, run_id: str) -> bool:
    """Whether a step of the run was started again (a terminated run's must not be)."""
    events = _graphql(url, EVENTS, {"id": run_id})["logsForRun"]["events"]
    return any(e["__typename"] == "ExecutionStepUpForRetryEvent" for e in events)


def _trace(url: str, env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(Path(sys.executable).with_name("trace")), "backfill", *args],
        env={**env, "TRACE_DAGSTER_URL": url},
        capture_output=True,
        text=True,
        timeout=180,
    )


def _trace_backfill(url: str, env: dict[str, str], proxy: FaultProxy, ranges: list[str]) -> None:
    """`trace backfill` on the running deployment: refuses unknown names and blocks in one
    line, is stopped with Ctrl-C (and stops its run), and then backfills what is left, with
    its checks, in one fast-lane run, reporting each range as it commits."""
    wrong = _trace(url, env, "--select", "blocks,nosuch")
    assert wrong.returncode == 2, wrong
    assert "unknown dataset 'nosuch'" in wrong.stderr and "transactions" in wrong.stderr
    assert "Traceback" not in wrong.stderr
    beyond = _trace(url, env, "--from", "99999999")
    assert beyond.returncode == 2 and "no known range holds blocks 99999999" in beyond.stderr
    _graphql(url, ADD_PARTITION, {"key": ranges[4]})

    # Ctrl-C while the node hangs: the run is stopped, nothing of it is committed
    proxy.set_faults([Fault("timeout", methods={"eth_getLogs"}, delay=2.0)])
    before = proxy.injected["timeout"]
    command = subprocess.Popen(
        [str(Path(sys.executable).with_name("trace")), "backfill", "--from", ranges[4]],
        env={**env, "TRACE_DAGSTER_URL": url},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 120
    while proxy.injected["timeout"] == before:
        assert command.poll() is None and time.monotonic() < deadline, command.communicate()
        time.sleep(0.2)
    command.send_signal(signal.SIGINT)
    try:
        out, err = command.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        command.kill()  # not left running (nor its pipes open) for the tests after this one
        out, err = command.communicate()
        raise AssertionError(f"`trace backfill` did not stop on SIGINT: {out} {err}") from None
    assert command.returncode == 130, (out, err)
    assert "interrupted; run" in err and "is stopping" in err, err
    run_id = err.split("launched run ", 1)[1].split(":", 1)[0]
    while (status := _run(url, run_id)[0]) not in ("CANCELED", "FAILURE", "SUCCESS"):
        assert time.monotonic() < deadline, status
        time.sleep(0.5)
    assert status == "CANCELED" and not _retried(url, run_id)
    proxy.set_faults([])

    # its events are pushed over the webserver's websocket: with reads an hour apart, it
    # would still be waiting for its second read when the command's timeout ends it
    done = _trace(url, env, "--from", str(int(ranges[3][:12])), "--to", ranges[4], "--poll", "3600")
    assert done.returncode == 0, done
    assert f"over 2 range(s) {ranges[3]} .. {ranges[4]}" in done.stdout, done.stdout
    assert "0 check(s)" not in done.stdout and "check(s) passed" in done.stdout, done.stdout
    # one line per committed range (stderr is not a terminal: no bar)
    assert f"ranges committed: 1/2 {ranges[3]}" in done.stderr, done.stderr
    assert f"ranges committed: 2/2 {ranges[4]}" in done.stderr, done.stderr
    run_id = done.stderr.split("launched run ", 1)[1].split(":", 1)[0]
    status, tags = _run(url, run_id)
    assert status == "SUCCESS" and tags["trace/fast_lane"] == "true", tags
    summary = {
        s.dataset: s for s in ReadModel(engine_for(env["TRACE_STATE_DSN"])).dataset_summaries()
    }
    assert summary["logs"].partitions == 5 and summary["blocks"].rows == 5 * RANGE_SIZE


def test_ui_backfill_runs_ranges_in_one_run(
    devnet: Devnet, postgres: PostgresServer, test_settings: Settings, tmp_path: Path
) -> None:
    # the node behind a proxy, so the second part can make it hang
    with FaultProxy(devnet.url) as proxy:
        _ui_backfill_and_terminate(devnet, proxy, postgres, test_settings, tmp_path)


def _ui_backfill_and_terminate(
    devnet: Devnet,
    proxy: FaultProxy,
    postgres: PostgresServer,
    test_settings: Settings,
    tmp_path: Path,
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
        **postgres.dagster_env(db),
        "TRACE_RPC_URL": proxy.url,
        "TRACE_RPC_RETRY_BUDGET_S": "15",
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
        ranges = [r.key for r in complete_ranges(-1, devnet.finalized, RANGE_SIZE)]
        keys = ranges[:3]
        for key in ranges[:4]:  # what the UI's "add partition" does
            added = _graphql(url, ADD_PARTITION, {"key": key})["addDynamicPartition"]
            assert added["__typename"] == "AddDynamicPartitionSuccess", added
        backfill_id = _backfill(url, keys)
        deadline = time.monotonic() + 180
        while True:
            backfill = _graphql(url, STATUS, {"id": backfill_id})["partitionBackfillOrError"]
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
        summary = {
            s.dataset: s for s in ReadModel(engine_for(test_settings.state_dsn)).dataset_summaries()
        }
        assert summary["logs"].partitions == 3 and summary["blocks"].rows == 3 * RANGE_SIZE
        # started by the warm launcher of dagster_home/dagster.yaml, a fork of its worker, whose
        # tag the UI does not show (hidden); terminating below works only if the launcher
        # finds it
        _, tags = _run(url, backfill["runs"][0]["runId"])
        assert "dagster/backfill" in tags and not [k for k in tags if "run_worker" in k], tags
        assert WORKER_TAG.startswith(HIDDEN_TAG_PREFIX)

        # the node stops answering eth_getLogs: the next range's run hangs in its retries
        # until the operator terminates it from the UI
        proxy.set_faults([Fault("timeout", methods={"eth_getLogs"}, delay=2.0)])
        hanging_id = _backfill(url, ranges[3:4])
        deadline = time.monotonic() + 120
        run_id = None
        while run_id is None or _run(url, run_id)[0] != "STARTED":
            runs = _graphql(url, STATUS, {"id": hanging_id})["partitionBackfillOrError"]["runs"]
            run_id = runs[0]["runId"] if runs else None
            assert time.monotonic() < deadline, runs
            time.sleep(0.5)
        while not proxy.injected["timeout"]:  # its extraction is under way
            assert time.monotonic() < deadline
            time.sleep(0.2)
        terminated = _graphql(url, TERMINATE, {"id": run_id})["terminateRun"]
        assert terminated["__typename"] == "TerminateRunSuccess", terminated
        while (status := _run(url, run_id)[0]) not in ("CANCELED", "FAILURE", "SUCCESS"):
            assert time.monotonic() < deadline, status
            time.sleep(0.5)
        assert status == "CANCELED" and not _retried(url, run_id)  # stopped, not retried
        proxy.set_faults([])
        logs = {
            s.dataset: s for s in ReadModel(engine_for(test_settings.state_dsn)).dataset_summaries()
        }
        assert logs["logs"].partitions == 3  # nothing of the cancelled range was committed

        _trace_backfill(url, env, proxy, ranges)
    finally:
        os.killpg(dagster.pid, signal.SIGINT)
        try:
            dagster.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(dagster.pid, signal.SIGKILL)
            dagster.wait()
        log.close()
