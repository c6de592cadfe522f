"""The provider proxy (infra/local/rpc_provider.py) refuses what a limited provider refuses,
answers like one, and counts what it saw; Trace's own JSON-RPC client stays within the limits."""

from __future__ import annotations

import threading

import httpx

from infra.local.rpc_provider import ProviderLimits, ProviderProxy
from tests.conftest import Devnet
from trace_resources.chain.rpc import JsonRpcClient, RetryPolicy


def post(url: str, body: object) -> httpx.Response:
    return httpx.post(url, json=body, timeout=10)


def call(method: str, params: list[object], id_: int = 1) -> dict[str, object]:
    return {"jsonrpc": "2.0", "id": id_, "method": method, "params": params}


def test_the_proxy_refuses_what_a_limited_provider_refuses_and_counts_it(devnet: Devnet) -> None:
    limits = ProviderLimits(
        requests_per_second=4, max_batch=3, max_logs_range=10, disabled=("debug",)
    )
    with ProviderProxy(devnet.url, limits) as proxy:
        # a batch within the limit is answered by the node
        ok = post(proxy.url, [call("eth_chainId", [], i) for i in range(3)])
        assert ok.status_code == 200 and [a["result"] for a in ok.json()] == [hex(10143)] * 3
        # a larger batch is refused as a whole, with a JSON-RPC error saying why
        big = post(proxy.url, [call("eth_chainId", [], i) for i in range(4)])
        assert big.json()["error"]["code"] == -32600
        assert "batch of 4 requests exceeds the limit of 3" in big.json()["error"]["message"]
        # a namespace it does not serve: method not found; a logs range too wide: refused
        debug = post(proxy.url, call("debug_traceBlockByNumber", ["0x1", {"tracer": "x"}]))
        assert debug.json()["error"]["code"] == -32601
        logs = post(proxy.url, call("eth_getLogs", [{"fromBlock": "0x1", "toBlock": "0xb"}]))
        assert logs.json()["error"]["code"] == -32602
        assert "block range too large: 11 blocks" in logs.json()["error"]["message"]
        # the 5th request within a second: HTTP 429 with Retry-After
        too_many = post(proxy.url, call("eth_blockNumber", []))
        assert too_many.status_code == 429 and too_many.headers["Retry-After"] == "1"
        stats = proxy.stats()

    assert stats.http_requests == 5
    assert stats.max_rps == 5 and stats.max_batch == 4 and stats.max_logs_range == 11
    assert stats.refused == {"batch_size": 1, "method": 1, "logs_range": 1, "rate": 1}
    assert stats.calls["eth_chainId"] == 7 and stats.calls["debug_traceBlockByNumber"] == 1


def test_trace_s_client_keeps_to_the_rate_batch_and_concurrency_limits(devnet: Devnet) -> None:
    limits = ProviderLimits(latency_s=0.01, requests_per_second=20, max_batch=4, max_concurrent=2)
    with ProviderProxy(devnet.url, limits) as proxy:
        client = JsonRpcClient(
            proxy.url,
            retry=RetryPolicy(max_attempts=1),
            requests_per_second=20,
            max_concurrent=2,
            max_batch=4,
        )
        with client:

            def counts() -> None:
                numbers = client.batch(
                    "eth_getBlockTransactionCountByNumber", [[hex(n)] for n in range(1, 31)]
                )
                assert len(numbers) == 30 and all(numbers)

            threads = [threading.Thread(target=counts) for _ in range(3)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
        stats = proxy.stats()

    assert stats.calls["eth_getBlockTransactionCountByNumber"] == 90
    assert stats.refused == {}
    assert stats.max_batch <= 4 and stats.max_rps <= 20 and stats.max_concurrent <= 2
