"""`POST /v1/query`: one SELECT over the datasets the token may read."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response

from trace_query_api.api.deps import ServicesDep, VerifiedPrincipal, admit
from trace_query_api.api.docs import AUTH_ERRORS, errors
from trace_query_api.encode import (
    ARROW_MEDIA_TYPE,
    CSV_MEDIA_TYPE,
    JSON_MEDIA_TYPE,
    arrow_bytes,
    csv_bytes,
    dumps,
    json_rows,
)
from trace_query_api.errors import ResourceLimitError
from trace_query_api.models import QueryRequest, QueryResultPublic
from trace_query_api.services import PageResult, Services

router = APIRouter(prefix="/v1", tags=["query"])

QUERY_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "One page of the result. JSON by default; `Accept: "
        f"{ARROW_MEDIA_TYPE}` gives Arrow IPC (pagination and versions in the schema metadata "
        f"`trace`), `Accept: {CSV_MEDIA_TYPE}` gives CSV (pagination in `Trace-*` headers).",
        "content": {
            ARROW_MEDIA_TYPE: {"schema": {"type": "string", "format": "binary"}},
            CSV_MEDIA_TYPE: {"schema": {"type": "string"}},
        },
    },
    **errors(*AUTH_ERRORS, 400, 404, 410, 503),
}


def negotiate(request: Request) -> str:
    """The first of our media types the client accepts, in the client's order; else JSON."""
    for part in request.headers.get("accept", "").split(","):
        media_type = part.split(";")[0].strip().lower()
        if media_type in (ARROW_MEDIA_TYPE, CSV_MEDIA_TYPE, JSON_MEDIA_TYPE):
            return media_type
    return JSON_MEDIA_TYPE


def render(result: PageResult, request: Request, services: Services) -> Response:
    """The page in the negotiated media type, within the response byte budget: the sandbox
    bounds the page's Arrow bytes; text forms can be larger (hex, escapes), so a page whose
    encoding is over the budget is shortened and the rest left to `next_cursor`."""
    budget = services.settings.query_max_response_bytes
    media_type = negotiate(request)
    while True:
        response = _encode(result, media_type, services)
        rows = result.table.num_rows
        if len(response.body) <= budget:
            return response
        if rows <= 1:
            raise ResourceLimitError(
                f"one row of the result is larger than {budget} bytes as {media_type} "
                "(TRACE_QUERY_MAX_RESPONSE_BYTES): select fewer or shorter columns, ask for "
                f"{ARROW_MEDIA_TYPE}, or POST /v1/exports with the same SQL",
                code="response_too_large",
            )
        result = result.shortened(max(1, rows * budget // len(response.body) * 9 // 10))


def _encode(result: PageResult, media_type: str, services: Services) -> Response:
    meta = result.meta(services.settings.query_row_cap)
    if media_type == ARROW_MEDIA_TYPE:
        return Response(arrow_bytes(result.table, meta), media_type=ARROW_MEDIA_TYPE)
    if media_type == CSV_MEDIA_TYPE:
        headers = {
            "Trace-Snapshot": result.snapshot,
            "Trace-Row-Count": str(result.table.num_rows),
            "Trace-Truncated": "true" if result.truncated else "false",
        }
        if result.next_cursor:
            headers["Trace-Next-Cursor"] = result.next_cursor
        return Response(csv_bytes(result.table), media_type=CSV_MEDIA_TYPE, headers=headers)
    body = {
        "columns": [{"name": n, "type": t} for n, t in result.columns],
        "rows": json_rows(result.table),
        **meta,
    }
    return Response(dumps(body), media_type=JSON_MEDIA_TYPE)


@router.post(
    "/query",
    response_model=QueryResultPublic,
    summary="Run one SELECT over the datasets this token may read",
    responses=QUERY_RESPONSES,
)
def run_query(
    body: QueryRequest, request: Request, principal: VerifiedPrincipal, services: ServicesDep
) -> Response:
    """Datasets are referenced by their names (`SELECT count(*) FROM blocks`). The answer
    names the versions it read and a `snapshot` id: pass `snapshot` (or `pin`) to read the
    same versions again later. Pages: `limit`, then `cursor` = the previous `next_cursor`.
    """
    admit(services, principal)  # here, not in a dependency: one worker-thread hop per query
    result = services.run_page(
        principal,
        body.sql,
        limit=body.limit,
        offset=body.offset,
        cursor=body.cursor,
        pin=body.pin,
        snapshot=body.snapshot,
    )
    return render(result, request, services)
