"""A small JSON-RPC client for the calls Trace makes itself (preflight, finality, counts).

cryo does the bulk extraction; Trace needs only a handful of cheap calls around it, and it
needs them to retry transient faults (HTTP 429/5xx, JSON-RPC server errors, timeouts,
dropped connections) with backoff inside a time budget, which cryo 0.3.2 does not do.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import logging
import ssl
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol
from urllib.parse import urlsplit

import httpx
from tenacity import (
    RetryCallState,
    Retrying,
    retry_if_exception,
    stop_after_attempt,
    stop_after_delay,
    wait_exponential_jitter,
)

from trace_resources.errors import (
    ConfigError,
    RpcFaultError,
    RpcRefusedError,
    RpcUnreachableError,
)

__all__ = ["JsonRpcClient", "JsonRpcError", "Pacer", "RetryPolicy", "Rpc"]

log = logging.getLogger(__name__)

# JSON-RPC error codes that a healthy node returns for load or transient trouble.
_TRANSIENT_RPC_CODES = {-32000, -32005, -32603, 429}


class JsonRpcError(Exception):
    """The node answered with a JSON-RPC error object."""

    def __init__(self, method: str, code: int, message: str) -> None:
        super().__init__(f"{method}: JSON-RPC error {code}: {message}")
        self.method = method
        self.code = code

    @property
    def transient(self) -> bool:
        return self.code in _TRANSIENT_RPC_CODES


@dataclass(frozen=True)
class RetryPolicy:
    """How long and how often to retry transient faults."""

    max_attempts: int = 8
    budget_s: float = 120.0
    initial_backoff_s: float = 0.2
    max_backoff_s: float = 10.0

    def retrying(self, is_transient: Any) -> Retrying:
        return Retrying(
            retry=retry_if_exception(is_transient),
            stop=stop_after_attempt(self.max_attempts) | stop_after_delay(self.budget_s),
            wait=wait_exponential_jitter(
                multiplier=self.initial_backoff_s,
                max=self.max_backoff_s,
                jitter=self.initial_backoff_s,
            ),
            before_sleep=_log_retry,
            reraise=True,
        )


def _log_retry(state: RetryCallState) -> None:
    exc = state.outcome.exception() if state.outcome else None
    log.warning("transient RPC fault (attempt %d): %s; retrying", state.attempt_number, exc)


def _is_transient(exc: BaseException) -> bool:
    if isinstance(exc, JsonRpcError):
        return exc.transient
    if isinstance(exc, httpx.HTTPStatusError):
        return exc.response.status_code == 429 or exc.response.status_code >= 500
    if isinstance(exc, httpx.UnsupportedProtocol):
        return False
    return isinstance(exc, httpx.TransportError | _MissingResult)


def _refusal(url: str, method: str, exc: Exception) -> str:
    """What a permanent refusal (HTTP 4xx but 429, a JSON-RPC error that is not load) says."""
    if isinstance(exc, httpx.HTTPStatusError):
        status = exc.response.status_code
        return (
            f"the endpoint {url} answered {method} with HTTP {status} "
            f"{exc.response.reason_phrase}: it is not a JSON-RPC node (or refuses Trace); "
            "check TRACE_RPC_URL (e.g. http://127.0.0.1:18545) and its credentials"
        )
    return (
        f"the JSON-RPC endpoint {url} refused {method}: {exc}; it does not serve what Trace "
        "needs: point TRACE_RPC_URL at a full node of the chain"
    )


class _MissingResult(Exception):
    """A batch answer lacks the result of one of its calls (a faulty or overloaded node)."""


@functools.cache
def tls_context() -> ssl.SSLContext:
    """One TLS context per process: building one loads the CA bundle (~0.1-0.3 s), which
    every new client paid, once per run and once per head-follower reconnect (httpx's advice:
    share the context)."""
    return httpx.create_ssl_context()


class Pacer:
    """Starts requests evenly apart, across threads, so no one-second window holds more than
    ``requests_per_second`` of them where the provider counts (5% apart more than needed: the
    network's jitter can bring two requests closer on their way)."""

    MARGIN = 1.05

    def __init__(self, requests_per_second: float) -> None:
        if requests_per_second <= 0:
            raise ValueError(f"requests_per_second must be positive, got {requests_per_second}")
        self.interval_s = self.MARGIN / requests_per_second
        self._next = 0.0
        self._lock = threading.Lock()

    def wait(self) -> None:
        with self._lock:
            now = time.monotonic()
            at = max(now, self._next)
            self._next = at + self.interval_s
        if at > now:
            time.sleep(at - now)


class Rpc(Protocol):
    """What the checks and traces call: one endpoint's `JsonRpcClient`, or the endpoints'
    `FailoverRpc` (`trace_resources.chain.endpoints`)."""

    @property
    def label(self) -> str:
        """The endpoint as errors name it: never the URL's path, where providers put keys."""
        ...

    def call(self, method: str, params: Sequence[Any] = ()) -> Any: ...

    def batch(
        self,
        method: str,
        params_list: Sequence[Sequence[Any]],
        size: int = 500,
        *,
        retry: RetryPolicy | None = None,
    ) -> list: ...


class JsonRpcClient:
    """JSON-RPC over HTTP with keep-alive, batching and retries, within an endpoint's limits:
    at most `requests_per_second` HTTP requests a second (a batch is one), `max_concurrent`
    in flight, and batches of at most `max_batch` calls (1: no batches, single calls only)."""

    def __init__(
        self,
        url: str,
        timeout_s: float = 10.0,
        retry: RetryPolicy | None = None,
        *,
        requests_per_second: float | None = None,
        max_concurrent: int | None = None,
        max_batch: int = 500,
        name: str | None = None,
    ) -> None:
        self.url = url
        self.name = name  # the endpoint's configured name, if it has one
        self.retry = retry or RetryPolicy()
        self.max_batch = max_batch
        self._pacer = Pacer(requests_per_second) if requests_per_second else None
        self._slots = threading.BoundedSemaphore(max_concurrent) if max_concurrent else None
        self._ids = itertools.count(1)
        self._http = httpx.Client(timeout=timeout_s, verify=tls_context())

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> JsonRpcClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def label(self) -> str:
        """The endpoint's configured name, else the URL's host and port: never its path,
        where providers put keys."""
        return self.name or urlsplit(self.url).netloc.rpartition("@")[2] or self.url

    def call(self, method: str, params: Sequence[Any] = ()) -> Any:
        """One call, retried on transient faults."""
        return self.batch(method, [params])[0]

    def batch(
        self,
        method: str,
        params_list: Sequence[Sequence[Any]],
        size: int = 500,
        *,
        retry: RetryPolicy | None = None,
    ) -> list:
        """Many calls of one method, sent as JSON-RPC batches of `size`, results in order.

        `retry` overrides the client's policy for these calls (e.g. a single attempt).
        """
        results: list[Any] = []
        size = min(size, self.max_batch)
        for offset in range(0, len(params_list), size):
            chunk = params_list[offset : offset + size]
            results.extend(self._with_retries(method, chunk, retry or self.retry))
        return results

    def forward(self, calls: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
        """Calls of any methods, as another client sent them, in one JSON-RPC batch (paced and
        retried like the client's own); each call's answer, result or JSON-RPC error, with the
        call's own id, in order (`relay.BatchingRelay`)."""
        try:
            for attempt in self.retry.retrying(_is_transient):
                with attempt:
                    return self._forward_once(calls)
        except (httpx.TransportError, httpx.HTTPStatusError, _MissingResult) as exc:
            raise self._fault(f"a batch of {len(calls)} relayed calls", exc) from exc
        raise AssertionError("unreachable: tenacity reraises")

    def _forward_once(self, calls: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
        ids = [next(self._ids) for _ in calls]
        body = [{**call, "id": i} for call, i in zip(calls, ids, strict=True)]
        with self._slots or contextlib.nullcontext():
            if self._pacer is not None:
                self._pacer.wait()
            response = self._http.post(self.url, json=body)
        response.raise_for_status()
        answers = response.json()
        if isinstance(answers, dict):  # a whole-batch error: no answer per call
            answers = [answers]
        by_id = {a.get("id"): a for a in answers if isinstance(a, dict)}
        out = []
        for call, i in zip(calls, ids, strict=True):
            answer = by_id.get(i)
            if answer is None:
                raise _MissingResult(f"the answer to a relayed batch has no result for id {i}")
            out.append({**answer, "id": call.get("id")})
        return out

    def _with_retries(
        self, method: str, params_list: Sequence[Sequence[Any]], retry: RetryPolicy
    ) -> list:
        try:
            for attempt in retry.retrying(_is_transient):
                with attempt:
                    return self._send(method, params_list)
        except httpx.UnsupportedProtocol as exc:
            raise ConfigError(
                f"the JSON-RPC URL {self.url!r} is not an http(s) URL ({exc}); set "
                "TRACE_RPC_URL to e.g. http://127.0.0.1:18545"
            ) from exc
        except httpx.TransportError as exc:
            raise RpcUnreachableError(
                f"the JSON-RPC endpoint {self.url} did not answer {method} "
                f"({type(exc).__name__}: {exc}), retried up to {retry.max_attempts} times "
                f"within {retry.budget_s:.0f} s; check that the node is running and that "
                "TRACE_RPC_URL points at it"
            ) from exc
        except (httpx.HTTPStatusError, JsonRpcError) as exc:
            if _is_transient(exc):
                raise self._fault(method, exc) from exc
            raise RpcRefusedError(_refusal(self.url, method, exc)) from exc
        except _MissingResult as exc:
            raise self._fault(method, exc) from exc
        raise AssertionError("unreachable: tenacity reraises")

    def _fault(self, method: str, exc: Exception) -> RpcFaultError:
        return RpcFaultError(
            f"the JSON-RPC endpoint {self.url} kept failing {method}: {exc}; "
            "it may be rate limiting or overloaded: lower TRACE_RPC_REQUESTS_PER_SECOND "
            "or TRACE_RPC_MAX_CONCURRENT_REQUESTS, or retry later"
        )

    def _send(self, method: str, params_list: Sequence[Sequence[Any]]) -> list:
        ids = [next(self._ids) for _ in params_list]
        body = [
            {"jsonrpc": "2.0", "id": i, "method": method, "params": list(p)}
            for i, p in zip(ids, params_list, strict=True)
        ]
        with self._slots or contextlib.nullcontext():
            if self._pacer is not None:
                self._pacer.wait()
            # an endpoint without batches (max_batch 1) gets a plain JSON-RPC request
            response = self._http.post(self.url, json=body[0] if self.max_batch == 1 else body)
        response.raise_for_status()
        answers = response.json()
        if isinstance(answers, dict):  # some nodes answer a whole-batch error with one object
            answers = [answers]
        by_id = {a.get("id"): a for a in answers if isinstance(a, dict)}
        results = []
        for i in ids:
            answer = by_id.get(i)
            if answer is None:
                raise _MissingResult(f"{method}: the answer has no result for request id {i}")
            if "error" in answer and answer["error"] is not None:
                err = answer["error"]
                raise JsonRpcError(method, int(err.get("code", 0)), str(err.get("message", "")))
            results.append(answer.get("result"))
        return results
