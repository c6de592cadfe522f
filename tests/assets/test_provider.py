"""Trace against provider-like endpoints: the session devnet behind `ProviderProxy`s
(infra/local/rpc_provider.py) with latency, a rate limit, batch, logs-range and concurrency
limits and no `debug_*`, configured through TRACE_RPC_ENDPOINTS.

What a user relies on, end to end (the `raw_chain` asset, S3 API, Postgres, the `trace` CLI):
- the rows committed through a limited endpoint equal those of the open node, key for key,
  and the endpoint never saw more than its limits (the proxy counts);
- with two healthy endpoints, a backfill's ranges are spread over both, each range's data
  from one of them, and neither saw more than its limits;
- when the endpoint in use starts failing mid-backfill, the backfill completes on the next;
- two endpoints that disagree on a finalized block's hash stop the range with an error
  naming the block and both endpoints, and nothing is committed;
- `trace rpc probe` (its entry point, in process) says what each endpoint serves; a bad
  profile or a dead endpoint is one clear line.
"""

from __future__ import annotations

import json
from typing import Any

import pyarrow as pa
import pytest

from infra.local.fault_proxy import Fault
from infra.local.rpc_provider import ProviderLimits, ProviderProxy
from tests.conftest import CHAIN_ID, Devnet
from tests.utils.dagster_runs import (
    failure_description,
    materialize_keys,
    no_dagster_retry_delay,  # noqa: F401 - fixture
    step_attempts,
)
from trace_assets.cli import main
from trace_resources.chain.extract import ChainClient
from trace_resources.chain.ranges import BlockRange
from trace_resources.chain.schemas import RAW_DATASETS
from trace_resources.resources import ObjectStoreResource, StateStoreResource
from trace_resources.settings import RpcEndpoint, Settings

pytestmark = pytest.mark.usefixtures("no_dagster_retry_delay")

RANGES = [BlockRange(100, 149), BlockRange(150, 199)]
SORT_KEYS: dict[str, list[tuple[str, str]]] = {
    "blocks": [("block_number", "ascending")],
    "transactions": [("block_number", "ascending"), ("transaction_index", "ascending")],
    "logs": [("block_number", "ascending"), ("log_index", "ascending")],
}
# a public Monad provider's limits, with a logs range and batches small enough to matter here
LIMITS = ProviderLimits(
    latency_s=0.03,
    requests_per_second=25,
    max_batch=10,
    max_logs_range=10,
    max_concurrent=4,
    disabled=("debug",),
)
PROFILE = {
    "requests_per_second": 25,
    "max_batch": 10,
    "max_logs_range": 10,
    "max_concurrent_requests": 4,
    "unsupported": ["debug"],
}


def with_endpoints(settings: Settings, *endpoints: dict[str, Any]) -> Settings:
    return settings.model_copy(
        update={
            "rpc_endpoints": json.dumps(list(endpoints)),
            "rpc_retry_budget_s": 4.0,
            "rpc_max_attempts": 2,
            "rpc_collect_timeout_s": 10.0,
            "rpc_timeout_s": 2.0,
        }
    )


@pytest.fixture(scope="module")
def clean(devnet: Devnet) -> dict[str, pa.Table]:
    """RANGES extracted straight from the devnet, without limits."""
    client = ChainClient(devnet.url, CHAIN_ID)
    try:
        data = [client.extract_range(r) for r in RANGES]
    finally:
        client.close()
    return {
        name: pa.concat_tables([d.tables[name] for d in data]).sort_by(SORT_KEYS[name])
        for name in RAW_DATASETS
    }


def assert_committed_equal(
    state: StateStoreResource,
    objects: ObjectStoreResource,
    clean: dict[str, pa.Table],
    ranges: list[BlockRange],
) -> None:
    reader = state.reader(objects)
    for name in RAW_DATASETS:
        current = state.versions().read.current_versions(name)
        assert sorted(current) == [r.key for r in ranges], name
        expected = clean[name].filter(
            pa.compute.less_equal(clean[name]["block_number"], ranges[-1].last)
        )
        committed = reader.read(name).sort_by(SORT_KEYS[name])
        assert committed.num_rows == expected.num_rows > 0, name
        assert committed.equals(expected, check_metadata=False), name


def test_rows_through_a_limited_endpoint_equal_the_open_node_within_its_limits(
    devnet: Devnet,
    test_settings: Settings,
    objects: ObjectStoreResource,
    state: StateStoreResource,
    clean: dict[str, pa.Table],
) -> None:
    with ProviderProxy(devnet.url, LIMITS) as proxy:
        settings = with_endpoints(test_settings, {"url": proxy.url, "name": "slow", **PROFILE})
        result, _ = materialize_keys(settings, [RANGES[0].key])
        stats = proxy.stats()

    assert result.success, failure_description(result)
    assert_committed_equal(state, objects, clean, RANGES[:1])
    # the endpoint served the whole extraction and never had to refuse anything
    assert stats.calls["eth_getLogs"] >= RANGES[0].size // 10
    assert stats.calls["eth_getBlockReceipts"] >= RANGES[0].size
    assert stats.refused == {}, stats.refused
    assert stats.max_rps <= 25, stats.max_rps
    assert stats.max_batch <= 10, stats.max_batch
    assert stats.max_logs_range <= 10, stats.max_logs_range
    assert stats.max_concurrent <= 4, stats.max_concurrent
    assert not any(m.startswith("debug_") for m in stats.calls)
    # cryo's calls went through the batching relay: a few calls per HTTP request
    assert stats.http_requests * 3 < sum(stats.calls.values()), stats


def _receipt_blocks(proxy: ProviderProxy) -> set[int]:
    """The blocks whose receipts `proxy` was asked for, inside RANGES (the probe asks too)."""
    return {
        n
        for r in proxy.requests
        if r.method == "eth_getBlockReceipts"
        for n in [int(r.params[0], 16)]
        if RANGES[0].start <= n <= RANGES[-1].last
    }


def test_a_backfill_spreads_its_ranges_over_healthy_endpoints_within_their_limits(
    devnet: Devnet,
    test_settings: Settings,
    objects: ObjectStoreResource,
    state: StateStoreResource,
    clean: dict[str, pa.Table],
) -> None:
    with ProviderProxy(devnet.url, LIMITS) as a, ProviderProxy(devnet.url, LIMITS) as b:
        settings = with_endpoints(
            test_settings,
            {"url": a.url, "name": "a", **PROFILE},
            {"url": b.url, "name": "b", **PROFILE},
        )
        result, _ = materialize_keys(settings, [r.key for r in RANGES])
        stats = {"a": a.stats(), "b": b.stats()}
        served = {"a": _receipt_blocks(a), "b": _receipt_blocks(b)}

    assert result.success, failure_description(result)
    assert_committed_equal(state, objects, clean, RANGES)
    # one range from each endpoint, each range's receipts from one endpoint alone
    assert sorted(served.values(), key=min) == [set(r.blocks()) for r in RANGES], served
    for name, seen in stats.items():
        assert seen.refused == {}, (name, seen.refused)
        assert seen.max_rps <= 25, (name, seen.max_rps)
        assert seen.max_batch <= 10, (name, seen.max_batch)
        assert seen.max_logs_range <= 10, (name, seen.max_logs_range)
        assert seen.max_concurrent <= 4, (name, seen.max_concurrent)


def test_each_endpoint_is_verified_with_the_checks_it_allows(devnet: Devnet) -> None:
    """A range extracted at the second endpoint, which does not serve raw transactions, is
    verified with what that endpoint allows (the first one allows more)."""
    raw = "eth_getRawTransactionByBlockNumberAndIndex"
    with ProviderProxy(devnet.url, ProviderLimits(disabled=(raw,))) as b:
        endpoints = [RpcEndpoint(url=devnet.url, name="a"), RpcEndpoint(url=b.url, name="b")]
        client = ChainClient(
            devnet.url, CHAIN_ID, endpoints=endpoints, verify_transactions_root=True
        )
        try:
            data = client.extract_verified(RANGES[0], endpoint=1)
            checks = [client.node_checks(0), client.node_checks(1)]
        finally:
            client.close()
        served = b.stats().calls
    assert data.endpoint == "b" and data.source["endpoint"] == "b"
    assert data.tables["blocks"].num_rows == RANGES[0].size
    assert served["eth_getBlockByNumber"] >= RANGES[0].size
    assert checks[0]["transactions_root"].possible
    assert not checks[1]["transactions_root"].possible
    assert "refuses it" in checks[1]["transactions_root"].detail


def test_a_backfill_fails_over_to_the_next_endpoint_and_completes(
    devnet: Devnet,
    test_settings: Settings,
    objects: ObjectStoreResource,
    state: StateStoreResource,
    clean: dict[str, pa.Table],
) -> None:
    # the first endpoint starts failing every call (HTTP 503) while it extracts the first range
    failing = Fault(kind="http_5xx", status=503, after=100)
    with ProviderProxy(devnet.url, faults=[failing]) as first, ProviderProxy(devnet.url) as second:
        settings = with_endpoints(
            test_settings,
            {"url": first.url, "name": "first"},
            {"url": second.url, "name": "second"},
        )
        result, instance = materialize_keys(settings, [r.key for r in RANGES])
        served_first = first.method_counts(faulted=False)
        served_second = _receipt_blocks(second)

    assert result.success, failure_description(result)
    assert failing.injected > 0
    # the first range was begun at the first endpoint; both ranges came from the second one
    assert served_first["eth_getBlockByNumber"] > 0
    assert served_second == {n for r in RANGES for n in r.blocks()}
    assert step_attempts(result, instance).restarts == 0
    assert_committed_equal(state, objects, clean, RANGES)


def test_an_endpoint_refusing_connections_is_left_for_the_next(
    devnet: Devnet,
    test_settings: Settings,
    objects: ObjectStoreResource,
    state: StateStoreResource,
    clean: dict[str, pa.Table],
) -> None:
    with ProviderProxy(devnet.url) as dead, ProviderProxy(devnet.url) as second:
        dead_url = dead.url
        dead.stop()  # nothing listens there any more: connections are refused
        profiles = [{"url": dead_url, "name": "dead"}, {"url": second.url, "name": "second"}]
        result, instance = materialize_keys(
            with_endpoints(test_settings, *profiles), [RANGES[0].key]
        )
        served = second.stats().calls

    assert result.success, failure_description(result)
    assert served["eth_getBlockReceipts"] >= RANGES[0].size
    assert step_attempts(result, instance).restarts == 0
    assert_committed_equal(state, objects, clean, RANGES[:1])


def test_endpoints_disagreeing_on_a_finalized_hash_stop_the_range(
    devnet: Devnet, test_settings: Settings, state: StateStoreResource
) -> None:
    forged = "0x" + "ab" * 32
    block = RANGES[0].last
    with (
        ProviderProxy(devnet.url) as honest,
        ProviderProxy(devnet.url, rewrite_hashes={block: forged}) as forking,
    ):
        settings = with_endpoints(
            test_settings, {"url": honest.url, "name": "a"}, {"url": forking.url, "name": "b"}
        )
        result, instance = materialize_keys(settings, [RANGES[0].key])

    assert not result.success
    message = failure_description(result)
    assert message.startswith("ForkMismatchError: "), message
    real = devnet.node.rpc("eth_getBlockByNumber", [hex(block), False])["hash"]
    assert f"block {block} has hash {real} at endpoint a but {forged} at endpoint b" in message
    # a fork is not retried, and nothing of the range is committed
    assert step_attempts(result, instance).restarts == 0
    for name in RAW_DATASETS:
        assert state.versions().read.current_versions(name) == {}, name


def probe(
    endpoints: list[dict[str, Any]],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> tuple[int, str, str]:
    """`trace rpc probe` through the command's entry point, in this process."""
    monkeypatch.setenv("TRACE_RPC_ENDPOINTS", json.dumps(endpoints))
    monkeypatch.setenv("TRACE_CHAIN_ID", str(CHAIN_ID))
    code = main(["rpc", "probe"])
    out, err = capsys.readouterr()
    return code, out, err


def test_rpc_probe_says_what_each_endpoint_serves(
    devnet: Devnet, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    limits = ProviderLimits(latency_s=0.01, max_batch=10, max_logs_range=100, disabled=("debug",))
    with ProviderProxy(devnet.url, limits) as proxy:
        endpoints = [{"url": proxy.url, "name": "provider"}, {"url": devnet.url, "name": "node"}]
        code, out, err = probe(endpoints, monkeypatch, capsys)
    assert code == 0, err
    provider, node = out.split("endpoint node:")
    assert f"endpoint provider: chain {CHAIN_ID}, latest " in provider
    assert f"finalized {devnet.finalized}" in provider
    assert "batches          up to 10 calls" in provider
    assert "eth_getLogs      up to 100 blocks per call" in provider
    assert "eth_getBlockReceipts       yes" in provider
    assert "debug_traceBlockByNumber   no (-32601: the method debug_traceBlockByNumber" in provider
    assert "debug_traceBlockByNumber   yes" in node
    assert "batches          up to 1000 calls" in node

    # a bad profile, and an endpoint that does not answer: one line each, exit code 2
    code, out, err = probe([{"url": devnet.url, "rps": 25}], monkeypatch, capsys)
    assert code == 2 and out == "" and err.count("\n") == 1, err
    assert "TRACE_RPC_ENDPOINTS: endpoint 1: rps: Extra inputs are not permitted" in err
    code, out, err = probe([{"url": "http://127.0.0.1:9", "name": "x"}], monkeypatch, capsys)
    assert code == 2 and out == "endpoint x: unreachable\n"
    assert err.startswith("trace: endpoint x did not answer: ") and err.count("\n") == 1, err
