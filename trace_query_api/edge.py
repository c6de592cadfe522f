"""The HTTP edge: what the service refuses before any route reads a request.

`EdgeMiddleware` is a pure ASGI middleware (it never buffers more than the cap):

- a body larger than `TRACE_QUERY_MAX_BODY_BYTES` gets a 413 before the app reads or parses
  it and before the token is checked: at once when `Content-Length` says so, and, for a body
  sent without a length (chunked), as soon as the bytes counted while reading pass the cap
  (only such a body is read here, into at most the cap, then handed on); an enrichment upload
  (`PUT /v1/enrichments/{name}`) has its own cap, `TRACE_ENRICHMENT_MAX_BYTES`;
- then a `/v1/` request without an `Authorization: Bearer` header gets the 401 the routes would
  answer, without reading its body (the signed export download link needs no token).

Refusals that leave a body unread close the connection: the client may still be sending it.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable

from starlette.types import ASGIApp, Message, Receive, Scope, Send

__all__ = ["EdgeMiddleware", "needs_token"]

_SIGNED_DOWNLOAD = re.compile(r"^/v1/exports/[^/]+/download/?$")
_UPLOAD = re.compile(r"^/v1/enrichments/[^/]+/?$")
# a task's staged output (a Python transform's Parquet): its own, larger cap
TASK_UPLOADS = "/v1/tasks/uploads/"


def needs_token(path: str) -> bool:
    """Whether every method of this path takes a bearer token."""
    return path.startswith("/v1/") and _SIGNED_DOWNLOAD.match(path) is None


class _TooLarge(Exception):
    pass


class EdgeMiddleware:
    def __init__(
        self,
        app: ASGIApp,
        max_body_bytes: int,
        on_refuse: Callable[[str], None] = lambda code: None,
        upload_max_bytes: int | None = None,
        max_task_upload_bytes: int | None = None,
    ) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.upload_max_bytes = upload_max_bytes or max_body_bytes
        self.max_task_upload_bytes = max_task_upload_bytes or max_body_bytes
        self.on_refuse = on_refuse  # counts refusals by error code

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.lower(): v for k, v in scope["headers"]}
        length = _content_length(headers.get(b"content-length"))
        limit, setting = self.max_body_bytes, "TRACE_QUERY_MAX_BODY_BYTES"
        if scope.get("method") == "PUT" and _UPLOAD.match(scope["path"]):
            limit, setting = self.upload_max_bytes, "TRACE_ENRICHMENT_MAX_BYTES"
        elif scope["path"].startswith(TASK_UPLOADS):
            limit, setting = self.max_task_upload_bytes, "TRACE_QUERY_MAX_UPLOAD_BYTES"
        if length is not None and length > limit:
            await self._too_large(send, limit, setting)
            return
        if needs_token(scope["path"]) and not _has_bearer(headers.get(b"authorization")):
            body_pending = bool(length) or b"transfer-encoding" in headers
            self.on_refuse("missing_token")
            await _missing_token(send, close=body_pending)
            return
        if length is not None or b"transfer-encoding" not in headers:
            await self.app(scope, receive, send)
            return
        try:
            body = await self._read_capped(receive, limit)
        except _TooLarge:
            await self._too_large(send, limit, setting)
            return
        await self.app(scope, _replay(body, receive), send)

    async def _read_capped(self, receive: Receive, limit: int) -> bytes:
        """The whole body of a request sent without a length, refused past the cap."""
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise _TooLarge  # nobody is left to answer; any refusal ends the request
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                raise _TooLarge
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)

    async def _too_large(self, send: Send, limit: int, setting: str) -> None:
        self.on_refuse("request_too_large")
        if setting == "TRACE_QUERY_MAX_UPLOAD_BYTES":
            await _send_error(
                send,
                413,
                "request_too_large",
                f"the upload is larger than {limit} bytes, the limit of a task's staged file "
                "(TRACE_QUERY_MAX_UPLOAD_BYTES); nothing was stored",
            )
            return
        advice = (
            "split the upload or ask the operator to raise it"
            if setting == "TRACE_ENRICHMENT_MAX_BYTES"
            else "SQL is at most 100,000 characters: send a shorter request, or export large "
            "results rather than sending large inputs"
        )
        await _send_error(
            send,
            413,
            "request_too_large",
            f"the request body is larger than {limit} bytes, the limit of this service "
            f"({setting}); {advice}",
        )


def _has_bearer(value: bytes | None) -> bool:
    if value is None:
        return False
    scheme, _, credentials = value.strip().partition(b" ")
    return scheme.lower() == b"bearer" and bool(credentials.strip())


def _content_length(value: bytes | None) -> int | None:
    if value is None:
        return None
    try:
        return int(value)
    except ValueError:
        return None  # the server's HTTP parser has already refused a malformed length


def _replay(body: bytes, receive: Receive) -> Receive:
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()  # after the body: the disconnect, when it comes

    return replay


async def _missing_token(send: Send, *, close: bool) -> None:
    await _send_error(
        send,
        401,
        "missing_token",
        "send a capability token as `Authorization: Bearer <token>` "
        "(`trace token issue --org ORG --subject SUB` makes one)",
        close=close,
        extra_headers=[(b"www-authenticate", b'Bearer realm="trace"')],
    )


async def _send_error(
    send: Send,
    status: int,
    code: str,
    message: str,
    *,
    close: bool = True,
    extra_headers: list[tuple[bytes, bytes]] | None = None,
) -> None:
    body = json.dumps({"error": {"code": code, "message": message}}).encode()
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        *([(b"connection", b"close")] if close else []),
        *(extra_headers or []),
    ]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
