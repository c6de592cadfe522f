"""The provider proxy (infra/local/rpc_provider.py) refuses what a limited provider refuses,
answers like one, and counts what it saw; Trace's own JSON-RPC client stays within the limits."""

from __future__ import annotations

import threading

import httpx

from infra.local.fault_proxy import Fault
from infra.local.rpc_provider import ProviderLimits, ProviderProxy
from tests.conftest import Devnet
from trace_resources.chain.endpoints import DEFAULT_LOGS_RANGE, Budget
from trace_resources.chain.relay import BatchingRelay
from trace_resources.chain.rpc import JsonRpcClient, RetryPolicy
from trace_resources.settings import RpcEndpoint


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


def test_the_proxy_can_refuse_excess_like_providers_that_answer_32005(devnet: Devnet) -> None:
    limits = ProviderLimits(requests_per_second=1, rate_refusal="jsonrpc")
    with ProviderProxy(devnet.url, limits) as proxy:
        assert post(proxy.url, call("eth_chainId", [])).json()["result"] == hex(10143)
        refused = post(proxy.url, [call("eth_chainId", [], 7)])
        stats = proxy.stats()
    assert refused.status_code == 200
    assert refused.json() == [
        {"jsonrpc": "2.0", "id": 7, "error": {"code": -32005, "message": "limit exceeded"}}
    ]
    assert stats.refused == {"rate": 1}


def test_an_endpoint_s_budget_is_shared_between_trace_s_calls_and_cryo_s() -> None:
    """The split `trace_resources/chain/endpoints.py` makes (the proxy tests above and
    tests/assets/test_provider.py check that the sum stays within the endpoint's limits)."""
    limited = Budget(
        RpcEndpoint(
            url="http://x",
            requests_per_second=25,
            max_batch=100,
            max_concurrent_requests=8,
            max_logs_range=10,
        )
    )
    # batches taken: cryo's calls go through the batching relay, which gets the rate Trace's
    # own (batched) calls leave, less one; cryo keeps a batch's worth of calls waiting
    assert limited.relayed and not limited.sequential_collects
    assert limited.own_rps == 7 and limited.relay_rps == 17
    assert limited.own_concurrency == 1 and limited.relay_concurrency == 7
    assert limited.cryo_kwargs("logs") == {"max_concurrent_requests": 100, "inner_request_size": 10}
    assert limited.cryo_kwargs("blocks") == {"max_concurrent_requests": 100}
    # 20 requests/s without batches (one call per block for Trace too): a quarter for Trace;
    # two ranges collected at once share the rest
    unbatched = Budget(RpcEndpoint(url="http://x", requests_per_second=20, max_batch=1), 2)
    assert not unbatched.relayed and unbatched.sequential_collects
    assert unbatched.own_rps == 5
    assert unbatched.cryo_kwargs("blocks") == {
        "max_concurrent_requests": 32,
        "requests_per_second": 5,
    }
    assert unbatched.cryo_kwargs("logs")["inner_request_size"] == DEFAULT_LOGS_RANGE
    # no limits: cryo's settings as before the profiles, its collects at once
    open_ = Budget(RpcEndpoint(url="http://x"))
    assert not open_.sequential_collects and not open_.relayed and open_.own_rps is None
    assert open_.cryo_kwargs("logs") == {"max_concurrent_requests": 32}


def test_the_relay_batches_cryos_calls_and_answers_each_as_the_node_does(devnet: Devnet) -> None:
    """Calls arriving at once, one per HTTP request as cryo sends them, leave the relay as a
    few JSON-RPC batches within the endpoint's limits; each answer is the node's, under the
    caller's own id, a JSON-RPC error included; a failing endpoint fails the calls (HTTP 502),
    never hangs them; closing the relay stops its threads."""
    limits = ProviderLimits(requests_per_second=5, max_batch=20, disabled=("debug",))
    before = {t.ident for t in threading.enumerate()}
    with ProviderProxy(devnet.url, limits) as proxy:
        once = RetryPolicy(max_attempts=2, budget_s=3.0)
        upstream = JsonRpcClient(proxy.url, retry=once, requests_per_second=4, max_batch=20)
        with upstream, BatchingRelay(upstream, max_batch=20) as relay:
            answers: dict[int, httpx.Response] = {}

            def ask(n: int) -> None:
                method = "debug_traceBlockByNumber" if n == 0 else "eth_getBlockByNumber"
                answers[n] = post(relay.url, call(method, [hex(n), False], 1000 + n))

            threads = [threading.Thread(target=ask, args=(n,)) for n in range(40)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            direct = {
                n: post(devnet.url, call("eth_getBlockByNumber", [hex(n), False])) for n in (1, 39)
            }
            stats = proxy.stats()
            assert relay.calls == 40 and relay.batches < 10, (relay.calls, relay.batches)
            assert stats.refused == {"method": 1}  # the debug_* call, refused by the node
            assert stats.max_rps <= 5 and stats.max_batch <= 20
            assert answers[0].json()["error"]["code"] == -32601  # the node's refusal, passed on
            assert answers[0].json()["id"] == 1000
            for n in (1, 39):
                assert answers[n].json() == {**direct[n].json(), "id": 1000 + n}

            proxy.set_faults([Fault("http_5xx", status=503)])
            failed = post(relay.url, call("eth_chainId", [], 7))
            assert failed.status_code == 502 and "503" in failed.text
    assert {t.ident for t in threading.enumerate()} <= before | {None}
