"""Fault-injecting JSON-RPC HTTP proxy for tests and benchmarks.

Sits on ``127.0.0.1:<ephemeral port>`` in front of a real JSON-RPC node (e.g. anvil) and
injects faults on a schedule, so tests can prove that Trace retries transient RPC faults and
refuses to commit incomplete block ranges.  It runs in background threads of the test
process (stdlib ``ThreadingHTTPServer``; no extra dependencies) and shuts down cleanly.

Usage::

    with FaultProxy(anvil_url, faults=[Fault("http_429", methods={"eth_getLogs"}, count=2)]) as p:
        cryo.collect("logs", blocks=["0:10"], rpc=p.url)
        assert p.injected["http_429"] == 2
        p.set_faults([Fault("missing_block", blocks={5})])
        ...
        p.requests          # list[RequestRecord]: every JSON-RPC call seen, with fault (or None)
        p.method_counts()   # Counter of methods seen

Fault kinds (see ``Fault``):

* transport level (the whole HTTP request is affected, also when it is a JSON-RPC batch):
  ``http_429`` (status 429 + ``Retry-After``), ``http_5xx`` (status 500/502/503),
  ``timeout`` (hold the request ``delay`` seconds without answering, then close the
  connection), ``drop`` (close the connection without answering);
* per call: ``jsonrpc_error`` (HTTP 200 with a JSON-RPC error object, default
  ``-32005 "limit exceeded"``); ``method_not_found`` (-32601, as a provider answers a
  namespace it does not serve; by default every ``debug_*`` method, each time);
* data faults, applied to the real upstream answer: ``missing_block`` (``null`` result for
  ``eth_getBlockByNumber``/``eth_getBlockReceipts`` of the chosen blocks), ``missing_logs``
  (remove the chosen blocks' logs from an ``eth_getLogs`` result), ``truncate_txs``
  (remove the last ``drop_txs`` transactions from an ``eth_getBlockByNumber``/``...ByHash``
  result, or receipts from ``eth_getBlockReceipts``), ``drop_log`` (remove the log at
  ``log_index`` of each chosen block from an ``eth_getLogs`` result, and from the block's
  receipts when ``eth_getBlockReceipts`` is among ``methods``; the block's later logs are
  renumbered, so the indices stay contiguous), ``replace_hash`` (replace
  every string equal to a key of ``replace`` by its value, anywhere in any answer of
  ``methods``: a block's hash rewritten consistently, i.e. also as the next block's parent
  hash and in its logs; or any other value, such as a transaction's input).

Scheduling: a fault applies to calls whose method is in ``methods`` (``None`` = the kind's
default methods, i.e. all methods for transport/jsonrpc faults) and, when ``blocks`` is given,
that touch one of those blocks.  The first ``after`` matching calls pass through untouched,
then the fault fires on each matching call with ``probability`` (seeded RNG) until it has
fired ``count`` times (``None`` = unlimited).  The first fault in the list that fires wins.
"""

from __future__ import annotations

import http.client
import json
import random
import socket
import threading
import time
import urllib.parse
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Literal

__all__ = ["FAULT_KINDS", "Fault", "FaultKind", "FaultProxy", "RequestRecord"]

FaultKind = Literal[
    "http_429",
    "http_5xx",
    "jsonrpc_error",
    "method_not_found",
    "timeout",
    "drop",
    "missing_block",
    "missing_logs",
    "truncate_txs",
    "drop_log",
    "replace_hash",
]
FAULT_KINDS: frozenset[str] = frozenset(FaultKind.__args__)  # type: ignore[attr-defined]
TRANSPORT_KINDS: frozenset[str] = frozenset({"http_429", "http_5xx", "timeout", "drop"})
DATA_KINDS: frozenset[str] = frozenset(
    {"missing_block", "missing_logs", "truncate_txs", "drop_log", "replace_hash"}
)
ERROR_KINDS: frozenset[str] = frozenset({"jsonrpc_error", "method_not_found"})
_METHOD_NOT_FOUND = (-32601, "the method does not exist/is not available")

_BLOCK_METHODS = frozenset({"eth_getBlockByNumber", "eth_getBlockReceipts"})
_DEFAULT_METHODS: dict[str, frozenset[str]] = {
    "missing_block": _BLOCK_METHODS,
    "missing_logs": frozenset({"eth_getLogs"}),
    "truncate_txs": frozenset(
        {"eth_getBlockByNumber", "eth_getBlockByHash", "eth_getBlockReceipts"}
    ),
    "drop_log": frozenset({"eth_getLogs"}),
}


@dataclass(eq=False)
class Fault:
    """One fault rule.  Runtime counters ``matched``/``injected`` are updated by the proxy.

    kind:        one of ``FAULT_KINDS``.
    methods:     JSON-RPC methods it applies to; ``None`` = all (data kinds: their methods).
    count:       maximum number of injections; ``None`` = unlimited.
    probability: chance to fire on an eligible call (RNG seeded with ``seed``).
    after:       let the first ``after`` matching calls through before firing.
    blocks:      block numbers the fault is restricted to (required for ``missing_block``
                 and ``missing_logs``; optional filter for the other kinds).
    status:      HTTP status for ``http_5xx`` (500/502/503...).
    retry_after: ``Retry-After`` header value (seconds) for ``http_429``.
    json_body:   for ``http_429``/``http_5xx``: send a JSON-RPC error object as the body
                 instead of a plain-text body.
    code/message: JSON-RPC error for ``jsonrpc_error`` (and ``json_body`` responses).
    delay:       seconds to hold a ``timeout`` request before closing the connection.
    drop_txs:    number of transactions/receipts removed by ``truncate_txs``.
    log_index:   block-wide index of the log ``drop_log`` removes.
    batch:       True: only calls sent inside a JSON-RPC batch (Trace's own header batches);
                 False: only single calls (cryo's, which never batches); None: both.
    replace:     ``replace_hash``: strings to replace (compared case-insensitively) and by what.
    """

    kind: FaultKind
    methods: Iterable[str] | None = None
    count: int | None = None
    probability: float = 1.0
    after: int = 0
    blocks: Iterable[int] | None = None
    status: int = 503
    retry_after: int = 1
    json_body: bool = False
    code: int = -32005
    message: str = "limit exceeded"
    delay: float = 30.0
    drop_txs: int = 1
    log_index: int = 0
    replace: dict[str, str] = field(default_factory=dict)
    batch: bool | None = None
    seed: int = 0
    matched: int = field(default=0, init=False)
    injected: int = field(default=0, init=False)

    def __post_init__(self) -> None:
        if self.kind not in FAULT_KINDS:
            raise ValueError(f"unknown fault kind {self.kind!r}; expected one of {FAULT_KINDS}")
        if self.kind in ("missing_block", "missing_logs", "drop_log") and self.blocks is None:
            raise ValueError(f"{self.kind} needs blocks=...")
        if self.kind == "http_5xx" and not 500 <= self.status <= 599:
            raise ValueError("http_5xx needs a 5xx status")
        if self.kind == "replace_hash" and not self.replace:
            raise ValueError("replace_hash needs replace={old: new}")
        self.replace = {k.lower(): v for k, v in self.replace.items()}
        if not 0.0 <= self.probability <= 1.0:
            raise ValueError("probability must be within [0, 1]")
        if self.kind == "method_not_found":
            self.code, self.message = _METHOD_NOT_FOUND
        if self.methods is None:
            self.methods = _DEFAULT_METHODS.get(self.kind)
        else:
            self.methods = frozenset(self.methods)
        self.blocks = None if self.blocks is None else frozenset(int(b) for b in self.blocks)
        self._rng = random.Random(self.seed)

    @property
    def exhausted(self) -> bool:
        return self.count is not None and self.injected >= self.count

    def _applies_to(self, method: str, params: Any, is_batch: bool = False) -> bool:
        if self.batch is not None and self.batch != is_batch:
            return False
        if self.kind == "method_not_found" and self.methods is None:
            return method.startswith("debug_")  # the namespace a provider leaves out
        if self.methods is not None and method not in self.methods:  # type: ignore[operator]
            return False
        if self.blocks is not None:
            lo_hi = _block_span(method, params)
            if lo_hi is None:
                return False
            lo, hi = lo_hi
            return any(lo <= b <= hi for b in self.blocks)  # type: ignore[union-attr]
        return True

    def _should_fire(self, method: str, params: Any, is_batch: bool = False) -> bool:
        """Called under the proxy lock for every call; updates counters."""
        if not self._applies_to(method, params, is_batch):
            return False
        self.matched += 1
        if self.matched <= self.after or self.exhausted:
            return False
        if self.probability < 1.0 and self._rng.random() >= self.probability:
            return False
        self.injected += 1
        return True


@dataclass(frozen=True)
class RequestRecord:
    """One JSON-RPC call seen by the proxy (a batch yields one record per element)."""

    seq: int  # HTTP request sequence number (shared by the elements of a batch)
    t: float  # seconds since the proxy started
    method: str
    params: Any
    fault: str | None  # fault kind injected into this call, or None
    batch: bool


def _to_int(value: Any) -> int | None:
    if isinstance(value, int):
        return value
    if isinstance(value, str):
        try:
            return int(value, 16) if value.startswith(("0x", "0X")) else int(value)
        except ValueError:
            return None
    return None


def _block_span(method: str, params: Any) -> tuple[int, int] | None:
    """Block range (inclusive) a call refers to, if it can be determined from params."""
    if not isinstance(params, list) or not params:
        return None
    first = params[0]
    if method == "eth_getLogs" and isinstance(first, dict):
        lo, hi = _to_int(first.get("fromBlock")), _to_int(first.get("toBlock"))
        if lo is None or hi is None:
            return None
        return lo, hi
    n = _to_int(first)
    return None if n is None else (n, n)


def _rpc_error(call_id: Any, code: int, message: str) -> dict[str, Any]:
    return {"jsonrpc": "2.0", "id": call_id, "error": {"code": code, "message": message}}


def _apply_data_fault(fault: Fault, method: str, response: dict[str, Any]) -> dict[str, Any]:
    result = response.get("result")
    if result is None:
        return response
    blocks: frozenset[int] = fault.blocks or frozenset()  # type: ignore[assignment]
    if fault.kind == "missing_block":
        result = None
    elif fault.kind == "missing_logs" and isinstance(result, list):
        result = [log for log in result if _to_int(log.get("blockNumber")) not in blocks]
    elif fault.kind == "truncate_txs":
        if isinstance(result, dict) and isinstance(result.get("transactions"), list):
            txs = result["transactions"]
            result = {**result, "transactions": txs[: max(0, len(txs) - fault.drop_txs)]}
        elif isinstance(result, list) and method == "eth_getBlockReceipts":
            result = result[: max(0, len(result) - fault.drop_txs)]
    elif fault.kind == "drop_log":
        result = _drop_log(result, method, blocks, fault.log_index)
    elif fault.kind == "replace_hash":
        result = _replace_strings(result, fault.replace)
    return {**response, "result": result}


def _drop_from(logs: list[Any], blocks: frozenset[int], log_index: int) -> list[Any]:
    """`logs` without the chosen one, the later logs of its block renumbered to close the gap
    (a consistent liar: the log indices stay contiguous)."""
    kept = []
    for log in logs:
        if not isinstance(log, dict) or _to_int(log.get("blockNumber")) not in blocks:
            kept.append(log)
            continue
        index = _to_int(log.get("logIndex"))
        if index is None or index < log_index:
            kept.append(log)
        elif index > log_index:
            kept.append({**log, "logIndex": hex(index - 1)})
    return kept


def _drop_log(result: Any, method: str, blocks: frozenset[int], log_index: int) -> Any:
    if method == "eth_getLogs" and isinstance(result, list):
        return _drop_from(result, blocks, log_index)
    if method == "eth_getBlockReceipts" and isinstance(result, list):
        return [
            {**r, "logs": _drop_from(r.get("logs") or [], blocks, log_index)}
            if isinstance(r, dict)
            else r
            for r in result
        ]
    return result


def _replace_strings(value: Any, replace: dict[str, str]) -> Any:
    if isinstance(value, str):
        return replace.get(value.lower(), value)
    if isinstance(value, list):
        return [_replace_strings(v, replace) for v in value]
    if isinstance(value, dict):
        return {k: _replace_strings(v, replace) for k, v in value.items()}
    return value


class _Server(ThreadingHTTPServer):
    daemon_threads = False  # server_close() joins handler threads -> no leaked threads
    block_on_close = True
    allow_reuse_address = True
    # cryo opens up to max_concurrent_requests (32) connections at once, more when ranges are
    # extracted concurrently; socketserver's default backlog of 5 overflows and the kernel
    # drops the SYNs, which clients retry only after 1 s, 3 s, ...: slow, flaky extractions
    request_queue_size = 1024

    def __init__(self, proxy: FaultProxy) -> None:
        self.proxy = proxy
        self.open_sockets: set[socket.socket] = set()
        self.sockets_lock = threading.Lock()
        super().__init__(("127.0.0.1", 0), _Handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        with self.sockets_lock:
            self.open_sockets.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request: Any) -> None:
        with self.sockets_lock:
            self.open_sockets.discard(request)
        super().shutdown_request(request)

    def abort_connections(self) -> None:
        with self.sockets_lock:
            socks = list(self.open_sockets)
        for sock in socks:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, like real nodes
    timeout = 120  # safety net for idle keep-alive connections
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - silence stderr
        pass

    def setup(self) -> None:
        super().setup()
        # answers are written as header + body; without NODELAY, Nagle + delayed ACK add ~40 ms
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._upstream: http.client.HTTPConnection | None = None

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            if self._upstream is not None:
                self._upstream.close()

    def do_GET(self) -> None:  # noqa: N802
        self._send(405, b"JSON-RPC proxy: POST only\n", "text/plain")

    def do_POST(self) -> None:  # noqa: N802
        proxy = self.server.proxy
        proxy._enter()
        try:
            self._handle_post(proxy)
        finally:
            proxy._leave()

    def end_headers(self) -> None:
        # the answer's way back (a subclass's simulated latency), before anything is written
        self.server.proxy._before_answer()
        super().end_headers()

    def _handle_post(self, proxy: FaultProxy) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length)
        proxy._after_request()  # the request's way there (a subclass's simulated latency)
        try:
            body = json.loads(raw)
        except ValueError:
            self._send(
                400, b'{"jsonrpc":"2.0","id":null,"error":{"code":-32700,"message":"parse error"}}'
            )
            return
        is_batch = isinstance(body, list)
        calls: list[Any] = body if is_batch else [body]
        # a subclass's limits (rpc_provider.ProviderProxy): refuse the whole request, or
        # answer some calls with an error instead of the node
        refusal, refused_calls = proxy._admit(calls, is_batch)
        if refusal is not None:
            self._send(*refusal)
            return
        plan = proxy._plan(calls, is_batch)

        transport = next((f for f in plan if f is not None and f.kind in TRANSPORT_KINDS), None)
        if transport is not None:
            self._transport_fault(transport, calls)
            return

        # forward the calls that are not answered by a jsonrpc_error fault
        to_forward = [
            c
            for c, f, r in zip(calls, plan, refused_calls, strict=True)
            if r is None and (f is None or f.kind not in ERROR_KINDS)
        ]
        upstream: dict[int, dict[str, Any]] = {}
        if to_forward:
            try:
                answers = self._forward(to_forward if is_batch else to_forward[0])
            except (OSError, http.client.HTTPException, ValueError) as exc:
                self._send(502, f"upstream error: {exc!r}\n".encode(), "text/plain")
                return
            if not isinstance(answers, list):
                answers = [answers]
            by_id = {json.dumps(a.get("id")): a for a in answers if isinstance(a, dict)}
            for pos, call in enumerate(to_forward):
                key = json.dumps(call.get("id") if isinstance(call, dict) else None)
                upstream[id(call)] = by_id.get(key) or (
                    answers[pos] if pos < len(answers) else _rpc_error(None, -32603, "no answer")
                )

        out: list[dict[str, Any]] = []
        for call, fault, refused in zip(calls, plan, refused_calls, strict=True):
            call_id = call.get("id") if isinstance(call, dict) else None
            if refused is not None:
                out.append({**refused, "id": call_id})
                continue
            if fault is not None and fault.kind in ERROR_KINDS:
                out.append(_rpc_error(call_id, fault.code, fault.message))
                continue
            answer = upstream[id(call)]
            if fault is not None and fault.kind in DATA_KINDS:
                answer = _apply_data_fault(fault, call.get("method", ""), answer)
            out.append(proxy._rewrite(call, answer))
        self._send(200, json.dumps(out if is_batch else out[0]).encode())

    # -- helpers -------------------------------------------------------------------------

    def _transport_fault(self, fault: Fault, calls: list[Any]) -> None:
        if fault.kind in ("http_429", "http_5xx"):
            status = 429 if fault.kind == "http_429" else fault.status
            headers = {"Retry-After": str(fault.retry_after)} if status == 429 else {}
            if fault.json_body:
                first = calls[0] if calls and isinstance(calls[0], dict) else {}
                code = 429 if status == 429 else -32603
                msg = "Too Many Requests" if status == 429 else f"HTTP {status}"
                payload = json.dumps(_rpc_error(first.get("id"), code, msg)).encode()
                self._send(status, payload, "application/json", headers)
            else:
                text = f"{status} {http.client.responses.get(status, 'Error')}\n".encode()
                self._send(status, text, "text/plain", headers)
            return
        if fault.kind == "timeout":
            self.server.proxy._stopping.wait(fault.delay)
        # drop / timeout: close the connection without answering
        self.close_connection = True
        try:
            self.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def _forward(self, payload: Any) -> Any:
        proxy = self.server.proxy
        data = json.dumps(payload).encode()
        headers = {"Content-Type": "application/json"}
        for attempt in range(2):  # retry once on a stale keep-alive connection
            if self._upstream is None:
                self._upstream = http.client.HTTPConnection(
                    proxy._up_host, proxy._up_port, timeout=proxy.upstream_timeout
                )
            try:
                self._upstream.request("POST", proxy._up_path, body=data, headers=headers)
                resp = self._upstream.getresponse()
                return json.loads(resp.read())
            except (OSError, http.client.HTTPException):
                self._upstream.close()
                self._upstream = None
                if attempt == 1:
                    raise
        raise AssertionError("unreachable")

    def _send(
        self,
        status: int,
        payload: bytes,
        content_type: str = "application/json",
        headers: dict[str, str] | None = None,
    ) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(payload)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(payload)


class FaultProxy:
    """Fault-injecting JSON-RPC proxy; see the module docstring.

    ``start()``/``stop()`` or use it as a context manager.  Thread-safe accessors:
    ``url``, ``requests``, ``injected``, ``method_counts()``, ``set_faults()``, ``reset()``.
    """

    def __init__(
        self,
        upstream_url: str,
        faults: Sequence[Fault] = (),
        *,
        upstream_timeout: float = 30.0,
    ) -> None:
        parsed = urllib.parse.urlsplit(upstream_url)
        if parsed.scheme != "http" or not parsed.hostname:
            raise ValueError(f"upstream must be an http:// URL, got {upstream_url!r}")
        self.upstream_url = upstream_url
        self.upstream_timeout = upstream_timeout
        self._up_host = parsed.hostname
        self._up_port = parsed.port or 80
        self._up_path = parsed.path or "/"
        self._lock = threading.Lock()
        self._faults: list[Fault] = list(faults)
        self._records: list[RequestRecord] = []
        self._injected: Counter[str] = Counter()
        self._seq = 0
        self._in_flight = 0
        self._max_in_flight = 0
        self._t0 = time.monotonic()
        self._stopping = threading.Event()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle -----------------------------------------------------------------------

    def start(self) -> FaultProxy:
        if self._server is not None:
            raise RuntimeError("proxy already started")
        self._stopping.clear()
        self._t0 = time.monotonic()
        self._server = _Server(self)
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.05},
            name=f"fault-proxy-{self._server.server_address[1]}",
            daemon=True,
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        server, thread = self._server, self._thread
        if server is None:
            return
        self._stopping.set()  # wakes up requests held by a `timeout` fault
        server.shutdown()  # stop accepting
        server.abort_connections()  # unblock handler threads waiting on keep-alive sockets
        server.server_close()  # closes the listening socket and joins handler threads
        if thread is not None:
            thread.join(timeout=5)
        self._server = None
        self._thread = None

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def url(self) -> str:
        if self._server is None:
            raise RuntimeError("proxy not started")
        port = self._server.server_address[1]
        return f"http://127.0.0.1:{port}"

    # -- faults and observations ---------------------------------------------------------

    def set_faults(self, faults: Sequence[Fault]) -> None:
        """Replace the active faults (the request log is kept; see ``reset``)."""
        with self._lock:
            self._faults = list(faults)

    @property
    def faults(self) -> list[Fault]:
        with self._lock:
            return list(self._faults)

    def reset(self) -> None:
        """Clear the request log and the injection counters (faults are kept)."""
        with self._lock:
            self._records.clear()
            self._injected.clear()
            self._max_in_flight = self._in_flight

    @property
    def requests(self) -> list[RequestRecord]:
        """Every JSON-RPC call seen so far (a copy)."""
        with self._lock:
            return list(self._records)

    @property
    def injected(self) -> Counter[str]:
        """Number of injected faults per kind (a copy)."""
        with self._lock:
            return Counter(self._injected)

    @property
    def max_in_flight(self) -> int:
        """Highest number of HTTP requests handled concurrently since start/``reset``."""
        with self._lock:
            return self._max_in_flight

    def _enter(self) -> None:
        with self._lock:
            self._in_flight += 1
            self._max_in_flight = max(self._max_in_flight, self._in_flight)

    def _leave(self) -> None:
        with self._lock:
            self._in_flight -= 1

    def method_counts(self, *, faulted: bool | None = None) -> Counter[str]:
        """Calls per method; ``faulted`` = True/False restricts to (non-)faulted calls."""
        with self._lock:
            return Counter(
                r.method
                for r in self._records
                if faulted is None or (r.fault is not None) == faulted
            )

    # -- hooks for subclasses (rpc_provider.ProviderProxy): no-ops here ---------------------

    def _after_request(self) -> None:
        """Called once the request is read, before anything else."""

    def _admit(
        self, calls: list[Any], is_batch: bool
    ) -> tuple[tuple[int, bytes, str, dict[str, str]] | None, list[dict[str, Any] | None]]:
        """(a refusal of the whole HTTP request as (status, body, content type, headers), or
        None; per call, an error answer given instead of the node's, or None)."""
        return None, [None] * len(calls)

    def _rewrite(self, call: Any, answer: dict[str, Any]) -> dict[str, Any]:
        """The node's answer to one call as the client receives it."""
        return answer

    def _before_answer(self) -> None:
        """Called before an answer's headers are sent."""

    def _plan(self, calls: list[Any], is_batch: bool) -> list[Fault | None]:
        """Decide which fault (if any) hits each call of one HTTP request; log the calls."""
        with self._lock:
            self._seq += 1
            t = time.monotonic() - self._t0
            plan: list[Fault | None] = []
            for call in calls:
                method = call.get("method", "") if isinstance(call, dict) else ""
                params = call.get("params") if isinstance(call, dict) else None
                chosen = None
                for fault in self._faults:
                    if fault._should_fire(method, params, is_batch):
                        chosen = fault
                        break
                plan.append(chosen)
            # a transport fault hits the whole HTTP request
            transport = next((f for f in plan if f is not None and f.kind in TRANSPORT_KINDS), None)
            for call, chosen in zip(calls, plan, strict=True):
                hit = transport if transport is not None else chosen
                kind = hit.kind if hit is not None else None
                method = call.get("method", "") if isinstance(call, dict) else ""
                params = call.get("params") if isinstance(call, dict) else None
                self._records.append(RequestRecord(self._seq, t, method, params, kind, is_batch))
            for chosen in plan:
                if chosen is not None:
                    self._injected[chosen.kind] += 1
            return plan
