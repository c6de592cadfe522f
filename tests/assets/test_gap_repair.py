"""Gaps never stay: a sealing run SIGKILLed after its first commit, and an alert evaluation that
could not reach the alert buffer, leave finalized ranges missing; `trace gaps` names exactly
those, the gap-repair sensor re-requests them (not while the killed run still looks in
progress, with backoff after a failed repair), and after the repair runs every range has one
sealed version per dataset with the chain's rows, and every alert was upserted once."""

from __future__ import annotations

import json
import os
import subprocess
from collections import Counter
from pathlib import Path
from typing import Any

import dagster as dg
import pytest
import sqlalchemy as sa

from infra.local.dagster_cli import materialize_command
from infra.local.services import MotoS3Server, free_port
from tests.conftest import Devnet, NewDatabase
from trace_assets.alerts.assets import alert_evaluations
from trace_assets.checks import DATASET_CHECKS
from trace_assets.cli import main as trace_cli
from trace_assets.definitions import build_definitions, build_resources, gap_repair_sensor
from trace_assets.derived.assets import DERIVED_ASSETS
from trace_assets.gaps import GAP_SCOPE
from trace_assets.partitions import block_ranges
from trace_assets.raw.chain import raw_chain
from trace_resources.alert_pipeline import tables as alert_tables
from trace_resources.alert_pipeline.queue import SqsBuffer
from trace_resources.alert_pipeline.rules import RuleStore, parse_rule
from trace_resources.alert_pipeline.sink import Sink
from trace_resources.chain.ranges import complete_ranges, parse_partition_key
from trace_resources.resources import StateStoreResource
from trace_resources.settings import Settings
from trace_resources.storage.io_manager import REPAIRS_RUN_TAG
from trace_resources.storage.state import engine_for
from trace_resources.storage.version_store import VersionStore
from trace_sensors.gap_repair import ATTEMPT_TAG, REASON_TAG, REPAIR_TAG

REPO = Path(__file__).resolve().parents[2]
ASSETS = [raw_chain, *DERIVED_ASSETS, alert_evaluations, *DATASET_CHECKS]
RANGE_ASSETS = [dg.AssetKey(a) for a in GAP_SCOPE.assets]
RAW = ("blocks", "transactions", "logs")


def _gaps(capsys: pytest.CaptureFixture[str]) -> tuple[int, dict[str, Any]]:
    """`trace gaps --json` (the real command, in this process): exit code and document."""
    capsys.readouterr()
    code = trace_cli(["gaps", "--json"])
    return code, json.loads(capsys.readouterr().out)


def _missing(document: dict[str, Any]) -> dict[tuple[str, str], str]:
    return {(g["partition"], g["asset"]): g["reason"] for g in document["missing"]}


def test_killed_and_failed_ranges_are_repaired_once(
    devnet: Devnet,
    test_settings: Settings,
    new_database: NewDatabase,
    s3_server: MotoS3Server,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    # three ranges cover the devnet's finalized blocks: few runs, each over real traffic
    range_size = (devnet.finalized + 1) // 3
    keys = [r.key for r in complete_ranges(-1, devnet.finalized, range_size)]
    assert len(keys) == 3
    queue = f"alerts-gaps-{os.getpid()}"
    data_dsn = new_database(f"data_gaps_{os.getpid()}", "data")
    settings = test_settings.model_copy(
        update={
            "range_size": range_size,
            "data_dsn": data_dsn,
            "sqs_endpoint_url": s3_server.endpoint_url,
            "alerts_queue": queue,
        }
    )
    # an endpoint nobody listens on: the alert buffer is unreachable for the runs that use it
    unreachable = settings.model_copy(
        update={"sqs_endpoint_url": f"http://127.0.0.1:{free_port()}"}
    )
    home = tmp_path / "dagster_home"
    home.mkdir()
    (home / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    env = {
        "DAGSTER_HOME": str(home),
        "TRACE_RPC_URL": settings.rpc_url,
        "TRACE_CHAIN_ID": str(settings.chain_id),
        "TRACE_RANGE_SIZE": str(range_size),
        "TRACE_STATE_DSN": settings.state_dsn,
        "TRACE_DATA_DSN": data_dsn,
        "TRACE_OBJECT_STORE": "s3",
        "TRACE_S3_ENDPOINT_URL": s3_server.endpoint_url,
        "TRACE_SQS_ENDPOINT_URL": s3_server.endpoint_url,
        "TRACE_BUCKET_DATASETS": settings.bucket_datasets,
        "TRACE_ALERTS_QUEUE": queue,
        "TRACE_SENSORS_RUNNING": "false",
        "TRACE_GAP_REPAIR_BACKOFF_S": "3600",  # a failed repair waits an hour before the next
    }
    for name, value in env.items():
        monkeypatch.setenv(name, value)

    # one rule: ERC-20 transfers from or to the generator's busiest recipient
    record = [json.loads(line) for line in devnet.record_path.read_text().splitlines()]
    transfers = [r for r in record if r["kind"] == "erc20_transfer"]
    watched = Counter(r["to"] for r in transfers).most_common(1)[0][0]
    expected_alerts = sum(
        1
        for r in transfers
        if watched in (r["from"], r["to"])
        and r["block_number"] <= (parse_partition_key(keys[-1]).last)
    )
    data = alert_tables.data_engine(data_dsn)
    RuleStore(data).create(
        parse_rule(
            {
                "org": "acme",
                "id": "watch",
                "condition": {
                    "kind": "watched_addresses",
                    "addresses": [watched],
                    "datasets": ["erc20_transfers"],
                },
                "channels": [
                    {
                        "kind": "webhook",
                        "name": "h",
                        "url": "http://127.0.0.1:9/",
                        "secret": "s" * 32,
                    }
                ],
            }
        )
    )
    sink = Sink(SqsBuffer(queue, endpoint_url=s3_server.endpoint_url), data, batch=100)

    def drain() -> None:
        while sink.cycle(wait_s=1):
            pass

    defs = build_definitions(settings)
    resources = build_resources(settings)
    state = StateStoreResource(dsn=settings.state_dsn)
    versions = VersionStore(engine_for(settings.state_dsn))

    with dg.DagsterInstance.from_config(str(home)) as instance:
        instance.add_dynamic_partitions(block_ranges.name or "", keys)

        def tick() -> dg.SensorResult | dg.SkipReason:
            context = dg.build_sensor_context(
                instance=instance,
                resources={"chain": resources["chain"], "state": state},
                repository_def=defs.get_repository_def(),
            )
            return gap_repair_sensor(context)  # type: ignore[return-value]

        def materialize(
            key: str, selection: list[dg.AssetKey], tags: dict[str, str], alerts_ok: bool = True
        ) -> dg.ExecuteInProcessResult:
            chosen = settings if alerts_ok else unreachable
            return dg.materialize(
                ASSETS,
                instance=instance,
                resources=build_resources(chosen),
                partition_key=key,
                selection=selection,
                tags=tags,
                raise_on_error=False,
            )

        def run_request(request: dg.RunRequest, alerts_ok: bool) -> dg.ExecuteInProcessResult:
            assert request.partition_key is not None
            return materialize(
                request.partition_key,
                list(request.asset_selection or []),
                dict(request.tags),
                alerts_ok,
            )

        # before any run: every asset of every range is missing
        code, before = _gaps(capsys)
        assert code == 1 and len(before["missing"]) == len(keys) * len(GAP_SCOPE.assets)

        # range 0: the sealing run, in its own process, SIGKILLed right after its first commit
        select = ",".join(GAP_SCOPE.assets)
        killed = subprocess.run(
            materialize_command(select, keys[0]),
            cwd=REPO,
            env={**os.environ, "TRACE_CRASH_POINT": "commit.after_pg_commit"},
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert killed.returncode == -9, killed.stderr[-3000:]
        [killed_run] = instance.get_runs()
        assert killed_run.status == dg.DagsterRunStatus.STARTED  # nobody told Dagster
        sealed_by_killed = [
            name for name in RAW if versions.read.current_version_numbers(name, [keys[0]])
        ]
        # the range's three raw datasets commit in one transaction, then the kill
        assert sorted(sealed_by_killed) == sorted(RAW)

        # range 1: data sealed, but the alert buffer unreachable: the evaluation fails
        failed = materialize(keys[1], RANGE_ASSETS, {}, alerts_ok=False)
        assert not failed.success
        [failed_step] = [
            e.step_key
            for e in failed.all_events
            if e.event_type == dg.DagsterEventType.STEP_FAILURE
        ]
        assert failed_step == "alert_evaluations"
        # range 2: everything succeeds
        assert materialize(keys[2], RANGE_ASSETS, {}).success

        # `trace gaps` names exactly the missing ones, and why
        code, report = _gaps(capsys)
        assert code == 1
        missing = _missing(report)
        in_progress = f"run {killed_run.run_id} is STARTED"
        expected = {
            (keys[0], asset): f"never committed; {in_progress}"
            for asset in GAP_SCOPE.datasets
            if asset not in sealed_by_killed
        }
        expected[(keys[0], "alert_evaluations")] = f"never evaluated; {in_progress}"
        expected[(keys[1], "alert_evaluations")] = f"alert evaluation failed: {failed.run_id}"
        assert missing == expected

        # the sensor leaves range 0 alone while its run looks in progress; repairs range 1
        first = tick()
        assert isinstance(first, dg.SensorResult), first
        [again] = first.run_requests or []
        assert again.partition_key == keys[1]
        assert again.run_key == f"gap_repair:{keys[1]}:1"
        assert list(again.asset_selection or []) == [dg.AssetKey("alert_evaluations")]
        assert again.tags[REPAIR_TAG] == keys[1] and again.tags[ATTEMPT_TAG] == "1"
        assert f"alert evaluation failed: {failed.run_id}" in again.tags[REASON_TAG]
        assert REPAIRS_RUN_TAG not in again.tags  # no dataset to commit once

        # run monitoring marks the killed run failed; the gap report says so
        instance.report_run_failed(killed_run)
        code, report = _gaps(capsys)
        assert code == 1
        assert {k: r for k, r in _missing(report).items() if k[0] == keys[0]} == {
            (keys[0], asset): f"last run failed: {killed_run.run_id}"
            for asset in GAP_SCOPE.assets
            if asset not in sealed_by_killed
        }

        # the repair of range 1 fails too (the buffer still unreachable) ...
        assert not run_request(again, alerts_ok=False).success
        # ... so range 1 backs off, while range 0 (run failed, never repaired) is requested
        second = tick()
        assert isinstance(second, dg.SensorResult), second
        [repair_0] = second.run_requests or []
        assert repair_0.partition_key == keys[0]
        assert repair_0.run_key == f"gap_repair:{keys[0]}:1"
        assert repair_0.tags[REPAIRS_RUN_TAG] == killed_run.run_id
        assert f"last run failed: {killed_run.run_id}" in repair_0.tags[REASON_TAG]
        # the killed run's raw range had committed whole: only what follows it is repaired
        assert set(repair_0.asset_selection or []) == set(RANGE_ASSETS) - {
            dg.AssetKey(name) for name in RAW
        }
        assert run_request(repair_0, alerts_ok=True).success

        backing_off = tick()
        assert isinstance(backing_off, dg.SkipReason), backing_off
        message = backing_off.skip_message or ""
        assert f"{keys[1]}: backing off until" in message and "after 1 repair run(s)" in message
        assert keys[0] not in message

        # once the backoff has passed (here: set to 0) the second repair is requested
        monkeypatch.setenv("TRACE_GAP_REPAIR_BACKOFF_S", "0")
        third = tick()
        assert isinstance(third, dg.SensorResult), third
        [repair_1] = third.run_requests or []
        assert repair_1.run_key == f"gap_repair:{keys[1]}:2"
        assert repair_1.tags[ATTEMPT_TAG] == "2"
        assert run_request(repair_1, alerts_ok=True).success

        done = tick()
        assert isinstance(done, dg.SkipReason)
        assert (done.skip_message or "").startswith("no gaps: all 3 range(s)")
        code, report = _gaps(capsys)
        assert code == 0 and report["missing"] == []
        capsys.readouterr()
        assert trace_cli(["gaps"]) == 0
        assert capsys.readouterr().out.startswith("no gaps: all 3 range(s) up to finalized block")

    # one sealed version per dataset per range, with the chain's rows
    for key in keys:
        block_range = parse_partition_key(key)
        txs = sum(
            len(devnet.node.rpc("eth_getBlockByNumber", [hex(n), False])["transactions"])
            for n in block_range.blocks()
        )
        logs = len(
            devnet.node.rpc(
                "eth_getLogs",
                [{"fromBlock": hex(block_range.start), "toBlock": hex(block_range.last)}],
            )
        )
        erc20 = sum(
            1 for r in transfers if block_range.start <= r["block_number"] <= block_range.last
        )
        for dataset in GAP_SCOPE.datasets:
            history = versions.read.version_history(dataset, key)
            assert [(h["version"], h["commit_mode"]) for h in history] == [(1, "replace")], (
                dataset,
                key,
                history,
            )
        current = versions.read.current_versions
        rows = {d: current(d, [key])[key].manifest for d in ("blocks", "transactions", "logs")}
        assert {d: m.rows for d, m in rows.items()} == {
            "blocks": block_range.size,
            "transactions": txs,
            "logs": logs,
        }, key
        assert current("erc20_transfers", [key])[key].manifest.rows == erc20, key

    # every alert upserted once: nothing the sink received was a duplicate
    drain()
    with data.connect() as conn:
        stored = conn.execute(
            sa.text("SELECT dedupe_key FROM trace_alerts WHERE kind = 'alert'")
        ).all()
    assert len(stored) == expected_alerts > 0
    assert sink.stats.inserted == expected_alerts and sink.stats.duplicates == 0
