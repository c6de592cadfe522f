"""A local webhook receiver for `make demo` and the alert benchmark: what an organisation's
endpoint does with Trace's alerts.

It checks each POST's HMAC signature and timestamp (`verify_signature`, the receiver side of
the delivery contract), answers 401 to a bad one, and keeps one record per delivery with its
arrival time. Receivers dedupe on `X-Trace-Dedupe-Key`: `distinct_keys()` is what an
organisation's database would hold.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any, Self

from trace_resources.alert_pipeline.delivery import verify_signature

__all__ = ["Delivery", "WebhookReceiver"]


@dataclass(frozen=True)
class Delivery:
    path: str
    dedupe_key: str
    alert: dict[str, Any]
    received_at: float  # time.time()
    correlation_id: str | None = None  # the X-Trace-Correlation-Id header (`trace history`)


class WebhookReceiver:
    """`with WebhookReceiver(secret) as hook:` a signed-webhook endpoint on 127.0.0.1."""

    def __init__(self, secret: str, port: int = 0) -> None:
        self.secret = secret
        self.deliveries: list[Delivery] = []
        self.rejected = 0
        self._lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:  # quiet
                pass

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                ok = verify_signature(
                    receiver.secret,
                    self.headers.get("X-Trace-Timestamp", ""),
                    body,
                    self.headers.get("X-Trace-Signature", ""),
                )
                if not ok:
                    with receiver._lock:
                        receiver.rejected += 1
                    self.send_response(401)
                    self.end_headers()
                    return
                data = json.loads(body)
                with receiver._lock:
                    receiver.deliveries.append(
                        Delivery(
                            self.path,
                            data["dedupe_key"],
                            data["alert"],
                            time.time(),
                            self.headers.get("X-Trace-Correlation-Id"),
                        )
                    )
                self.send_response(204)
                self.end_headers()

        self.server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.server.daemon_threads = True
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        host, port = self.server.server_address[:2]
        return f"http://{host!s}:{port}"

    def distinct_keys(self) -> set[str]:
        with self._lock:
            return {d.dedupe_key for d in self.deliveries}

    def snapshot(self) -> list[Delivery]:
        with self._lock:
            return list(self.deliveries)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self._thread.join(timeout=10)

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
