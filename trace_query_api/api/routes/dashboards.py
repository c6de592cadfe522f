"""Dashboards of the organisation (`/v1/dashboards`), their panels' runs and embed links;
and what an embed token may do (`/v1/embed`): read its dashboard version, run its panels.

Org tokens of the organisation read and run dashboards; user tokens create, update (a new
version each time), delete them and manage embeds. Another organisation's dashboard reads
exactly as an unknown id.
"""

from __future__ import annotations

import uuid
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Path, Query, Request, status
from fastapi.responses import Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from trace_query_api.api.deps import CurrentPrincipal, CurrentUser, ServicesDep, admit
from trace_query_api.api.docs import AUTH_ERRORS, errors
from trace_query_api.api.routes.query import QUERY_RESPONSES, render
from trace_query_api.catalog import Pins
from trace_query_api.dashboards import DashboardSpec, EmbedAccess, panel_sql, shared_panels
from trace_query_api.errors import ApiError, AuthError, NotFoundError
from trace_query_api.models import (
    DashboardPublic,
    DashboardsPublic,
    DashboardVersionPublic,
    DashboardVersionsPublic,
    EmbedCreate,
    EmbedCreatedPublic,
    EmbedDashboardPublic,
    EmbedPublic,
    EmbedRunRequest,
    EmbedsPublic,
    PanelRunRequest,
    QueryResultPublic,
)
from trace_query_api.services import Services
from trace_resources.storage import dashboards as store
from trace_resources.tokens import Principal

router = APIRouter(prefix="/v1/dashboards", tags=["dashboards"])
embed_router = APIRouter(prefix="/v1/embed", tags=["dashboards"])

PanelId = Annotated[str, Path(pattern=r"^[a-z][a-z0-9_]{0,39}$")]


def _public(row: store.Dashboard, version: store.DashboardVersion | None = None) -> DashboardPublic:
    return DashboardPublic(
        id=row["id"],
        name=row["name"],
        version=row["current_version"] if version is None else version["version"],
        current_version=row["current_version"],
        created_by=row["created_by"],
        created_at=row["created_at"],
        updated_at=row["updated_at"],
        spec=None if version is None else version["spec"],
    )


@router.post(
    "",
    response_model=DashboardPublic,
    status_code=status.HTTP_201_CREATED,
    summary="Create a dashboard (version 1)",
    responses=errors(*AUTH_ERRORS, 400, 403),
)
def create_dashboard(
    body: DashboardSpec, principal: CurrentUser, services: ServicesDep
) -> DashboardPublic:
    row = services.dashboards.create(principal, body)
    return _public(row, services.dashboards.version(principal, uuid.UUID(row["id"]), 1))


@router.get(
    "",
    response_model=DashboardsPublic,
    summary="Your organisation's dashboards",
    responses=errors(*AUTH_ERRORS),
)
def list_dashboards(principal: CurrentPrincipal, services: ServicesDep) -> DashboardsPublic:
    rows = services.dashboards.of_org(principal)
    return DashboardsPublic(data=[_public(r) for r in rows], count=len(rows))


@router.get(
    "/{dashboard_id}",
    response_model=DashboardPublic,
    summary="One dashboard with its newest spec (or `?version=N`)",
    responses=errors(*AUTH_ERRORS, 404),
)
def get_dashboard(
    dashboard_id: uuid.UUID,
    principal: CurrentPrincipal,
    services: ServicesDep,
    version: Annotated[int | None, Query(ge=1, le=2**31 - 1)] = None,
) -> DashboardPublic:
    row = services.dashboards.get(principal, dashboard_id)
    return _public(row, services.dashboards.version(principal, dashboard_id, version))


@router.put(
    "/{dashboard_id}",
    response_model=DashboardPublic,
    summary="Replace the spec: a new version",
    responses=errors(*AUTH_ERRORS, 400, 403, 404),
)
def update_dashboard(
    dashboard_id: uuid.UUID, body: DashboardSpec, principal: CurrentUser, services: ServicesDep
) -> DashboardPublic:
    row = services.dashboards.update(principal, dashboard_id, body)
    version = services.dashboards.version(principal, dashboard_id, row["current_version"])
    return _public(row, version)


@router.get(
    "/{dashboard_id}/versions",
    response_model=DashboardVersionsPublic,
    summary="Every version of a dashboard, oldest first",
    responses=errors(*AUTH_ERRORS, 404),
)
def list_versions(
    dashboard_id: uuid.UUID, principal: CurrentPrincipal, services: ServicesDep
) -> DashboardVersionsPublic:
    rows = services.dashboards.versions(principal, dashboard_id)
    data = [
        DashboardVersionPublic(
            version=r["version"], created_by=r["created_by"], created_at=r["created_at"]
        )
        for r in rows
    ]
    return DashboardVersionsPublic(data=data, count=len(data))


@router.delete(
    "/{dashboard_id}",
    status_code=status.HTTP_204_NO_CONTENT,
    response_class=Response,
    summary="Delete a dashboard, its versions and its embed links",
    responses=errors(*AUTH_ERRORS, 403, 404),
)
def delete_dashboard(
    dashboard_id: uuid.UUID, principal: CurrentUser, services: ServicesDep
) -> Response:
    services.dashboards.delete(principal, dashboard_id)
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@router.post(
    "/{dashboard_id}/panels/{panel_id}/run",
    response_model=QueryResultPublic,
    summary="Run one panel's query with parameter values (drill-down sets one)",
    responses=QUERY_RESPONSES,
)
def run_panel(
    dashboard_id: uuid.UUID,
    panel_id: PanelId,
    body: PanelRunRequest,
    request: Request,
    principal: CurrentPrincipal,
    services: ServicesDep,
) -> Response:
    version = services.dashboards.version(principal, dashboard_id, body.version)
    sql = panel_sql(version["spec"], panel_id, body.parameters)
    result = services.run_page(
        principal, sql, limit=body.limit, offset=None, cursor=None, pin=None, snapshot=None
    )
    return render(result, request, services)


# -- embed links -------------------------------------------------------------------------------


def _pins_now(
    services: Services, spec: dict[str, Any], panels: set[str], principal: Principal
) -> Pins:
    """The versions each shared panel reads now, merged: the embed reads them on every view."""
    pins: Pins = {}
    for panel_id in sorted(panels):
        sql = panel_sql(spec, panel_id, {})
        plan = services.plan(principal, sql, pin=None, snapshot=None)
        for name, versions in plan.resolution.versions.items():
            pins.setdefault(name, {}).update(versions)
    return pins


@router.post(
    "/{dashboard_id}/embeds",
    response_model=EmbedCreatedPublic,
    status_code=status.HTTP_201_CREATED,
    summary="A read-only, expiring embed link for one version (or one panel of it)",
    responses=errors(*AUTH_ERRORS, 400, 403, 404),
)
def create_embed(
    dashboard_id: uuid.UUID,
    body: EmbedCreate,
    request: Request,
    principal: CurrentUser,
    services: ServicesDep,
) -> EmbedCreatedPublic:
    max_ttl = services.settings.query_token_max_ttl_s
    if body.ttl_s > max_ttl:
        raise ApiError(
            f"ttl_s is above {max_ttl} s, the longest token life (TRACE_QUERY_TOKEN_MAX_TTL_S)",
            code="invalid_request",
        )
    version = services.dashboards.version(principal, dashboard_id, body.version)
    ids = {p["id"] for p in version["spec"]["panels"]}
    if body.panel is not None and body.panel not in ids:
        raise NotFoundError(
            f"version {version['version']} has no panel {body.panel!r}", code="unknown_panel"
        )
    panels = shared_panels(version["spec"], body.panel)
    pins = _pins_now(services, version["spec"], panels, principal) if body.pin_versions else None
    row = store.create_embed(
        services.engine,
        org=principal.org,
        dashboard_id=str(dashboard_id),
        version=version["version"],
        panel=body.panel,
        pins=pins,
        created_by=principal.subject,
        ttl_s=body.ttl_s,
    )
    token = services.embeds.issue(row)
    root = request.scope.get("root_path", "")
    return EmbedCreatedPublic(
        **EmbedPublic.model_validate(row).model_dump(),
        token=token,
        url=f"{root}/ui/embed/{row['id']}#token={token}",
    )


@router.get(
    "/{dashboard_id}/embeds",
    response_model=EmbedsPublic,
    summary="The dashboard's embed links (tokens are not shown again)",
    responses=errors(*AUTH_ERRORS, 403, 404),
)
def list_embeds(
    dashboard_id: uuid.UUID, principal: CurrentUser, services: ServicesDep
) -> EmbedsPublic:
    services.dashboards.get(principal, dashboard_id)
    rows = store.org_embeds(services.engine, principal.org, str(dashboard_id))
    return EmbedsPublic(data=[EmbedPublic.model_validate(r) for r in rows], count=len(rows))


@router.delete(
    "/{dashboard_id}/embeds/{embed_id}",
    status_code=status.HTTP_204_NO_CONTENT,
    response_class=Response,
    summary="Revoke an embed link: refused on its next use",
    responses=errors(*AUTH_ERRORS, 403, 404),
)
def revoke_embed(
    dashboard_id: uuid.UUID, embed_id: uuid.UUID, principal: CurrentUser, services: ServicesDep
) -> Response:
    services.dashboards.get(principal, dashboard_id)
    if not store.revoke_embed(services.engine, principal.org, str(dashboard_id), str(embed_id)):
        raise NotFoundError(
            f"dashboard {str(dashboard_id)!r} has no embed {str(embed_id)!r}",
            code="unknown_embed",
        )
    return Response(status_code=status.HTTP_204_NO_CONTENT)


# -- what an embed token does ------------------------------------------------------------------

_embed_bearer = HTTPBearer(
    auto_error=False,
    scheme_name="EmbedToken",
    description="The token of a dashboard's embed link, as `Authorization: Bearer <token>`.",
)


def get_embed(
    services: ServicesDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_embed_bearer)],
) -> EmbedAccess:
    """The live embed behind the bearer token (checked in Postgres on every request)."""
    if credentials is None:
        raise AuthError(
            "send the embed token of a share link as `Authorization: Bearer <token>`",
            code="missing_token",
        )
    access = services.embeds.verify(credentials.credentials)
    admit(services, access.principal(frozenset()))
    return access


EmbedDep = Annotated[EmbedAccess, Depends(get_embed)]


@embed_router.get(
    "/dashboard",
    response_model=EmbedDashboardPublic,
    summary="The shared dashboard version (its panels without their SQL)",
    responses=errors(401),
)
def embed_dashboard(access: EmbedDep) -> EmbedDashboardPublic:
    allowed = access.panels
    panels = [
        {k: v for k, v in p.items() if k not in ("sql", "query_id")}
        for p in access.spec["panels"]
        if p["id"] in allowed
    ]
    return EmbedDashboardPublic(
        dashboard_id=access.embed["dashboard_id"],
        version=access.embed["version"],
        name=str(access.spec["name"]),
        panel=access.embed["panel"],
        parameters=list(access.spec.get("parameters", [])),
        panels=panels,
    )


@embed_router.post(
    "/panels/{panel_id}/run",
    response_model=QueryResultPublic,
    summary="Run a shared panel (its stored SQL, at the pinned versions)",
    responses=QUERY_RESPONSES,
)
def embed_run_panel(
    panel_id: PanelId,
    body: EmbedRunRequest,
    request: Request,
    access: EmbedDep,
    services: ServicesDep,
) -> Response:
    if panel_id not in access.panels:
        raise NotFoundError(f"this embed link shares no panel {panel_id!r}", code="unknown_panel")
    sql = panel_sql(access.spec, panel_id, body.parameters)
    principal = access.principal(services.parser.parse(sql).datasets)
    pins = access.embed["pins"]
    result = services.run_page(
        principal, sql, limit=body.limit, offset=None, cursor=None, pin=pins, snapshot=None
    )
    return render(result, request, services)
