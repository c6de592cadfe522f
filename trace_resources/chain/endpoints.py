"""Several JSON-RPC endpoints with their own limits: budgets, failover, cross-endpoint checks.

A provider limits requests per second, requests in flight, batch sizes and `eth_getLogs`
ranges (`RpcEndpoint` in settings). Trace shares each endpoint's budget between its own
calls and cryo's (`Budget`), spreads the ranges of a run over the healthy endpoints in turn
(`Endpoints.assign`: one range's data always comes from one endpoint, each endpoint collects
at most `parallel` ranges at once, within its own limits), fails over to the next endpoint
when one keeps failing after its retries (`Endpoints.run`; a failed endpoint gets no more
ranges), and never commits a range whose first or last block hash another endpoint disagrees
on (`Endpoints.cross_check`): two endpoints on different forks stop the range with an error
naming the block and both endpoints.

How cryo 0.3.2 behaves behind a limited endpoint, measured through
`infra/local/rpc_provider.py` (30 ms each way): it sends no batches, keeps to its
`requests_per_second` except for one unthrottled `eth_chainId` at the start of each
`collect`, and each `collect` (blocks, transactions, logs) has a limiter of its own, so
collects running at once add up. `inner_request_size` sets the blocks per `eth_getLogs`.
"""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from trace_resources.chain.relay import BatchingRelay
from trace_resources.chain.rpc import JsonRpcClient, RetryPolicy
from trace_resources.errors import (
    ChainContinuityError,
    RpcFaultError,
    RpcRefusedError,
    RpcUnreachableError,
)
from trace_resources.settings import RpcEndpoint

__all__ = ["Budget", "Endpoints", "FailoverRpc", "ForkMismatchError"]

log = logging.getLogger(__name__)

T = TypeVar("T")

# what makes Trace leave an endpoint: it kept failing after its retries, or stopped answering
FAILOVER_ERRORS = (RpcFaultError, RpcUnreachableError)


# blocks per eth_getLogs on a rate-limited endpoint that names no logs range limit (the range
# bare cryo is given in the ingest benchmark's remote profile; providers allow 1,000 or more)
DEFAULT_LOGS_RANGE = 100


class ForkMismatchError(ChainContinuityError):
    """Two endpoints disagree on the hash of a finalized block: they serve different forks."""


@dataclass(frozen=True)
class Budget:
    """One endpoint's limits split between Trace's own calls and cryo's collects.

    `parallel` is how many ranges are collected at once. With a requests-per-second limit,
    the collects of one range run one after another (the node's rate, not concurrency, bounds
    them), each with the rate left after Trace's own share, less one request a second for
    cryo's unthrottled `eth_chainId` and one for jitter; logs are asked for `max_logs_range`
    blocks at a time (`DEFAULT_LOGS_RANGE` on a rate-limited endpoint that names none).
    """

    endpoint: RpcEndpoint
    parallel: int = 1
    default_cryo_concurrency: int = 32  # per collect, for an endpoint without a limit

    @property
    def relayed(self) -> bool:
        """cryo's calls go through a loopback relay that batches them (`relay.py`): on an
        endpoint that limits requests per second and takes batches."""
        return self.endpoint.requests_per_second is not None and self.endpoint.max_batch > 1

    @property
    def sequential_collects(self) -> bool:
        return self.endpoint.requests_per_second is not None and not self.relayed

    @property
    def own_rps(self) -> int | None:
        rps = self.endpoint.requests_per_second
        if rps is None:
            return None
        if self.relayed:
            # batched on both sides: Trace's calls (the headers, one per block; the optional
            # checks' receipts and raw transactions aside) against cryo's three per block
            return max(1, math.ceil(rps / 4))
        # Trace's own calls are one per block (the headers) in batches of max_batch,
        # where cryo makes about three per block: their share of the rate, at least 1/s
        return max(1, math.ceil(rps / (1 + 3 * self.endpoint.max_batch)))

    @property
    def relay_rps(self) -> int:
        """The relay's share of the rate: what Trace's own calls leave, less one for jitter."""
        rps = self.endpoint.requests_per_second or 0
        return max(1, rps - (self.own_rps or 0) - 1)

    @property
    def relay_concurrency(self) -> int | None:
        limit = self.endpoint.max_concurrent_requests
        return None if limit is None else max(1, limit - 1)

    @property
    def own_concurrency(self) -> int | None:
        return None if self.endpoint.max_concurrent_requests is None else 1

    def cryo_kwargs(self, dataset: str) -> dict[str, Any]:
        """The limits to pass to `cryo.collect` for `dataset`."""
        e = self.endpoint
        if self.relayed:
            # the relay keeps the endpoint's limits; cryo keeps a batch's worth of calls waiting
            kwargs: dict[str, Any] = {"max_concurrent_requests": min(e.max_batch, 100)}
            if dataset == "logs":
                kwargs["inner_request_size"] = e.max_logs_range or DEFAULT_LOGS_RANGE
            return kwargs
        collects = self.parallel * (1 if self.sequential_collects else 3)
        kwargs = {"max_concurrent_requests": self.default_cryo_concurrency}
        if e.max_concurrent_requests is not None:
            kwargs["max_concurrent_requests"] = max(1, (e.max_concurrent_requests - 1) // collects)
        if e.requests_per_second is not None:
            # less cryo's unthrottled eth_chainId and one for the network's jitter (cryo's
            # limiter keeps to its rate exactly, measured: no margin of its own)
            left = e.requests_per_second - (self.own_rps or 0)
            kwargs["requests_per_second"] = max(1, left // self.parallel - 2)
        if dataset == "logs" and e.max_logs_range is not None:
            kwargs["inner_request_size"] = e.max_logs_range
        elif dataset == "logs" and e.requests_per_second is not None:
            # cryo asks for one block's logs per request by default: on a rate-limited
            # endpoint, that is a quarter of the requests of a range spent on logs
            kwargs["inner_request_size"] = DEFAULT_LOGS_RANGE
        return kwargs


class Endpoints:
    """The configured endpoints in failover order, one rate-limited client each; a run's
    ranges are assigned to the healthy ones in turn (`assign`)."""

    def __init__(
        self,
        endpoints: Sequence[RpcEndpoint],
        *,
        timeout_s: float,
        retry: RetryPolicy,
        parallel: int = 1,
        default_cryo_concurrency: int = 32,
    ) -> None:
        if not endpoints:
            raise ValueError("at least one endpoint is needed")
        self.budgets = [Budget(e, parallel, default_cryo_concurrency) for e in endpoints]
        self.clients = [
            JsonRpcClient(
                e.url,
                timeout_s=timeout_s,
                retry=retry,
                requests_per_second=b.own_rps,
                max_concurrent=b.own_concurrency,
                max_batch=e.max_batch,
                name=e.label,
            )
            for e, b in zip(endpoints, self.budgets, strict=True)
        ]
        self._timeout_s, self._retry = timeout_s, retry
        self._relays: dict[int, BatchingRelay] = {}
        # each endpoint collects at most `parallel` ranges at once: its budget is split so
        self.collect_slots = [threading.BoundedSemaphore(parallel) for _ in endpoints]
        self._current = 0
        self._failed: set[int] = set()
        self._turn = 0
        self._lock = threading.Lock()

    def cryo_url(self, index: int) -> str:
        """Where cryo sends its calls for endpoint `index`: the endpoint, or its relay."""
        budget = self.budgets[index]
        if not budget.relayed:
            return budget.endpoint.url
        with self._lock:
            relay = self._relays.get(index)
            if relay is None:
                upstream = JsonRpcClient(
                    budget.endpoint.url,
                    timeout_s=max(self._timeout_s, 30.0),  # a batch of full blocks takes longer
                    retry=self._retry,
                    requests_per_second=budget.relay_rps,
                    max_concurrent=budget.relay_concurrency,
                    max_batch=budget.endpoint.max_batch,
                )
                relay = self._relays[index] = BatchingRelay(upstream, budget.endpoint.max_batch)
            return relay.url

    def __len__(self) -> int:
        return len(self.clients)

    @property
    def current(self) -> int:
        return self._current

    def label(self, index: int) -> str:
        return self.budgets[index].endpoint.label

    def close(self) -> None:
        for client in self.clients:
            client.close()
        with self._lock:
            relays, self._relays = list(self._relays.values()), {}
        for relay in relays:
            relay.close()
            relay.upstream.close()

    def rpc(self, index: int) -> JsonRpcClient:
        """Endpoint `index` alone (its own client and limits), named as configured."""
        return self.clients[index]

    def healthy(self) -> list[int]:
        """The endpoints that have not failed (all of them, if every one has)."""
        with self._lock:
            return [i for i in range(len(self.clients)) if i not in self._failed] or [self._current]

    def assign(self) -> int:
        """The endpoint for the next range of a run: the healthy ones in turn, so a run's
        ranges spread over them (each within its own limits)."""
        healthy = self.healthy()
        with self._lock:
            index = healthy[self._turn % len(healthy)]
            self._turn += 1
        return index

    def run(self, operation: Callable[[int], T], prefer: int | None = None) -> T:
        """`operation(endpoint index)` on `prefer` (if it has not failed) or the current
        endpoint; if it keeps failing there (after that endpoint's retries), on the next one,
        until every endpoint was tried."""
        tried: set[int] = set()
        with self._lock:
            index = prefer if prefer is not None and prefer not in self._failed else self._current
        while True:
            try:
                return operation(index)
            except FAILOVER_ERRORS as exc:
                tried.add(index)
                following = self._fail_over(index, tried, exc)
                if following is None:
                    raise
                index = following

    def _fail_over(self, failed: int, tried: set[int], exc: Exception) -> int | None:
        """Mark `failed` as failed; the endpoint to try next, or None if all were tried."""
        with self._lock:
            self._failed.add(failed)
            untried = [i for i in range(len(self.clients)) if i not in tried]
            if not untried:
                return None
            candidates = [i for i in untried if i not in self._failed] or untried
            following = ([i for i in candidates if i > failed] or candidates)[0]
            if self._current in self._failed or self._current in tried:
                self._current = following
        log.warning(
            "RPC endpoint %s keeps failing (%s); failing over to %s",
            self.label(failed),
            exc,
            self.label(following),
        )
        return following

    def cross_check(self, source: int, blocks: dict[int, str], what: str) -> None:
        """Every other endpoint that answers must give `blocks` (number: hash) the same hashes.

        An endpoint that does not answer is skipped (it may be the one that failed); one that
        answers with another hash stops the range: `ForkMismatchError`.
        """
        numbers = sorted(blocks)
        for other in range(len(self.clients)):
            if other == source:
                continue
            try:
                answers = self.clients[other].batch(
                    "eth_getBlockByNumber",
                    [[hex(n), False] for n in numbers],
                    retry=RetryPolicy(max_attempts=2, budget_s=10.0),
                )
            except (RpcFaultError, RpcUnreachableError, RpcRefusedError) as exc:
                log.warning(
                    "could not check %s against endpoint %s (%s)", what, self.label(other), exc
                )
                continue
            for number, answer in zip(numbers, answers, strict=True):
                theirs = answer.get("hash") if isinstance(answer, dict) else None
                if theirs is None:
                    log.warning("endpoint %s has no block %d yet", self.label(other), number)
                    continue
                if theirs.lower() != blocks[number].lower():
                    raise ForkMismatchError(
                        f"{what}: block {number} has hash {blocks[number]} at endpoint "
                        f"{self.label(source)} but {theirs} at endpoint {self.label(other)}: "
                        "the endpoints serve different forks of a finalized block, so Trace "
                        "commits neither; find out which endpoint is wrong and remove it from "
                        "TRACE_RPC_ENDPOINTS (or wait until they agree), then run the range again"
                    )


class FailoverRpc:
    """`JsonRpcClient.call`/`batch` on the current endpoint, failing over as `Endpoints.run`."""

    def __init__(self, endpoints: Endpoints) -> None:
        self.endpoints = endpoints

    @property
    def label(self) -> str:
        """The endpoint in use (the one that answered, or refused, last), as errors name it:
        its name or host, never the URL's path, where providers put keys."""
        return self.endpoints.budgets[self.endpoints.current].endpoint.label

    def call(self, method: str, params: Sequence[Any] = ()) -> Any:
        return self.endpoints.run(lambda i: self.endpoints.clients[i].call(method, params))

    def batch(
        self,
        method: str,
        params_list: Sequence[Sequence[Any]],
        size: int = 500,
        *,
        retry: RetryPolicy | None = None,
    ) -> list:
        return self.endpoints.run(
            lambda i: self.endpoints.clients[i].batch(method, params_list, size, retry=retry)
        )

    def close(self) -> None:
        self.endpoints.close()
