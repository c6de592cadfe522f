"""Saved queries shared within an organisation."""

from __future__ import annotations

import uuid

from fastapi import APIRouter, Request, status
from fastapi.responses import Response

from trace_query_api.api.deps import CurrentPrincipal, CurrentUser, ServicesDep
from trace_query_api.api.docs import AUTH_ERRORS, errors
from trace_query_api.api.routes.query import QUERY_RESPONSES, render
from trace_query_api.models import (
    QueryResultPublic,
    SavedQueriesPublic,
    SavedQueryCreate,
    SavedQueryPublic,
    SavedQueryRunRequest,
)
from trace_query_api.saved import public

router = APIRouter(prefix="/v1/saved-queries", tags=["saved queries"])


@router.post(
    "",
    response_model=SavedQueryPublic,
    status_code=status.HTTP_201_CREATED,
    summary="Save a query for your organisation",
    responses=errors(*AUTH_ERRORS, 400, 403, 409),
)
def create_saved_query(
    body: SavedQueryCreate, principal: CurrentUser, services: ServicesDep
) -> SavedQueryPublic:
    services.parser.parse(body.sql)  # one SELECT, or refuse it now rather than at each run
    row = services.saved.create(principal, body.name, body.sql, body.description)
    return SavedQueryPublic(**public(row))


@router.get(
    "",
    response_model=SavedQueriesPublic,
    summary="Your organisation's saved queries",
    responses=errors(*AUTH_ERRORS),
)
def list_saved_queries(principal: CurrentPrincipal, services: ServicesDep) -> SavedQueriesPublic:
    rows = services.saved.of_org(principal)
    return SavedQueriesPublic(data=[SavedQueryPublic(**public(r)) for r in rows], count=len(rows))


@router.get(
    "/{query_id}",
    response_model=SavedQueryPublic,
    summary="One saved query",
    responses=errors(*AUTH_ERRORS, 404),
)
def get_saved_query(
    query_id: uuid.UUID, principal: CurrentPrincipal, services: ServicesDep
) -> SavedQueryPublic:
    return SavedQueryPublic(**public(services.saved.get(principal, query_id)))


@router.post(
    "/{query_id}/run",
    response_model=QueryResultPublic,
    summary="Run a saved query (as the caller's token allows)",
    responses=QUERY_RESPONSES,
)
def run_saved_query(
    query_id: uuid.UUID,
    body: SavedQueryRunRequest,
    request: Request,
    principal: CurrentPrincipal,
    services: ServicesDep,
) -> Response:
    saved = services.saved.get(principal, query_id)
    result = services.run_page(
        principal,
        saved["sql"],
        limit=body.limit,
        offset=body.offset,
        cursor=body.cursor,
        pin=body.pin,
        snapshot=body.snapshot,
    )
    return render(result, request, services)


@router.delete(
    "/{query_id}",
    status_code=status.HTTP_204_NO_CONTENT,
    response_class=Response,
    summary="Delete a saved query you created",
    responses=errors(*AUTH_ERRORS, 403, 404),
)
def delete_saved_query(
    query_id: uuid.UUID, principal: CurrentUser, services: ServicesDep
) -> Response:
    services.saved.delete(principal, query_id)
    return Response(status_code=status.HTTP_204_NO_CONTENT)
