"""Call traces: `geth_calls` against the node's own traces, the datasets derived from it, an
endpoint without `debug_*`, traces of another fork; and where receipts come from.

A devnet of its own (a small anvil: ordinary traffic, then `TraceFactory` traffic appended):
the session devnet, whose row counts other tests assert, is left as it is.
"""

from __future__ import annotations

import itertools
import os
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import dagster as dg
import pyarrow as pa
import pytest
from dagster._core.storage.tags import (
    ASSET_PARTITION_RANGE_END_TAG,
    ASSET_PARTITION_RANGE_START_TAG,
)

from infra.devnet.calls import CallTraffic, call_traffic
from infra.devnet.generate import GENESIS_TIMESTAMP, generate
from infra.local.services import AnvilNode, MotoS3Server, free_port
from tests.conftest import CHAIN_ID, NewDatabase
from tests.utils.fault_proxy import Fault, FaultProxy
from trace_assets.checks import DATASET_CHECKS
from trace_assets.definitions import build_resources
from trace_assets.derived.assets import DERIVED_ASSETS, TRACE_DERIVED_ASSETS
from trace_assets.partitions import block_ranges
from trace_assets.raw.chain import raw_chain
from trace_assets.raw.traces import geth_calls
from trace_resources.chain.ranges import complete_ranges, parse_partition_key
from trace_resources.chain.rpc import JsonRpcClient
from trace_resources.chain.schemas import RAW_SCHEMAS
from trace_resources.chain.traces import TRACER_OPTIONS, check_same_blocks, extract_geth_calls
from trace_resources.errors import ChainContinuityError
from trace_resources.registry import arrow_schema, declarations
from trace_resources.resources import ObjectStoreResource, StateStoreResource
from trace_resources.settings import Settings
from trace_resources.storage.commit import DatasetReader

RANGE_SIZE = 10
_counter = itertools.count()
TRACED = TRACE_DERIVED_ASSETS
TOP_LEVEL = [a for a in DERIVED_ASSETS if a.key.path[-1] in ("native_transfers", "contracts")]


@dataclass
class TracedChain:
    node: AnvilNode
    calls: CallTraffic
    keys: list[str]  # the ranges holding the traffic
    settings: Settings
    reader: DatasetReader

    def rpc(self, method: str, *params: Any) -> Any:
        return self.node.rpc(method, list(params))

    def read(self, dataset: str) -> list[dict[str, Any]]:
        schema = arrow_schema(declarations()[dataset])
        return self.reader.read(dataset, self.keys, schema=schema).to_pylist()


def _settings(new_database: NewDatabase, s3: MotoS3Server, rpc_url: str) -> Settings:
    name = f"traces_{os.getpid()}_{next(_counter)}"
    bucket = f"trace-traces-{os.getpid()}-{next(_counter)}"
    s3.s3_client().create_bucket(Bucket=bucket)
    return Settings(
        environment="test",
        rpc_url=rpc_url,
        chain_id=CHAIN_ID,
        range_size=RANGE_SIZE,
        state_dsn=new_database(name, "state"),
        object_store="s3",
        s3_endpoint_url=s3.endpoint_url,
        bucket_datasets=bucket,
        rpc_retry_budget_s=10,
        rpc_max_attempts=3,
    )


def _reader(settings: Settings) -> DatasetReader:
    objects = ObjectStoreResource(
        kind="s3",
        endpoint_url=settings.s3_endpoint_url,
        access_key_id="testing",
        secret_access_key="testing",
        bucket_datasets=settings.bucket_datasets,
    )
    return StateStoreResource(dsn=settings.state_dsn).reader(objects)


def _materialize(
    settings: Settings, keys: list[str], selection: list[dg.AssetsDefinition]
) -> dg.ExecuteInProcessResult:
    instance = dg.DagsterInstance.ephemeral()
    try:
        instance.add_dynamic_partitions(block_ranges.name or "", keys)
        return dg.materialize(
            [raw_chain, geth_calls, *DERIVED_ASSETS, *TRACE_DERIVED_ASSETS, *DATASET_CHECKS],
            instance=instance,
            resources=build_resources(settings),
            tags={
                ASSET_PARTITION_RANGE_START_TAG: keys[0],
                ASSET_PARTITION_RANGE_END_TAG: keys[-1],
            },
            selection=dg.AssetSelection.assets(*selection),
            raise_on_error=False,
        )
    finally:
        instance.dispose()


@pytest.fixture(scope="module")
def traced(
    tmp_path_factory: pytest.TempPathFactory,
    new_database: NewDatabase,
    s3_server: MotoS3Server,
) -> Iterator[TracedChain]:
    node = AnvilNode(
        tmp_path_factory.mktemp("traces-anvil"),
        free_port(),
        chain_id=CHAIN_ID,
        persist=False,
        extra_args=["--timestamp", str(GENESIS_TIMESTAMP)],
    )
    node.start()
    try:
        generate(node.url, blocks=6, txs_per_block=6, accounts=12, tokens=1, seed=11)
        calls = call_traffic(node.url, rounds=2, chain_id=CHAIN_ID)
        finalized = int(node.rpc("eth_getBlockByNumber", ["finalized", False])["number"], 16)
        keys = [
            r.key for r in complete_ranges(-1, finalized, RANGE_SIZE) if r.start <= calls.last_block
        ]
        settings = _settings(new_database, s3_server, node.url)
        with pytest.MonkeyPatch.context() as mp:
            for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
                mp.setenv(var, "testing")
            mp.setenv("AWS_DEFAULT_REGION", "us-east-1")
            # one run: geth_calls follows blocks (it is checked against them), the derived
            # datasets follow their upstreams
            result = _materialize(settings, keys, [raw_chain, geth_calls, *TRACED, *TOP_LEVEL])
            assert result.success, [e.message for e in result.all_events if e.is_failure]
            yield TracedChain(node, calls, keys, settings, _reader(settings))
    finally:
        node.stop()


def _node_frames(chain: TracedChain, number: int) -> list[tuple[Any, ...]]:
    """The node's own callTracer answer for one block, walked depth first."""
    out: list[tuple[Any, ...]] = []

    def walk(tx: str, frame: dict[str, Any], path: list[int]) -> None:
        out.append(
            (
                number,
                tx,
                ".".join(map(str, path)),
                frame["type"],
                frame["from"],
                frame.get("to"),
                int(frame["value"], 16) if "value" in frame else None,
                int(frame["gas"], 16),
                int(frame["gasUsed"], 16),
                frame.get("input"),
                frame.get("output"),
                frame.get("error"),
            )
        )
        for i, child in enumerate(frame.get("calls", [])):
            walk(tx, child, [*path, i])

    for entry in chain.rpc("debug_traceBlockByNumber", hex(number), TRACER_OPTIONS):
        walk(entry["txHash"], entry["result"], [])
    return out


def _hex(value: bytes | None) -> str | None:
    return None if value is None else "0x" + value.hex()


def test_geth_calls_rows_equal_the_nodes_traces(traced: TracedChain) -> None:
    rows = traced.read("geth_calls")
    committed = [
        (
            r["block_number"],
            _hex(r["transaction_hash"]),
            r["trace_address"],
            r["call_type"],
            _hex(r["from_address"]),
            _hex(r["to_address"]),
            None if r["value_string"] is None else int(r["value_string"]),
            r["gas"],
            r["gas_used"],
            _hex(r["input"]),
            _hex(r["output"]),
            r["error"],
        )
        for r in rows
    ]
    blocks = sorted({r["block_number"] for r in traced.read("blocks")})
    expected = [frame for n in blocks for frame in _node_frames(traced, n)]
    assert committed == expected
    assert any(r["depth"] >= 1 for r in rows)  # the factory's traffic has internal frames
    # every transaction of the range has exactly one top-level frame
    transactions = sorted(r["transaction_hash"] for r in traced.read("transactions"))
    assert sorted(r["transaction_hash"] for r in rows if r["trace_address"] == "") == transactions


def test_internal_transfers_and_created_contracts_appear(traced: TracedChain) -> None:
    calls = traced.calls
    transfers = traced.read("traced_native_transfers")
    internal = [
        (r["block_number"], _hex(r["from_address"]), _hex(r["to_address"]), int(r["value_string"]))
        for r in transfers
        if r["depth"] >= 1
    ]
    assert sorted(internal) == sorted(calls.internal_transfers)
    # the payment undone by a caught revert is in the traces, marked, and in no transfer
    undone = {(n, f, t, v) for n, f, t, v in calls.undone_transfers if t != calls.factory}
    assert undone and not undone & set(internal)
    frames = {
        (r["block_number"], _hex(r["from_address"]), _hex(r["to_address"]), int(r["value_string"]))
        for r in traced.read("geth_calls")
        if r["reverted"] and r["value_string"] is not None
    }
    assert undone <= frames
    # the transactions' own values are the ones native_transfers holds, at depth 0
    top = [(r["transaction_hash"], r["value_string"]) for r in transfers if r["depth"] == 0]
    assert sorted(top) == sorted(
        (r["transaction_hash"], r["value_string"]) for r in traced.read("native_transfers")
    )

    created = traced.read("traced_contracts")
    by_contract = {
        (r["block_number"], _hex(r["deployer"]), _hex(r["contract_address"]), r["create_type"])
        for r in created
        if r["depth"] >= 1
    }
    assert by_contract == set(calls.created)
    for _, _, address, _ in calls.created:  # the node holds code at each of them
        assert traced.rpc("eth_getCode", address, "latest") not in ("0x", None)
    # creation transactions are there too (the factory, the tokens), as contracts has them
    assert {r["contract_address"] for r in created if r["depth"] == 0} == {
        r["contract_address"] for r in traced.read("contracts")
    }


def test_endpoint_without_debug_fails_clearly_and_commits_nothing(
    traced: TracedChain, new_database: NewDatabase, s3_server: MotoS3Server
) -> None:
    with FaultProxy(traced.node.url, faults=[Fault("method_not_found")]) as proxy:
        settings = _settings(new_database, s3_server, proxy.url)
        key = traced.keys[-1:]
        result = _materialize(settings, key, [geth_calls])
        assert not result.success
        failure = result.failure_data_for_node("geth_calls")
        assert failure is not None and failure.user_failure_data is not None
        message = failure.user_failure_data.description or ""
        assert "MethodUnsupportedError" in message
        # named by host and port, never the URL's path, where providers put their keys
        host = proxy.url.split("//", 1)[1]
        assert f"the endpoint {host} does not serve debug_traceBlockByNumber" in message
        # refused once, not retried: retrying does not make an endpoint serve a namespace
        assert len({r.seq for r in proxy.requests if r.method.startswith("debug_")}) == 1
        # the other raw datasets still come from this endpoint
        assert _materialize(settings, key, [raw_chain]).success
    reader = _reader(settings)
    assert reader.resolve("geth_calls") == {}
    assert set(reader.resolve("blocks")) == set(key)


def test_traces_are_checked_against_the_committed_blocks(
    traced: TracedChain, new_database: NewDatabase, s3_server: MotoS3Server
) -> None:
    key = traced.keys[-1]
    # no committed blocks for the range: refused, nothing committed
    settings = _settings(new_database, s3_server, traced.node.url)
    result = _materialize(settings, [key], [geth_calls])
    failure = result.failure_data_for_node("geth_calls")
    assert failure is not None and failure.user_failure_data is not None
    assert f"geth_calls of range {key}: the range's blocks are not committed" in (
        failure.user_failure_data.description or ""
    )
    assert _reader(settings).resolve("geth_calls") == {}
    # blocks of another fork (one hash differs): refused, naming the block
    blocks = traced.reader.read("blocks", [key], schema=RAW_SCHEMAS["blocks"])
    hashes = blocks["block_hash"].to_pylist()
    hashes[3] = bytes(32)
    other_fork = blocks.set_column(
        blocks.schema.get_field_index("block_hash"), "block_hash", pa.array(hashes, pa.binary())
    )
    with JsonRpcClient(traced.node.url) as rpc:
        traces = extract_geth_calls(rpc, CHAIN_ID, parse_partition_key(key))
    check_same_blocks(traces, blocks, traced.node.url)  # the committed fork: accepted
    number = blocks["block_number"][3].as_py()
    with pytest.raises(ChainContinuityError, match=f"traced block {number} with hash 0x"):
        check_same_blocks(traces, other_fork, traced.node.url)


def test_receipts_come_from_one_call_per_block(
    traced: TracedChain, new_database: NewDatabase, s3_server: MotoS3Server
) -> None:
    """cryo 0.3.2 takes the transactions' receipt columns from eth_getBlockReceipts, one call
    per block; where an endpoint does not serve it
    (-32601) it falls back to one eth_getTransactionReceipt per transaction, and the committed
    rows are the same."""
    key = traced.keys[0]
    block_range = parse_partition_key(key)
    expected = traced.reader.read("transactions", [key], schema=RAW_SCHEMAS["transactions"])
    for faults in ([], [Fault("method_not_found", methods={"eth_getBlockReceipts"})]):
        with FaultProxy(traced.node.url, faults=faults) as proxy:
            settings = _settings(new_database, s3_server, proxy.url)
            assert _materialize(settings, [key], [raw_chain]).success
            asked = proxy.method_counts()
            per_block = [
                int(r.params[0], 16) for r in proxy.requests if r.method == "eth_getBlockReceipts"
            ]
        committed = _reader(settings).read(
            "transactions", [key], schema=RAW_SCHEMAS["transactions"]
        )
        assert committed.equals(expected)
        assert sorted(set(per_block)) == list(block_range.blocks())
        if faults:
            assert asked["eth_getTransactionReceipt"] == expected.num_rows
        else:
            # one per block for cryo's receipt columns (and one for the probe of which checks
            # the endpoint allows, on the finalized block)
            calls = Counter(per_block)
            assert min(calls.values()) == 1 and sum(calls.values()) <= block_range.size + 1
            assert asked["eth_getTransactionReceipt"] == 0
