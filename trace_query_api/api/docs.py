"""OpenAPI declarations shared by the routes: every error status a route can answer, with the
one error body the service uses."""

from __future__ import annotations

from typing import Any

from trace_query_api.models import ErrorPublic

__all__ = ["errors", "AUTH_ERRORS"]

_DESCRIPTIONS = {
    400: "Bad request: invalid SQL, statement not allowed, bad pagination, row cap, invalid "
    "alert rule",
    401: "Missing, invalid, expired or revoked token",
    403: "Not allowed for this token",
    404: "Unknown (or not readable with this token)",
    409: "Conflict",
    410: "Pinned version garbage-collected",
    413: "Request body larger than TRACE_QUERY_MAX_BODY_BYTES (an enrichment upload: "
    "TRACE_ENRICHMENT_MAX_BYTES), refused before it is read",
    422: "Request does not match the schema, the query hit a resource limit, a transform's "
    "declaration is invalid, or an enrichment upload is refused",
    429: "Rate limit or concurrency cap; see Retry-After",
    503: "A committed file is unavailable or does not match its manifest, or the alerts "
    "database is unavailable",
}


def errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    out: dict[int | str, dict[str, Any]] = {}
    for status in statuses:
        entry: dict[str, Any] = {"model": ErrorPublic, "description": _DESCRIPTIONS[status]}
        if status == 429:
            entry["headers"] = {
                "Retry-After": {"description": "Seconds to wait", "schema": {"type": "integer"}}
            }
        out[status] = entry
    return out


AUTH_ERRORS = (401, 413, 422, 429)
