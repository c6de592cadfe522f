"""Downstream assets read exactly the committed data through the IO manager, and an operator's
CLI backfill (`dagster asset materialize --partition-range`) commits every range in one run."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import dagster as dg
import pyarrow as pa
import pyarrow.compute as pc

from infra.local.dagster_cli import materialize_command
from infra.local.services import PostgresServer
from tests.conftest import RANGE_SIZE, Devnet
from trace_assets.definitions import build_resources
from trace_assets.partitions import block_ranges
from trace_assets.raw.chain import raw_chain
from trace_resources.chain.ranges import complete_ranges
from trace_resources.resources import ObjectStoreResource, StateStoreResource
from trace_resources.settings import Settings
from trace_resources.storage.read_model import ReadModel
from trace_resources.storage.state import engine_for

REPO = Path(__file__).resolve().parents[2]


@dg.asset(partitions_def=block_ranges, io_manager_key="dataset_io_manager")
def logs_per_block(logs: pa.Table) -> pa.Table:
    """A stand-in for a derived dataset: log counts per block of the committed logs."""
    grouped = logs.group_by("block_number").aggregate([("log_index", "count")])
    return grouped.rename_columns(["block_number", "logs"]).sort_by("block_number")


def test_downstream_asset_reads_committed_data(
    devnet: Devnet, test_settings: Settings, objects: ObjectStoreResource, state: StateStoreResource
) -> None:
    key = complete_ranges(-1, devnet.finalized, RANGE_SIZE)[2].key
    instance = dg.DagsterInstance.ephemeral()
    instance.add_dynamic_partitions(block_ranges.name, [key])
    resources = build_resources(test_settings)
    assert dg.materialize(
        [raw_chain], instance=instance, resources=resources, partition_key=key
    ).success
    result = dg.materialize(
        [raw_chain, logs_per_block],  # only logs_per_block runs; logs is read as committed
        instance=instance,
        resources=resources,
        partition_key=key,
        selection=[logs_per_block],
    )
    assert result.success
    assert state.versions().read.current_versions("logs")[key].version == 1  # upstream not re-run
    derived = state.reader(objects).read("logs_per_block", [key])
    logs = state.reader(objects).read("logs", [key])
    assert derived.num_rows > 0
    assert pc.sum(derived["logs"]).as_py() == logs.num_rows
    start = int(key[:12])
    for row in derived.slice(0, 5).to_pylist():
        receipts = devnet.node.rpc("eth_getBlockReceipts", [hex(row["block_number"])])
        assert row["logs"] == sum(len(r["logs"]) for r in receipts)
        assert row["block_number"] >= start


def test_cli_backfill_of_a_partition_range(
    devnet: Devnet, postgres: PostgresServer, test_settings: Settings, tmp_path: Path
) -> None:
    home = tmp_path / "dagster_home"
    home.mkdir()
    (home / "dagster.yaml").write_text((REPO / "dagster_home" / "dagster.yaml").read_text())
    env = {
        **os.environ,
        "DAGSTER_HOME": str(home),
        **postgres.dagster_env(),
        "TRACE_RPC_URL": test_settings.rpc_url,
        "TRACE_RANGE_SIZE": str(RANGE_SIZE),
        "TRACE_STATE_DSN": test_settings.state_dsn,
        "TRACE_OBJECT_STORE": "s3",
        "TRACE_S3_ENDPOINT_URL": test_settings.s3_endpoint_url or "",
        "TRACE_BUCKET_DATASETS": test_settings.bucket_datasets,
    }
    bin_dir = Path(sys.executable).parent
    sync = subprocess.run(
        [str(bin_dir / "trace"), "partitions", "sync"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert sync.returncode == 0, sync.stderr
    keys = [r.key for r in complete_ranges(-1, devnet.finalized, RANGE_SIZE)]
    assert f"added {len(keys)} block range(s)" in sync.stdout

    run = subprocess.run(
        materialize_command("blocks,transactions,logs", keys[0], keys[-1]),
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stderr.count("RUN_SUCCESS") == 1  # one run for the whole range
    summary = {
        s.dataset: s for s in ReadModel(engine_for(test_settings.state_dsn)).dataset_summaries()
    }
    assert set(summary) == {"blocks", "transactions", "logs"}
    assert (
        summary["blocks"].partitions == len(keys)
        and summary["blocks"].rows == len(keys) * RANGE_SIZE
    )

    listed = subprocess.run(
        [str(bin_dir / "trace"), "datasets"], env=env, capture_output=True, text=True, timeout=60
    )
    assert listed.returncode == 0 and "transactions" in listed.stdout
