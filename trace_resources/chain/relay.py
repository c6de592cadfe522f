"""A loopback JSON-RPC relay that sends cryo's calls to a rate-limited endpoint in batches.

cryo 0.3.2 sends one HTTP request per JSON-RPC call and never batches (measured through
`infra/local/rpc_provider.py`). A provider that limits requests per second but takes batches
of up to `max_batch` calls (25 requests/s and batches of 100 at one public Monad provider)
then bounds cryo at ~25 calls a second, while the same limit allows 2,500. The relay listens
on 127.0.0.1 for the collects of one `ChainClient`; cryo is pointed at it with enough
concurrency to have a batch's worth of calls waiting (`Budget.cryo_kwargs`), and the relay
gathers the calls that wait into JSON-RPC batches of at most `max_batch`, each sent as one
request through a `JsonRpcClient` paced to the relay's share of the endpoint's rate. Each
call's answer (result or JSON-RPC error) goes back to cryo unchanged, with cryo's own id. An
upstream failure that outlasts the client's retries answers every call of the batch with HTTP
502, so cryo fails and Trace's extraction retries or fails over as for any cryo failure.

Threads only (a `ThreadingHTTPServer` and one dispatcher); `close()` stops them.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from trace_resources.chain.rpc import JsonRpcClient

__all__ = ["BatchingRelay"]

log = logging.getLogger(__name__)

# how long the dispatcher waits for more calls once one arrived (cryo's concurrent calls of one
# chunk arrive within a few milliseconds); while a batch waits for the rate limit, calls queue
WINDOW_S = 0.01


class _Server(ThreadingHTTPServer):
    # cryo opens up to `max_concurrent_requests` connections per collect at once: with
    # socketserver's backlog of 5, connections beyond it lose their SYN and wait out TCP's
    # retransmission backoff (1, 3, 7, 15 s...)
    request_queue_size = 1024
    daemon_threads = True


class BatchingRelay:
    """See the module docstring. `upstream` carries the endpoint's URL, its pacing and
    retries; `in_flight` batches are formed while earlier ones wait for the rate or travel."""

    def __init__(self, upstream: JsonRpcClient, max_batch: int, in_flight: int = 2) -> None:
        if max_batch < 2:
            raise ValueError(f"a relay needs batches of 2 or more calls, got {max_batch}")
        self.upstream = upstream
        self.max_batch = max_batch
        self._calls: queue.Queue[tuple[dict[str, Any], Future[dict[str, Any]]] | None] = (
            queue.Queue()
        )
        self._slots = threading.Semaphore(in_flight)
        self._senders = ThreadPoolExecutor(in_flight, thread_name_prefix="rpc-relay-send")
        relay = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                relay._handle(self)

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
                pass

        self._server = _Server(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._threads = [
            threading.Thread(target=self._server.serve_forever, name="rpc-relay", daemon=True),
            threading.Thread(target=self._dispatch, name="rpc-relay-batch", daemon=True),
        ]
        for thread in self._threads:
            thread.start()
        self.batches = 0  # sent upstream, for the logs and tests
        self.calls = 0

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._calls.put(None)
        for thread in self._threads:
            thread.join(timeout=5)
        self._senders.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> BatchingRelay:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- the HTTP side (cryo's) ------------------------------------------------------------

    def _handle(self, request: BaseHTTPRequestHandler) -> None:
        length = int(request.headers.get("Content-Length") or 0)
        try:
            body = json.loads(request.rfile.read(length))
        except ValueError:
            self._reply(request, 400, {"error": "the request is not JSON"})
            return
        calls = body if isinstance(body, list) else [body]
        if not calls or not all(isinstance(c, dict) for c in calls):
            self._reply(request, 400, {"error": "not a JSON-RPC request"})
            return
        futures: list[Future[dict[str, Any]]] = []
        for call in calls:
            future: Future[dict[str, Any]] = Future()
            self._calls.put((call, future))
            futures.append(future)
        try:
            answers = [f.result() for f in futures]
        except Exception as exc:  # noqa: BLE001 - the batch failed upstream: cryo fails
            self._reply(request, 502, {"error": f"upstream: {exc}"})
            return
        self._reply(request, 200, answers if isinstance(body, list) else answers[0])

    @staticmethod
    def _reply(request: BaseHTTPRequestHandler, status: int, payload: Any) -> None:
        data = json.dumps(payload).encode()
        request.send_response(status)
        request.send_header("Content-Type", "application/json")
        request.send_header("Content-Length", str(len(data)))
        request.end_headers()
        request.wfile.write(data)

    # -- the upstream side -----------------------------------------------------------------

    def _dispatch(self) -> None:
        while True:
            self._slots.acquire()  # form a batch only when it can go: calls gather meanwhile
            first = self._calls.get()
            if first is None:
                return
            batch = [first]
            while len(batch) < self.max_batch:
                try:
                    item = self._calls.get(timeout=WINDOW_S if len(batch) == 1 else 0.001)
                except queue.Empty:
                    break
                if item is None:
                    self._calls.put(None)
                    break
                batch.append(item)
            self._senders.submit(self._send, batch)

    def _send(self, batch: list[tuple[dict[str, Any], Future[dict[str, Any]]]]) -> None:
        try:
            answers = self.upstream.forward([call for call, _ in batch])
        except Exception as exc:  # noqa: BLE001 - handed to every waiting call
            log.warning("RPC relay: a batch of %d calls failed upstream: %s", len(batch), exc)
            for _, future in batch:
                future.set_exception(exc)
        else:
            self.batches += 1
            self.calls += len(batch)
            for (_, future), answer in zip(batch, answers, strict=True):
                future.set_result(answer)
        finally:
            self._slots.release()
