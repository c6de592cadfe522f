"""Tests for tests/utils/fault_proxy.py, and a characterization of cryo 0.3.2 under RPC faults.

The cryo tests pin down *measured* behaviour of ``cryo.collect`` (cryo 0.3.2, which uses
ethers-providers 2.0.10 ``RetryClient<Http>`` + ``HttpRateLimitRetryPolicy``).  If cryo is
upgraded and one of them fails, the retry/verification layer in Trace must be revisited.

A local anvil is started once per module (ports 29000-29999) with 10 blocks holding a known
number of transactions and logs.
"""

from __future__ import annotations

import asyncio
import random
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cryo  # type: ignore[import-untyped]
import httpx
import polars as pl
import pytest

from tests.utils.fault_proxy import Fault, FaultProxy

ANVIL = Path(__file__).resolve().parents[2] / "node_modules/@foundry-rs/anvil-linux-amd64/bin/anvil"
# init code: MSTORE(0, 42); LOG1(mem[0:32], topic0=1); STOP  -> one log per deployment
LOG_INIT_CODE = "0x602a600052600160206000a100"
N_BLOCKS = 10
RANGE = f"1:{N_BLOCKS + 1}"  # cryo "a:b" is end-EXCLUSIVE -> blocks 1..10

pytestmark = pytest.mark.skipif(not ANVIL.exists(), reason="anvil binary not installed")


def _rpc(url: str, method: str, params: list[Any] | None = None) -> Any:
    with httpx.Client(timeout=10) as client:
        body = client.post(
            url, json={"jsonrpc": "2.0", "id": 1, "method": method, "params": params or []}
        ).json()
    if "error" in body:
        raise RuntimeError(body["error"])
    return body["result"]


def _free_port() -> int:
    for port in random.sample(range(29000, 30000), 50):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port in 29000-29999")


class Chain:
    def __init__(self, url: str, txs: dict[int, int], logs: dict[int, int]) -> None:
        self.url = url
        self.txs = txs  # block number -> number of transactions
        self.logs = logs  # block number -> number of logs


@pytest.fixture(scope="module")
def chain() -> Iterator[Chain]:
    proc = None
    for _ in range(3):
        port = _free_port()
        proc = subprocess.Popen(
            [
                str(ANVIL),
                "--port",
                str(port),
                "--chain-id",
                "10143",
                "--host",
                "127.0.0.1",
                "--silent",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                _rpc(url, "eth_chainId")
                break
            except (httpx.HTTPError, RuntimeError):
                time.sleep(0.05)
        else:
            proc.kill()
            proc.wait()
            continue
        break
    else:
        pytest.fail("could not start anvil")
    assert proc is not None
    try:
        sender = _rpc(url, "eth_accounts")[0]
        _rpc(url, "evm_setAutomine", [False])
        txs, logs = {}, {}
        for n in range(1, N_BLOCKS + 1):
            _rpc(
                url,
                "eth_sendTransaction",
                [
                    {
                        "from": sender,
                        "to": "0x000000000000000000000000000000000000dEaD",
                        "value": hex(10**15),
                    }
                ],
            )
            for _ in range(n % 3):
                _rpc(
                    url,
                    "eth_sendTransaction",
                    [{"from": sender, "data": LOG_INIT_CODE, "gas": hex(100_000)}],
                )
            _rpc(url, "evm_mine")
            txs[n], logs[n] = 1 + n % 3, n % 3
        _rpc(url, "evm_setAutomine", [True])
        assert int(_rpc(url, "eth_blockNumber"), 16) == N_BLOCKS
        yield Chain(url, txs, logs)
    finally:
        proc.kill()
        proc.wait()


@pytest.fixture
def proxy(chain: Chain) -> Iterator[FaultProxy]:
    with FaultProxy(chain.url) as p:
        yield p


def _post(url: str, payload: Any, timeout: float = 5.0) -> httpx.Response:
    with httpx.Client(timeout=timeout) as client:
        return client.post(url, json=payload)


def _call(method: str, params: list[Any], id_: int = 1) -> dict[str, Any]:
    return {"jsonrpc": "2.0", "id": id_, "method": method, "params": params}


def _collect(datatype: str, proxy: FaultProxy, **kwargs: Any) -> pl.DataFrame:
    """``cryo.collect`` minus its event-loop leak (see test_cryo_collect_leaks_event_loop):
    the same Rust entry point, awaited in a loop that ``asyncio.run`` closes."""
    if datatype == "blocks":
        kwargs.setdefault("include_columns", ["all"])
    coro = cryo.async_collect(
        datatype, blocks=[RANGE], rpc=proxy.url, output_format="polars", **kwargs
    )
    return asyncio.run(coro)  # type: ignore[return-value]


def _is_rust_panic(exc: BaseException) -> bool:
    # pyo3_asyncio.RustPanic is not importable from Python; it subclasses Exception directly
    return type(exc).__name__ == "RustPanic" and type(exc).__module__ == "pyo3_asyncio"


def _attempts(proxy: FaultProxy, method: str, block: int) -> list[float]:
    """Times of the calls of ``method`` for a single block."""
    out = []
    for r in proxy.requests:
        if r.method != method:
            continue
        p0 = r.params[0]
        num = p0["fromBlock"] if isinstance(p0, dict) else p0
        if int(num, 16) == block:
            out.append(r.t)
    return out


# ------------------------------------------------------------------------------------------
# the proxy itself
# ------------------------------------------------------------------------------------------


def test_passthrough_single_and_batch_are_logged(proxy: FaultProxy) -> None:
    single = _post(proxy.url, _call("eth_blockNumber", []))
    assert single.status_code == 200 and single.json()["result"] == hex(N_BLOCKS)

    batch = _post(
        proxy.url, [_call("eth_chainId", [], 7), _call("eth_getBlockByNumber", ["0x3", False], 8)]
    )
    answers = {a["id"]: a for a in batch.json()}
    assert answers[7]["result"] == hex(10143)
    assert answers[8]["result"]["number"] == "0x3"

    methods = [(r.method, r.batch, r.fault) for r in proxy.requests]
    assert methods == [
        ("eth_blockNumber", False, None),
        ("eth_chainId", True, None),
        ("eth_getBlockByNumber", True, None),
    ]
    assert proxy.requests[1].seq == proxy.requests[2].seq  # same HTTP request
    assert not proxy.injected
    proxy.reset()
    assert proxy.requests == []


def test_http_429_count_then_pass(proxy: FaultProxy) -> None:
    fault = Fault("http_429", methods={"eth_blockNumber"}, count=2, retry_after=7)
    proxy.set_faults([fault])
    statuses = [_post(proxy.url, _call("eth_blockNumber", [])) for _ in range(3)]
    assert [r.status_code for r in statuses] == [429, 429, 200]
    assert statuses[0].headers["Retry-After"] == "7"
    assert statuses[0].headers["Content-Type"] == "text/plain"
    # other methods are not affected
    assert _post(proxy.url, _call("eth_chainId", [])).status_code == 200
    assert fault.injected == 2 and proxy.injected["http_429"] == 2
    assert [r.fault for r in proxy.requests] == ["http_429", "http_429", None, None]


def test_http_5xx_and_json_body(proxy: FaultProxy) -> None:
    proxy.set_faults(
        [
            Fault("http_5xx", status=502, count=1, json_body=True),
            Fault("http_5xx", status=500, count=1),
        ]
    )
    first = _post(proxy.url, _call("eth_chainId", [], 5))
    assert first.status_code == 502
    assert first.json() == {
        "jsonrpc": "2.0",
        "id": 5,
        "error": {"code": -32603, "message": "HTTP 502"},
    }
    second = _post(proxy.url, _call("eth_chainId", []))
    assert second.status_code == 500 and second.text.startswith("500")
    assert _post(proxy.url, _call("eth_chainId", [])).status_code == 200
    with pytest.raises(ValueError):
        Fault("http_5xx", status=429)


def test_jsonrpc_error_hits_only_matching_batch_element(proxy: FaultProxy) -> None:
    proxy.set_faults(
        [Fault("jsonrpc_error", methods={"eth_getLogs"}, code=-32603, message="internal error")]
    )
    batch = _post(
        proxy.url,
        [
            _call("eth_blockNumber", [], 1),
            _call("eth_getLogs", [{"fromBlock": "0x1", "toBlock": "0x2"}], 2),
        ],
    ).json()
    assert batch[0]["result"] == hex(N_BLOCKS)
    assert batch[1]["error"] == {"code": -32603, "message": "internal error"}
    assert proxy.injected == {"jsonrpc_error": 1}


def test_drop_and_timeout_close_without_answer(proxy: FaultProxy) -> None:
    proxy.set_faults([Fault("drop", count=1), Fault("timeout", count=1, delay=0.5)])
    with pytest.raises(httpx.RemoteProtocolError):
        _post(proxy.url, _call("eth_chainId", []))
    # client timeout shorter than the hold -> client times out
    with pytest.raises(httpx.ReadTimeout):
        _post(proxy.url, _call("eth_chainId", []), timeout=0.2)
    assert _post(proxy.url, _call("eth_chainId", [])).status_code == 200
    assert proxy.injected == {"drop": 1, "timeout": 1}


def test_timeout_hold_ends_after_delay_or_on_stop(chain: Chain) -> None:
    with FaultProxy(chain.url, [Fault("timeout", count=1, delay=0.3)]) as p:
        t0 = time.monotonic()
        with pytest.raises(httpx.RemoteProtocolError):  # closed after the hold
            _post(p.url, _call("eth_chainId", []), timeout=5)
        assert 0.3 <= time.monotonic() - t0 < 2
    p = FaultProxy(chain.url, [Fault("timeout", delay=60)]).start()
    errors: list[BaseException] = []

    def hang() -> None:
        try:
            _post(p.url, _call("eth_chainId", []), timeout=30)
        except httpx.HTTPError as exc:
            errors.append(exc)

    worker = threading.Thread(target=hang)
    worker.start()
    deadline = time.monotonic() + 5
    while not p.requests and time.monotonic() < deadline:
        time.sleep(0.01)
    t0 = time.monotonic()
    p.stop()  # must not wait for the 60 s hold
    worker.join(5)
    assert time.monotonic() - t0 < 3 and not worker.is_alive() and errors


def test_data_faults(proxy: FaultProxy, chain: Chain) -> None:
    proxy.set_faults(
        [
            Fault("missing_block", blocks={2}),
            Fault("missing_logs", blocks={5}),
            Fault("truncate_txs", blocks={8}, drop_txs=2),
        ]
    )
    assert _post(proxy.url, _call("eth_getBlockByNumber", ["0x2", False])).json()["result"] is None
    assert _post(proxy.url, _call("eth_getBlockReceipts", ["0x2"])).json()["result"] is None
    assert _post(proxy.url, _call("eth_getBlockByNumber", ["0x1", False])).json()["result"]

    logs = _post(proxy.url, _call("eth_getLogs", [{"fromBlock": "0x1", "toBlock": "0xa"}]))
    got = [int(lg["blockNumber"], 16) for lg in logs.json()["result"]]
    assert 5 not in got
    assert len(got) == sum(chain.logs.values()) - chain.logs[5]

    blk = _post(proxy.url, _call("eth_getBlockByNumber", ["0x8", True])).json()["result"]
    assert len(blk["transactions"]) == chain.txs[8] - 2
    rcpts = _post(proxy.url, _call("eth_getBlockReceipts", ["0x8"])).json()["result"]
    assert len(rcpts) == chain.txs[8] - 2
    assert proxy.injected == {"missing_block": 2, "missing_logs": 1, "truncate_txs": 2}
    with pytest.raises(ValueError):
        Fault("missing_logs")  # blocks required


def test_after_and_seeded_probability(proxy: FaultProxy) -> None:
    proxy.set_faults([Fault("jsonrpc_error", after=2, count=1)])
    codes = ["error" in _post(proxy.url, _call("eth_chainId", [])).json() for _ in range(4)]
    assert codes == [False, False, True, False]

    def pattern(seed: int) -> list[bool]:
        fault = Fault("jsonrpc_error", probability=0.5, seed=seed)
        proxy.set_faults([fault])
        return ["error" in _post(proxy.url, _call("eth_chainId", [])).json() for _ in range(12)]

    assert pattern(3) == pattern(3)
    assert 0 < sum(pattern(3)) < 12


def test_clean_shutdown_no_leaked_threads_or_socket(chain: Chain) -> None:
    before = set(threading.enumerate())
    p = FaultProxy(chain.url).start()
    url = p.url
    with httpx.Client(timeout=5) as client:  # keep-alive connection stays open
        assert client.post(url, json=_call("eth_chainId", [])).status_code == 200
        p.stop()
        assert set(threading.enumerate()) <= before
    with pytest.raises(httpx.ConnectError):
        _post(url, _call("eth_chainId", []))
    with pytest.raises(RuntimeError):
        _ = p.url
    p.stop()  # idempotent


# ------------------------------------------------------------------------------------------
# cryo 0.3.2 characterization
# ------------------------------------------------------------------------------------------


def test_cryo_collect_leaks_event_loop(proxy: FaultProxy) -> None:
    # cryo.collect() does asyncio.new_event_loop() + set_event_loop() and never closes it:
    # when that loop is garbage-collected Python emits ResourceWarning("unclosed event loop")
    # and unclosed-socket warnings, which pytest's filterwarnings=error turns into errors.
    df = cryo.collect("blocks", blocks=["1:3"], rpc=proxy.url, output_format="polars")
    assert df.height == 2
    loop = asyncio.get_event_loop_policy().get_event_loop()
    assert not loop.is_closed() and not loop.is_running()
    loop.close()  # clean up the leak so it does not fail a later test
    asyncio.set_event_loop(None)


def test_cryo_requests_without_faults(proxy: FaultProxy, chain: Chain) -> None:
    blocks = _collect("blocks", proxy)
    assert sorted(blocks["block_number"]) == list(range(1, N_BLOCKS + 1))  # end-exclusive
    assert proxy.method_counts() == {"eth_chainId": 1, "eth_getBlockByNumber": N_BLOCKS}
    assert proxy.requests[0].method == "eth_chainId"
    assert all(r.params[1] is False for r in proxy.requests[1:])
    assert not any(r.batch for r in proxy.requests)  # cryo never sends JSON-RPC batches

    proxy.reset()
    txs = _collect("transactions", proxy)
    assert txs.height == sum(chain.txs.values())
    assert proxy.method_counts() == {
        "eth_chainId": 1,
        "eth_getBlockByNumber": N_BLOCKS,
        "eth_getBlockReceipts": N_BLOCKS,
    }
    assert all(r.params[1] is True for r in proxy.requests if r.method == "eth_getBlockByNumber")

    proxy.reset()
    logs = _collect("logs", proxy)
    assert logs.height == sum(chain.logs.values())
    assert proxy.method_counts() == {"eth_chainId": 1, "eth_getLogs": N_BLOCKS}
    first = next(r for r in proxy.requests if r.method == "eth_getLogs")
    assert first.params[0]["fromBlock"] == first.params[0]["toBlock"]  # one block per call
    assert first.params[0]["topics"] == []
    assert not any(r.batch for r in proxy.requests)


def test_cryo_retries_only_json_bodies_with_rate_limit_codes(proxy: FaultProxy) -> None:
    # 429 / -32005 / JSON-RPC code 429 are retried after a constant `initial_backoff` (ms)
    proxy.set_faults(
        [
            Fault("http_429", methods={"eth_getLogs"}, blocks={3}, count=2, json_body=True),
            Fault("jsonrpc_error", methods={"eth_getLogs"}, blocks={4}, count=2),  # -32005
            Fault("jsonrpc_error", methods={"eth_getLogs"}, blocks={5}, count=1, code=429),
        ]
    )
    logs = _collect("logs", proxy, initial_backoff=200)
    assert sorted(set(logs["block_number"])) == [1, 2, 4, 5, 7, 8, 10]
    assert proxy.injected == {"http_429": 2, "jsonrpc_error": 3}
    t3 = _attempts(proxy, "eth_getLogs", 3)
    assert len(t3) == 3
    gaps = [b - a for a, b in zip(t3, t3[1:], strict=False)]
    assert all(0.18 < g < 0.6 for g in gaps), gaps  # constant backoff, Retry-After ignored
    assert len(_attempts(proxy, "eth_getLogs", 4)) == 3
    assert len(_attempts(proxy, "eth_getLogs", 5)) == 2


@pytest.mark.parametrize(
    "fault",
    [
        Fault("http_429", methods={"eth_getLogs"}, blocks={4}, count=1),  # text body
        Fault("http_5xx", methods={"eth_getLogs"}, blocks={4}, count=1, status=500),
        Fault("http_5xx", methods={"eth_getLogs"}, blocks={4}, count=1, status=502),
        Fault("http_5xx", methods={"eth_getLogs"}, blocks={4}, count=1, status=503, json_body=True),
        Fault(
            "jsonrpc_error",
            methods={"eth_getLogs"},
            blocks={4},
            count=1,
            code=-32603,
            message="internal error",
        ),
        Fault("drop", methods={"eth_getLogs"}, blocks={4}, count=1),
    ],
    ids=["429-text", "500-text", "502-text", "503-json", "rpc-32603", "drop"],
)
def test_cryo_fails_fast_without_retry(
    proxy: FaultProxy, fault: Fault, capfd: pytest.CaptureFixture[str]
) -> None:
    proxy.set_faults([fault])
    t0 = time.monotonic()
    with pytest.raises(Exception) as excinfo:
        _collect("logs", proxy)
    elapsed = time.monotonic() - t0
    assert _is_rust_panic(excinfo.value), repr(excinfo.value)
    assert str(excinfo.value) == "rust future panicked: unknown error"  # no detail in Python
    assert elapsed < 1.0
    assert fault.injected == 1
    assert len(_attempts(proxy, "eth_getLogs", 4)) == 1  # never retried
    err = capfd.readouterr().err
    assert "panicked at crates/python/rust/collect_adapter.rs" in err
    assert "error collecting ProviderError" in err


def test_cryo_gives_up_after_max_retries(
    proxy: FaultProxy, capfd: pytest.CaptureFixture[str]
) -> None:
    proxy.set_faults([Fault("jsonrpc_error", methods={"eth_getLogs"}, blocks={6})])
    t0 = time.monotonic()
    with pytest.raises(Exception) as excinfo:
        _collect("logs", proxy, max_retries=2, initial_backoff=50)
    assert _is_rust_panic(excinfo.value)
    assert time.monotonic() - t0 < 1.0
    assert len(_attempts(proxy, "eth_getLogs", 6)) == 3  # 1 + max_retries
    assert (
        "error collecting ProviderError(JsonRpcClientError(TimeoutError))" in capfd.readouterr().err
    )


def test_cryo_has_no_client_timeout(proxy: FaultProxy) -> None:
    # cryo waits for the whole hold, then fails (IncompleteMessage) without retrying
    proxy.set_faults([Fault("timeout", methods={"eth_getLogs"}, blocks={2}, count=1, delay=1.5)])
    t0 = time.monotonic()
    with pytest.raises(Exception) as excinfo:
        _collect("logs", proxy)
    assert _is_rust_panic(excinfo.value)
    assert 1.5 <= time.monotonic() - t0 < 3
    assert len(_attempts(proxy, "eth_getLogs", 2)) == 1
    with pytest.raises(TypeError, match="timeout"):
        _collect("logs", proxy, timeout=5)


def test_cryo_fails_on_fault_during_chain_id(
    proxy: FaultProxy, capfd: pytest.CaptureFixture[str]
) -> None:
    proxy.set_faults([Fault("jsonrpc_error", methods={"eth_chainId"}, count=1)])  # -32005
    assert _collect("blocks", proxy).height == N_BLOCKS  # retried
    proxy.set_faults([Fault("http_5xx", methods={"eth_chainId"}, count=1)])
    with pytest.raises(Exception) as excinfo:
        _collect("blocks", proxy)
    assert _is_rust_panic(excinfo.value)
    assert "error parsing opts" in capfd.readouterr().err


def test_cryo_missing_block_is_an_error_and_not_retried(
    proxy: FaultProxy, capfd: pytest.CaptureFixture[str]
) -> None:
    for datatype in ("blocks", "transactions"):
        proxy.reset()
        proxy.set_faults(
            [Fault("missing_block", methods={"eth_getBlockByNumber"}, blocks={5}, count=1)]
        )
        with pytest.raises(Exception) as excinfo:
            _collect(datatype, proxy)
        assert _is_rust_panic(excinfo.value)
        assert len(_attempts(proxy, "eth_getBlockByNumber", 5)) == 1
        assert 'CollectError("block not found")' in capfd.readouterr().err


def test_cryo_missing_block_receipts_falls_back_to_tx_receipts(
    proxy: FaultProxy, chain: Chain
) -> None:
    proxy.set_faults([Fault("missing_block", methods={"eth_getBlockReceipts"}, blocks={5})])
    txs = _collect("transactions", proxy)
    assert txs.height == sum(chain.txs.values())
    assert txs.filter(pl.col("block_number") == 5)["gas_used"].null_count() == 0
    assert proxy.method_counts()["eth_getTransactionReceipt"] == chain.txs[5]


def test_cryo_silently_returns_fewer_rows_on_missing_logs(proxy: FaultProxy, chain: Chain) -> None:
    proxy.set_faults([Fault("missing_logs", blocks={5})])
    logs = _collect("logs", proxy)
    assert proxy.injected == {"missing_logs": 1}
    assert logs.height == sum(chain.logs.values()) - chain.logs[5]  # no error raised
    assert 5 not in set(logs["block_number"])


@pytest.mark.parametrize("methods", [{"eth_getBlockByNumber"}, {"eth_getBlockReceipts"}])
def test_cryo_silently_returns_fewer_rows_on_truncated_txs(
    proxy: FaultProxy, chain: Chain, methods: set[str]
) -> None:
    proxy.set_faults([Fault("truncate_txs", methods=methods, blocks={5})])
    txs = _collect("transactions", proxy)
    assert proxy.injected == {"truncate_txs": 1}
    assert txs.height == sum(chain.txs.values()) - 1  # no error raised
    assert txs.filter(pl.col("block_number") == 5).height == chain.txs[5] - 1


def test_cryo_concurrency_and_rate_limit_kwargs(proxy: FaultProxy) -> None:
    _collect("logs", proxy)
    assert proxy.max_in_flight > 1
    proxy.reset()
    _collect("logs", proxy, max_concurrent_requests=1)
    assert proxy.max_in_flight == 1
    proxy.reset()
    _collect("logs", proxy, requests_per_second=20)
    times = [r.t for r in proxy.requests if r.method == "eth_getLogs"]
    # governor quota: 20/s with burst 1 -> ~50 ms spacing
    assert times[-1] - times[0] >= 0.9 * (N_BLOCKS - 1) / 20
