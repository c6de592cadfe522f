"""Dependencies of the routes: the process's services and the caller behind the bearer token.

`CurrentPrincipal` verifies the token (signature, algorithm, claims), then in one Postgres
round trip (autocommit: no BEGIN or COMMIT) refuses revoked tokens and applies the
organisation's and the subject's rate limits. `CurrentUser` further refuses task tokens
where only people act (creating and deleting saved queries, reading alert rules and alerts);
`AlertManager` also requires the `alerts:manage` capability (creating, updating and
disabling alert rules); `TransformManager` the `transforms:manage` capability (applying the
organisation's own transforms).
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from trace_query_api.errors import ApiError, AuthError, ForbiddenError
from trace_query_api.services import Services
from trace_resources.tokens import Principal

__all__ = [
    "ServicesDep",
    "VerifiedPrincipal",
    "admit",
    "CurrentPrincipal",
    "CurrentUser",
    "AlertManager",
    "TransformManager",
]

_bearer = HTTPBearer(
    auto_error=False,
    scheme_name="CapabilityToken",
    description="A capability token from `trace token issue`, as `Authorization: Bearer <jwt>`.",
)


async def get_services(request: Request) -> Services:
    services: Services = request.app.state.services
    return services


ServicesDep = Annotated[Services, Depends(get_services)]


async def get_verified(
    services: ServicesDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> Principal:
    """The token's principal, verified on the event loop (CPU only: signature and claims);
    not yet admitted: a route taking it calls `admit` first thing."""
    try:
        if credentials is None:
            raise AuthError(
                "send a capability token as `Authorization: Bearer <token>` "
                "(`trace token issue --org ORG --subject SUB` makes one)",
                code="missing_token",
            )
        return services.verifier.verify(credentials.credentials)
    except ApiError as exc:
        services.metrics.rejected.labels(exc.code).inc()
        raise


VerifiedPrincipal = Annotated[Principal, Depends(get_verified)]


def admit(services: Services, principal: Principal, *, firing: bool = False) -> None:
    """Refuse a revoked token or a request over its rate limits (blocking: one round trip);
    and a trigger token anywhere but where a trigger is fired (`firing`)."""
    try:
        if principal.is_trigger and not firing:
            raise ForbiddenError(
                "a trigger token only fires its triggers (`POST /v1/triggers/{name}`); "
                "everything else takes an org or task token",
                code="trigger_token_not_allowed",
            )
        with services.autocommit.connect() as conn:  # one statement: no BEGIN, no COMMIT
            services.limits.admit(conn, principal)
    except ApiError as exc:
        services.metrics.rejected.labels(exc.code).inc()
        raise


def get_principal(services: ServicesDep, principal: VerifiedPrincipal) -> Principal:
    admit(services, principal)
    return principal


CurrentPrincipal = Annotated[Principal, Depends(get_principal)]


def get_user(principal: CurrentPrincipal) -> Principal:
    if principal.is_task:
        raise ForbiddenError(
            "task tokens read only their datasets; saved queries and alerts take a user's org "
            "token",
            code="task_token_not_allowed",
        )
    return principal


CurrentUser = Annotated[Principal, Depends(get_user)]


def get_alert_manager(principal: CurrentUser) -> Principal:
    if not principal.can("alerts:manage"):
        raise ForbiddenError(
            "this token reads alert rules but does not change them; changing them takes a token "
            "with the alerts:manage capability (`trace token issue --capability alerts:manage`)",
            code="missing_capability",
        )
    return principal


AlertManager = Annotated[Principal, Depends(get_alert_manager)]


def get_transform_manager(principal: CurrentUser) -> Principal:
    if not principal.can("transforms:manage"):
        raise ForbiddenError(
            "this token lists transforms but does not apply them; applying them takes a token "
            "with the transforms:manage capability (`trace token issue --capability "
            "transforms:manage`)",
            code="missing_capability",
        )
    return principal


TransformManager = Annotated[Principal, Depends(get_transform_manager)]
