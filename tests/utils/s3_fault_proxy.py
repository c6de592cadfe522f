"""An HTTP proxy in front of an S3 API (moto) that answers object PUTs with S3 errors on a
schedule, so tests exercise the real wire path: pyarrow's S3 client, its retries, Trace's
handling of what is left.

    with S3FaultProxy(moto_url) as proxy:
        store = s3_store(bucket, endpoint_url=proxy.url, ...)
        proxy.fail_puts(2, status=503)      # the next two object PUTs get 503 SlowDown
        ...
        proxy.injected, proxy.requests      # what happened

Everything else is relayed unchanged (bodies included, `Expect: 100-continue` answered by the
proxy itself). Runs in background threads (stdlib only) and stops on `close()`.
"""

from __future__ import annotations

import http.client
import threading
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from urllib.parse import urlsplit

__all__ = ["S3FaultProxy"]

_HOP_BY_HOP = {
    "connection",
    "keep-alive",
    "proxy-connection",
    "transfer-encoding",
    "te",
    "trailer",
    "upgrade",
    "expect",
}
_ERRORS = {
    500: ("InternalError", "We encountered an internal error. Please try again."),
    503: ("SlowDown", "Please reduce your request rate."),
}


class S3FaultProxy:
    def __init__(self, upstream_url: str) -> None:
        parts = urlsplit(upstream_url)
        self.upstream = (parts.hostname or "127.0.0.1", parts.port or 80)
        self.requests: Counter[str] = Counter()
        self.injected = 0
        self._failures = 0
        self._status = 503
        self._lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: object) -> None:  # quiet
                pass

            def _body(self) -> bytes:
                if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
                    data = b""
                    while True:
                        size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                        if size == 0:
                            while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                                pass
                            return data
                        data += self.rfile.read(size)
                        self.rfile.readline()
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

            def _relay(self) -> None:
                body = self._body()
                is_object_put = self.command == "PUT" and self.path.strip("/").count("/") >= 1
                proxy.requests[self.command] += 1
                status = proxy._take_failure() if is_object_put else None
                if status is not None:
                    code, message = _ERRORS[status]
                    payload = (
                        f'<?xml version="1.0" encoding="UTF-8"?><Error><Code>{code}</Code>'
                        f"<Message>{message}</Message><RequestId>injected</RequestId></Error>"
                    ).encode()
                    self.send_response(status)
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                    return
                headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP_BY_HOP}
                chunked = "chunked" in self.headers.get("Transfer-Encoding", "").lower()
                if chunked:  # relay it as it came (S3 reads aws-chunked bodies so framed)
                    headers["Transfer-Encoding"] = "chunked"
                else:
                    headers["Content-Length"] = str(len(body))
                conn = http.client.HTTPConnection(*proxy.upstream, timeout=60)
                try:
                    conn.request(
                        self.command,
                        self.path,
                        body=iter([body]) if chunked else body,
                        headers=headers,
                        encode_chunked=chunked,
                    )
                    response = conn.getresponse()
                    data = response.read()
                finally:
                    conn.close()
                self.send_response(response.status)
                for key, value in response.getheaders():
                    # a HEAD's Content-Length is the object's size: relay it as is
                    if key.lower() not in _HOP_BY_HOP and (
                        key.lower() != "content-length" or self.command == "HEAD"
                    ):
                        self.send_header(key, value)
                if self.command != "HEAD":
                    self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _relay

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    def fail_puts(self, count: int, status: int = 503) -> None:
        """Answer the next `count` object PUTs with `status` (500 or 503)."""
        with self._lock:
            self._failures, self._status = count, status

    def _take_failure(self) -> int | None:
        with self._lock:
            if self._failures <= 0:
                return None
            self._failures -= 1
            self.injected += 1
            return self._status

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self._thread.join(timeout=5)

    def __enter__(self) -> S3FaultProxy:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
