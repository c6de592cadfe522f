"""Raw chain datasets through Dagster: the asset graph, data fidelity against JSON-RPC, the
chain-head sensor, and the clear errors checked before cryo is called."""

from __future__ import annotations

import os
import random
import subprocess
import sys
import threading
from pathlib import Path

import dagster as dg
import pyarrow.compute as pc
import pytest
from dagster._core.storage.tags import (
    ASSET_PARTITION_RANGE_END_TAG,
    ASSET_PARTITION_RANGE_START_TAG,
)

from tests.conftest import CHAIN_ID, RANGE_SIZE, Devnet
from trace_assets.definitions import build_definitions, build_resources, chain_head_sensor
from trace_assets.partitions import block_ranges
from trace_assets.raw.chain import RAW_ASSET_KEYS, raw_chain
from trace_resources.chain.ranges import complete_ranges
from trace_resources.chain.schemas import RAW_SCHEMAS
from trace_resources.resources import ObjectStoreResource, StateStoreResource
from trace_resources.settings import Settings

REPO = Path(__file__).resolve().parents[2]


def finalized_keys(devnet: Devnet) -> list[str]:
    return [r.key for r in complete_ranges(-1, devnet.finalized, RANGE_SIZE)]


def materialize_ranges(
    settings: Settings, keys: list[str], instance: dg.DagsterInstance
) -> dg.ExecuteInProcessResult:
    instance.add_dynamic_partitions(block_ranges.name, keys)
    tags = {ASSET_PARTITION_RANGE_START_TAG: keys[0], ASSET_PARTITION_RANGE_END_TAG: keys[-1]}
    return dg.materialize(
        [raw_chain],
        instance=instance,
        resources=build_resources(settings),
        tags=tags,
        raise_on_error=False,
    )


def rpc(devnet: Devnet, method: str, *params: object) -> object:
    return devnet.node.rpc(method, list(params))


def test_definitions_validate(test_settings: Settings) -> None:
    env = {
        **os.environ,
        "TRACE_RPC_URL": test_settings.rpc_url,
        "TRACE_STATE_DSN": test_settings.state_dsn,
    }
    done = subprocess.run(
        [
            str(Path(sys.executable).with_name("dagster")),
            "definitions",
            "validate",
            "-w",
            "workspace.yaml",
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert "Validation successful for code location trace" in done.stderr + done.stdout


def test_asset_graph() -> None:
    defs = build_definitions(Settings())
    graph = defs.resolve_asset_graph()
    keys = {k.to_user_string() for k in graph.get_all_asset_keys()}
    assert {"blocks", "transactions", "logs"} <= keys
    for key in RAW_ASSET_KEYS:
        node = graph.get(key)
        assert node.partitions_def == block_ranges
        assert node.backfill_policy == dg.BackfillPolicy.single_run()
        columns = [c.name for c in node.metadata["dagster/column_schema"].columns]
        assert columns == RAW_SCHEMAS[key.path[-1]].names
    assert defs.resolve_sensor_def("chain_head_sensor") is not None


def test_committed_datasets_equal_the_chain(
    devnet: Devnet, test_settings: Settings, objects: ObjectStoreResource, state: StateStoreResource
) -> None:
    keys = finalized_keys(devnet)
    assert len(keys) >= 6
    result = materialize_ranges(test_settings, keys, dg.DagsterInstance.ephemeral())
    assert result.success

    reader = state.reader(objects)
    blocks = reader.read("blocks").sort_by("block_number")
    txs = reader.read("transactions")
    logs = reader.read("logs")
    last = int(keys[-1].split("-")[1])
    assert blocks["block_number"].to_pylist() == list(range(last + 1))
    assert set(pc.unique(blocks["chain_id"]).to_pylist()) == {CHAIN_ID}
    assert txs.num_rows >= 25 * devnet.summary.blocks

    tx_per_block = {n: 0 for n in range(last + 1)}
    for n in txs["block_number"].to_pylist():
        tx_per_block[n] += 1
    logs_per_tx: dict[bytes, int] = {}
    for h in logs["transaction_hash"].to_pylist():
        logs_per_tx[h] = logs_per_tx.get(h, 0) + 1

    sample = random.Random(1).sample(range(1, last + 1), 12)
    for n in sample:
        block = rpc(devnet, "eth_getBlockByNumber", hex(n), False)
        assert tx_per_block[n] == len(block["transactions"]), f"block {n}"
        row = blocks.slice(n, 1).to_pylist()[0]
        assert "0x" + row["block_hash"].hex() == block["hash"]
        assert "0x" + row["parent_hash"].hex() == block["parentHash"]
        receipts = rpc(devnet, "eth_getBlockReceipts", hex(n))
        for receipt in receipts:
            assert logs_per_tx.get(bytes.fromhex(receipt["transactionHash"][2:]), 0) == len(
                receipt["logs"]
            )
    # every range's committed version records its first and last block hashes
    for key, record in reader.resolve("blocks").items():
        first = int(key[:12])
        assert (
            record.manifest.source["first"]["hash"]
            == rpc(devnet, "eth_getBlockByNumber", hex(first), False)["hash"]
        )


def test_rerun_of_the_same_chain_data_keeps_the_version(
    devnet: Devnet, test_settings: Settings, objects: ObjectStoreResource, state: StateStoreResource
) -> None:
    """Re-extracting a finalized range gives the same Parquet bytes: the second run's commit is
    a recorded no-op (no new version, no outbox event), and Dagster shows the version kept."""
    key = finalized_keys(devnet)[1]
    instance = dg.DagsterInstance.ephemeral()
    instance.add_dynamic_partitions(block_ranges.name, [key])
    versions = state.versions()
    for unchanged in (False, True):
        result = dg.materialize(
            [raw_chain],
            instance=instance,
            resources=build_resources(test_settings),
            partition_key=key,
        )
        assert result.success
        assert {r.version for r in versions.read.current_versions("logs").values()} == {1}
        mats = result.asset_materializations_for_node("raw_chain")
        assert len(mats) == 3
        assert {
            (m.metadata["trace/version"].value, m.metadata["trace/unchanged"].value) for m in mats
        } == {(1, unchanged)}
    history = {(v.dataset, v.version) for v in versions.read.committed_versions(["blocks"])}
    assert history == {("blocks", 1)}
    assert [e.version for e in versions.outbox.unrelayed(limit=100)] == [1, 1, 1]


def test_sensor_adds_only_finalized_ranges_and_keeps_cursor(
    devnet: Devnet, test_settings: Settings
) -> None:
    instance = dg.DagsterInstance.ephemeral()
    resources = build_resources(test_settings)
    context = dg.build_sensor_context(
        instance=instance, resources={"chain": resources["chain"], "state": resources["state"]}
    )
    result = chain_head_sensor(context)
    expected = finalized_keys(devnet)
    assert isinstance(result, dg.SensorResult)
    added = [k for req in result.dynamic_partitions_requests for k in req.partition_keys]
    assert added == expected
    assert int(added[-1][13:]) <= devnet.finalized < int(added[-1][13:]) + RANGE_SIZE
    assert result.cursor == str(int(expected[-1][13:]))
    requested = [
        (r.tags.get(ASSET_PARTITION_RANGE_START_TAG), r.tags.get(ASSET_PARTITION_RANGE_END_TAG))
        for r in result.run_requests
    ]
    assert requested[0][0] == expected[0] and requested[-1][1] == expected[-1]

    # same head, cursor kept: nothing new
    again = chain_head_sensor(
        dg.build_sensor_context(
            instance=instance,
            cursor=result.cursor,
            resources={"chain": resources["chain"], "state": resources["state"]},
        )
    )
    assert isinstance(again, dg.SkipReason)

    # the finalized head moves one range on: exactly one new range (the shared devnet is
    # reverted afterwards so other tests see the chain they expect)
    snapshot = rpc(devnet, "evm_snapshot")
    try:
        rpc(devnet, "anvil_mine", hex(RANGE_SIZE))
        moved = chain_head_sensor(
            dg.build_sensor_context(
                instance=instance,
                cursor=result.cursor,
                resources={"chain": resources["chain"], "state": resources["state"]},
            )
        )
        assert isinstance(moved, dg.SensorResult)
        new = [k for req in moved.dynamic_partitions_requests for k in req.partition_keys]
        assert len(new) == 1 and new[0] > expected[-1]
        assert moved.run_requests[0].partition_key == new[0]
    finally:
        assert rpc(devnet, "evm_revert", snapshot)


def test_sensor_watches_the_head_and_requests_a_range_completed_during_its_evaluation(
    devnet: Devnet, test_settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A range finalized while an evaluation watches is requested by that evaluation, not
    left for the daemon's next sensor loop (up to 5 s later)."""
    monkeypatch.setenv("TRACE_CHAIN_HEAD_WATCH_S", "4")
    instance = dg.DagsterInstance.ephemeral()
    resources = build_resources(test_settings)
    chain, state = resources["chain"], resources["state"]
    cursor = str(int(finalized_keys(devnet)[-1][13:]))
    snapshot = rpc(devnet, "evm_snapshot")
    miner = threading.Timer(1.0, lambda: rpc(devnet, "anvil_mine", hex(RANGE_SIZE)))
    try:
        miner.start()  # the head moves one range on a second after the evaluation starts
        result = chain_head_sensor(
            dg.build_sensor_context(
                instance=instance, cursor=cursor, resources={"chain": chain, "state": state}
            )
        )
        miner.join()
        assert isinstance(result, dg.SensorResult), result
        new = [k for req in result.dynamic_partitions_requests for k in req.partition_keys]
        assert len(new) == 1 and int(new[0][:12]) == int(cursor) + 1
        assert result.cursor == str(int(cursor) + RANGE_SIZE)
    finally:
        miner.cancel()
        assert rpc(devnet, "evm_revert", snapshot)
