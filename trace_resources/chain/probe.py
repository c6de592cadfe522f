"""What an endpoint serves and how fast it answers (`trace rpc probe`).

Each probe is a handful of cheap calls, paced by the endpoint's configured rate limit: the
chain id and head, the median latency of a few `eth_blockNumber` calls, the largest JSON-RPC
batch and `eth_getLogs` range it accepts (tried in growing or shrinking steps), and whether it
serves `eth_getBlockReceipts` and `debug_traceBlockByNumber` (with the callTracer and an
explicit options object, as Monad requires).
"""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from trace_resources.chain.rpc import JsonRpcClient, JsonRpcError, RetryPolicy
from trace_resources.errors import ChainError
from trace_resources.settings import RpcEndpoint

__all__ = ["ProbeResult", "probe_endpoint"]

BATCH_SIZES = (2, 10, 100, 1000)
LOGS_RANGES = (10_000, 1_000, 100, 10, 1)
LATENCY_CALLS = 5
CALL_TRACER = {"tracer": "callTracer", "tracerConfig": {"onlyTopCall": False}, "timeout": "10s"}


@dataclass
class ProbeResult:
    endpoint: str
    chain_id: int | None = None
    latest: int | None = None
    finalized: int | None = None
    latency_ms: float | None = None
    max_batch: int | None = None  # largest batch accepted among BATCH_SIZES (1: none)
    max_logs_range: int | None = None  # largest eth_getLogs range accepted among LOGS_RANGES
    methods: dict[str, str] = field(default_factory=dict)  # method: "yes" or why not
    error: str | None = None  # the endpoint did not answer the basic calls

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _why_not(exc: Exception) -> str:
    cause = exc.__cause__ if isinstance(exc.__cause__, JsonRpcError) else exc
    if isinstance(cause, JsonRpcError):
        return f"no ({cause.code}: {str(cause).split(': ', 2)[-1]})"
    return f"no ({type(exc).__name__})"


def probe_endpoint(endpoint: RpcEndpoint, *, timeout_s: float = 10.0) -> ProbeResult:
    """Probe one endpoint; an endpoint that does not answer gives a result with `error`."""
    result = ProbeResult(endpoint=endpoint.label)
    once = RetryPolicy(max_attempts=1, budget_s=timeout_s)
    with JsonRpcClient(
        endpoint.url,
        timeout_s=timeout_s,
        retry=once,  # a probe says what it found, it does not wait for an endpoint to recover
        requests_per_second=endpoint.requests_per_second,
        max_batch=1,  # one call per request until batches are known to work
    ) as rpc:
        try:
            result.chain_id = int(rpc.call("eth_chainId"), 16)
            result.latest = int(rpc.call("eth_getBlockByNumber", ["latest", False])["number"], 16)
            final = rpc.call("eth_getBlockByNumber", ["finalized", False])
            result.finalized = int(final["number"], 16) if final else None
        except ChainError as exc:
            result.error = str(exc)
            return result
        result.latency_ms = _latency_ms(rpc)
        result.max_batch = _largest_batch(rpc, once)
        head = result.finalized if result.finalized is not None else result.latest
        result.max_logs_range = _largest_logs_range(rpc, head, once)
        for method, params in (
            ("eth_getBlockReceipts", [hex(head)]),
            ("debug_traceBlockByNumber", [hex(head), CALL_TRACER]),
        ):
            try:
                rpc.batch(method, [params], retry=once)
                result.methods[method] = "yes"
            except ChainError as exc:
                result.methods[method] = _why_not(exc)
    return result


def _latency_ms(rpc: JsonRpcClient) -> float:
    samples = []
    for _ in range(LATENCY_CALLS):
        started = time.perf_counter()
        rpc.call("eth_blockNumber")
        samples.append((time.perf_counter() - started) * 1000)
    return round(statistics.median(samples), 1)


def _largest_batch(rpc: JsonRpcClient, once: RetryPolicy) -> int:
    largest = 1
    rpc.max_batch = max(BATCH_SIZES)
    try:
        for size in BATCH_SIZES:
            try:
                rpc.batch("eth_chainId", [[] for _ in range(size)], size, retry=once)
            except ChainError:
                break
            largest = size
    finally:
        rpc.max_batch = 1
    return largest


def _largest_logs_range(rpc: JsonRpcClient, head: int, once: RetryPolicy) -> int | None:
    for span in LOGS_RANGES:
        start = max(0, head - span + 1)
        try:
            rpc.batch(
                "eth_getLogs", [[{"fromBlock": hex(start), "toBlock": hex(head)}]], retry=once
            )
        except ChainError:
            continue
        return head - start + 1  # on a short chain, the whole chain
    return None
