"""A loopback JSON-RPC provider: the devnet behind the limits a public Monad endpoint has.

`ProviderProxy` is a `FaultProxy` (same faults, same request log) that also enforces, as
configured in `ProviderLimits`, what public providers enforce:

* one-way latency (each request waits ``latency_s`` on its way in and its answer on its way
  out, per connection, like a distant node);
* a requests-per-second limit over a sliding one-second window (an HTTP request counts once,
  a batch included); an excess request is answered HTTP 429 with ``Retry-After``, or, with
  ``rate_refusal="jsonrpc"``, HTTP 200 and JSON-RPC error -32005 "limit exceeded";
* a maximum number of requests in flight at once (the excess is answered like the rate limit);
* a maximum JSON-RPC batch size (a larger batch is answered with one JSON-RPC error -32600);
* a maximum ``eth_getLogs`` block range (error -32602 "block range too large");
* unsupported methods or namespaces (``debug``, ``trace``, or full method names): error
  -32601 "method not found";
* optionally, a rewritten block hash (``rewrite_hashes``): the block's ``hash`` and its
  child's ``parentHash`` as another fork would have them, for fork-safety tests.

It counts what it saw (`ProviderStats`): calls per method, the most HTTP requests that arrived
within any one second, the largest batch, the widest ``eth_getLogs`` range, the most requests
in flight, and refusals by kind, so a test can assert that a client stayed within the limits.

    with ProviderProxy(anvil_url, ProviderLimits(latency_s=0.03, requests_per_second=25,
                                                 max_batch=100, disabled=("debug",))) as p:
        ... # point Trace at p.url
        assert p.stats().refused == {} and p.stats().max_rps <= 25

`python -m infra.local.rpc_provider UPSTREAM_URL --rps 25 --latency-ms 30` serves one on a
free port until interrupted (for `make dev` or a benchmark by hand).
"""

from __future__ import annotations

import argparse
import json
import threading
import time
from collections import Counter, deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from infra.local.fault_proxy import Fault, FaultProxy

__all__ = ["ProviderLimits", "ProviderProxy", "ProviderStats"]

Refusal = tuple[int, bytes, str, dict[str, str]]


@dataclass(frozen=True)
class ProviderLimits:
    """What the endpoint enforces; ``None`` (or empty) means no limit."""

    latency_s: float = 0.0  # one way: added before the request is handled and before the answer
    requests_per_second: int | None = None
    max_concurrent: int | None = None
    max_batch: int | None = None
    max_logs_range: int | None = None  # blocks per eth_getLogs call (to - from + 1)
    disabled: Iterable[str] = ()  # namespaces ("debug") or methods ("eth_getBlockReceipts")
    rate_refusal: Literal["http_429", "jsonrpc"] = "http_429"
    retry_after_s: int = 1

    def __post_init__(self) -> None:
        object.__setattr__(self, "disabled", frozenset(self.disabled))
        for name in ("requests_per_second", "max_concurrent", "max_batch", "max_logs_range"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"ProviderLimits.{name} must be at least 1, got {value}")
        if self.latency_s < 0:
            raise ValueError(f"ProviderLimits.latency_s must not be negative: {self.latency_s}")

    def serves(self, method: str) -> bool:
        disabled: frozenset[str] = self.disabled  # type: ignore[assignment]
        return method not in disabled and method.split("_", 1)[0] not in disabled


@dataclass(frozen=True)
class ProviderStats:
    """What the endpoint saw since it started (or `reset`)."""

    http_requests: int
    calls: Counter[str]  # JSON-RPC calls per method, refused ones included
    max_rps: int  # most HTTP requests that arrived within any one second
    max_batch: int  # largest JSON-RPC batch (a single call counts as 1)
    max_logs_range: int  # widest eth_getLogs range asked, in blocks
    max_concurrent: int  # most HTTP requests in flight at once
    refused: Counter[str] = field(default_factory=Counter)  # by kind: rate, concurrency, ...


def _rpc_error(code: int, message: str) -> dict[str, Any]:
    return {"jsonrpc": "2.0", "id": None, "error": {"code": code, "message": message}}


def _int(value: Any) -> int | None:
    if isinstance(value, int):
        return value
    if isinstance(value, str) and value.startswith("0x"):
        return int(value, 16)
    return None


def _logs_range(call: Any) -> int | None:
    """Blocks an eth_getLogs call spans (None: not numeric, e.g. `latest` or a block hash)."""
    params = call.get("params") if isinstance(call, dict) else None
    if not isinstance(params, list) or not params or not isinstance(params[0], dict):
        return None
    lo, hi = _int(params[0].get("fromBlock")), _int(params[0].get("toBlock"))
    return None if lo is None or hi is None else hi - lo + 1


class ProviderProxy(FaultProxy):
    """A `FaultProxy` with a provider's limits and counters (see the module docstring)."""

    def __init__(
        self,
        upstream_url: str,
        limits: ProviderLimits | None = None,
        faults: Sequence[Fault] = (),
        *,
        rewrite_hashes: Mapping[int, str] | None = None,
        upstream_timeout: float = 30.0,
    ) -> None:
        super().__init__(upstream_url, faults, upstream_timeout=upstream_timeout)
        self.limits = limits or ProviderLimits()
        self._limits_lock = threading.Lock()
        self._rewrite_hashes: dict[int, str] = dict(rewrite_hashes or {})
        self._holding = threading.local()  # whether this handler thread holds a request slot
        self._reset_stats()

    def _reset_stats(self) -> None:
        with self._limits_lock:
            self._arrivals: deque[float] = deque()  # every HTTP request in the last second
            self._admitted: deque[float] = deque()  # admitted ones, for the rate limit
            self._http_requests = 0
            self._calls: Counter[str] = Counter()
            self._max_rps = 0
            self._max_batch = 0
            self._max_logs_range = 0
            self._refused: Counter[str] = Counter()
            self._active = getattr(self, "_active", 0)  # admitted, not yet answered
            self._max_active = self._active

    def reset(self) -> None:
        super().reset()
        self._reset_stats()

    def set_limits(self, limits: ProviderLimits) -> None:
        self.limits = limits

    def set_rewrite_hashes(self, hashes: Mapping[int, str]) -> None:
        with self._limits_lock:
            self._rewrite_hashes = dict(hashes)

    def stats(self) -> ProviderStats:
        with self._limits_lock:
            return ProviderStats(
                http_requests=self._http_requests,
                calls=Counter(self._calls),
                max_rps=self._max_rps,
                max_batch=self._max_batch,
                max_logs_range=self._max_logs_range,
                max_concurrent=self._max_active,
                refused=Counter(self._refused),
            )

    # -- the hooks FaultProxy calls ------------------------------------------------------

    def _after_request(self) -> None:
        if self.limits.latency_s:
            self._stopping.wait(self.limits.latency_s)

    def _before_answer(self) -> None:
        # the request is done once its answer starts on its way (the client may send its next
        # one before this handler thread has finished writing)
        self._release_slot()
        if self.limits.latency_s:
            self._stopping.wait(self.limits.latency_s)

    def _leave(self) -> None:
        self._release_slot()  # a request dropped without an answer
        super()._leave()

    def _release_slot(self) -> None:
        if getattr(self._holding, "slot", False):
            self._holding.slot = False
            with self._limits_lock:
                self._active -= 1

    def _admit(
        self, calls: list[Any], is_batch: bool
    ) -> tuple[Refusal | None, list[dict[str, Any] | None]]:
        limits = self.limits
        now = time.monotonic()
        with self._limits_lock:
            self._http_requests += 1
            self._arrivals.append(now)
            while self._arrivals and self._arrivals[0] <= now - 1.0:
                self._arrivals.popleft()
            self._max_rps = max(self._max_rps, len(self._arrivals))
            self._max_batch = max(self._max_batch, len(calls))
            for call in calls:
                method = call.get("method", "") if isinstance(call, dict) else ""
                self._calls[method] += 1
                if method == "eth_getLogs":
                    self._max_logs_range = max(self._max_logs_range, _logs_range(call) or 0)

            # every request counts against the rate, refused ones included
            if limits.requests_per_second is not None:
                while self._admitted and self._admitted[0] <= now - 1.0:
                    self._admitted.popleft()
                if len(self._admitted) >= limits.requests_per_second:
                    return self._refuse_rate("rate", calls, is_batch)
                self._admitted.append(now)
            if limits.max_concurrent is not None and self._active >= limits.max_concurrent:
                return self._refuse_rate("concurrency", calls, is_batch)
            self._active += 1
            self._max_active = max(self._max_active, self._active)
            self._holding.slot = True
            if limits.max_batch is not None and is_batch and len(calls) > limits.max_batch:
                return self._refuse(
                    "batch_size",
                    400,
                    _rpc_error(
                        -32600,
                        f"batch of {len(calls)} requests exceeds the limit of {limits.max_batch}",
                    ),
                    calls,
                )
            return None, [self._call_error(call) for call in calls]

    def _call_error(self, call: Any) -> dict[str, Any] | None:
        """Under the lock: the error a limited endpoint gives this call instead of an answer."""
        method = call.get("method", "") if isinstance(call, dict) else ""
        if not self.limits.serves(method):
            self._refused["method"] += 1
            return _rpc_error(-32601, f"the method {method} does not exist/is not available")
        if method == "eth_getLogs" and self.limits.max_logs_range is not None:
            span = _logs_range(call)
            if span is not None and span > self.limits.max_logs_range:
                self._refused["logs_range"] += 1
                return _rpc_error(
                    -32602,
                    f"block range too large: {span} blocks, the limit is "
                    f"{self.limits.max_logs_range}",
                )
        return None

    def _refuse(
        self, kind: str, status: int, error: dict[str, Any], calls: list[Any]
    ) -> tuple[Refusal, list[dict[str, Any] | None]]:
        self._refused[kind] += 1
        return (status, json.dumps(error).encode(), "application/json", {}), [None] * len(calls)

    def _refuse_rate(
        self, kind: str, calls: list[Any], is_batch: bool
    ) -> tuple[Refusal, list[dict[str, Any] | None]]:
        self._refused[kind] += 1
        if self.limits.rate_refusal == "jsonrpc":
            answers = [
                {**_rpc_error(-32005, "limit exceeded"), "id": c.get("id")}
                for c in calls
                if isinstance(c, dict)
            ]
            body = json.dumps(answers if is_batch else answers[0]).encode()
            return (200, body, "application/json", {}), [None] * len(calls)
        body = json.dumps({**_rpc_error(429, "Too Many Requests")}).encode()
        headers = {"Retry-After": str(self.limits.retry_after_s)}
        return (429, body, "application/json", headers), [None] * len(calls)

    def _rewrite(self, call: Any, answer: dict[str, Any]) -> dict[str, Any]:
        with self._limits_lock:
            hashes = self._rewrite_hashes
        method = call.get("method", "") if isinstance(call, dict) else ""
        result = answer.get("result")
        if not hashes or not isinstance(result, dict):
            return answer
        if method not in ("eth_getBlockByNumber", "eth_getBlockByHash"):
            return answer
        number = _int(result.get("number"))
        if number is None or (number not in hashes and number - 1 not in hashes):
            return answer
        result = dict(result)
        if number in hashes:
            result["hash"] = hashes[number]
        if number - 1 in hashes:
            result["parentHash"] = hashes[number - 1]
        return {**answer, "result": result}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="a JSON-RPC provider proxy on loopback")
    parser.add_argument("upstream", help="the node's URL, e.g. http://127.0.0.1:18545")
    parser.add_argument("--latency-ms", type=float, default=30.0, help="one-way latency")
    parser.add_argument("--rps", type=int, default=25, help="requests per second")
    parser.add_argument("--batch", type=int, default=100, help="largest JSON-RPC batch")
    parser.add_argument("--logs-range", type=int, default=1000, help="largest eth_getLogs range")
    parser.add_argument("--disable", action="append", default=[], help="namespace, e.g. debug")
    parser.add_argument(
        "--stats-on-exit",
        action="store_true",
        help="on Ctrl-C, print what the endpoint saw as one JSON line (for the benchmarks)",
    )
    args = parser.parse_args(argv)
    limits = ProviderLimits(
        latency_s=args.latency_ms / 1000,
        requests_per_second=args.rps,
        max_batch=args.batch,
        max_logs_range=args.logs_range,
        disabled=args.disable,
    )
    with ProviderProxy(args.upstream, limits) as proxy:
        print(f"provider proxy {proxy.url} -> {args.upstream}: {limits}", flush=True)
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass
        if args.stats_on_exit:
            seen = proxy.stats()
            fields = ("http_requests", "max_rps", "max_batch", "refused", "calls")
            print(json.dumps({f: getattr(seen, f) for f in fields}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
