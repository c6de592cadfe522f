"""Alert rules (create, list, get, update, disable) and the alerts they raised, with their
delivery state, for the token's organisation.

Org tokens read; changing rules takes the `alerts:manage` capability; task tokens do neither.
"""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Path, Query, status

from trace_query_api.alerts import public_rule
from trace_query_api.api.deps import AlertManager, CurrentUser, ServicesDep
from trace_query_api.api.docs import AUTH_ERRORS, errors
from trace_query_api.models import (
    RULE_ID_PATTERN,
    AlertPublic,
    AlertRuleCreate,
    AlertRuleDetailPublic,
    AlertRulePublic,
    AlertRulesPublic,
    AlertRuleUpdate,
    AlertRuleVersionPublic,
    AlertsPublic,
    DeliveryPublic,
)

router = APIRouter(prefix="/v1/alerts", tags=["alerts"])

RuleIdPath = Annotated[str, Path(pattern=RULE_ID_PATTERN, description="The rule's id.")]
MAX_ALERTS_PAGE = 500


@router.post(
    "/rules",
    response_model=AlertRulePublic,
    status_code=status.HTTP_201_CREATED,
    summary="Create an alert rule (version 1)",
    responses=errors(*AUTH_ERRORS, 400, 403, 409, 503),
)
def create_rule(
    body: AlertRuleCreate, principal: AlertManager, services: ServicesDep
) -> AlertRulePublic:
    """The body is the rule declaration, as in a rule file (`trace alerts rule create`).
    Invalid fields answer 422 with one `details` entry per field (`loc`, `msg`)."""
    return AlertRulePublic(**public_rule(services.alerts.create_rule(principal, body)))


@router.get(
    "/rules",
    response_model=AlertRulesPublic,
    summary="Your organisation's alert rules (the version in force of each)",
    responses=errors(*AUTH_ERRORS, 403, 503),
)
def list_rules(
    principal: CurrentUser,
    services: ServicesDep,
    enabled: Annotated[
        bool | None, Query(description="Only enabled (true) or disabled (false) rules.")
    ] = None,
) -> AlertRulesPublic:
    found = services.alerts.list_rules(principal, enabled)
    return AlertRulesPublic(
        data=[AlertRulePublic(**public_rule(f)) for f in found], count=len(found)
    )


@router.get(
    "/rules/{rule_id}",
    response_model=AlertRuleDetailPublic,
    summary="One alert rule, at the version in force or a given one, and its versions",
    responses=errors(*AUTH_ERRORS, 403, 404, 503),
)
def get_rule(
    rule_id: RuleIdPath,
    principal: CurrentUser,
    services: ServicesDep,
    version: Annotated[
        int | None, Query(ge=1, le=2**31 - 1, description="This version (default: in force).")
    ] = None,
) -> AlertRuleDetailPublic:
    found, versions = services.alerts.get_rule(principal, rule_id, version)
    return AlertRuleDetailPublic(
        **public_rule(found),
        latest_version=versions[-1].version,
        versions=[
            AlertRuleVersionPublic(version=v.version, enabled=v.enabled, created_at=v.created_at)
            for v in versions
        ],
    )


@router.put(
    "/rules/{rule_id}",
    response_model=AlertRulePublic,
    summary="Write an alert rule's next version",
    responses=errors(*AUTH_ERRORS, 400, 403, 404, 503),
)
def update_rule(
    rule_id: RuleIdPath, body: AlertRuleUpdate, principal: AlertManager, services: ServicesDep
) -> AlertRulePublic:
    """The body is the whole declaration of the next version (secrets included: the service
    never returns them). `enabled: true` re-enables a disabled rule."""
    return AlertRulePublic(**public_rule(services.alerts.update_rule(principal, rule_id, body)))


@router.post(
    "/rules/{rule_id}/disable",
    response_model=AlertRulePublic,
    summary="Disable an alert rule (a new version with enabled: false)",
    responses=errors(*AUTH_ERRORS, 403, 404, 503),
)
def disable_rule(
    rule_id: RuleIdPath, principal: AlertManager, services: ServicesDep
) -> AlertRulePublic:
    """Idempotent: a rule already disabled is returned as it is, without a new version."""
    return AlertRulePublic(**public_rule(services.alerts.disable_rule(principal, rule_id)))


@router.get(
    "",
    response_model=AlertsPublic,
    summary="Your organisation's alerts, newest first, with their delivery state per channel",
    responses=errors(*AUTH_ERRORS, 400, 403, 503),
)
def list_alerts(
    principal: CurrentUser,
    services: ServicesDep,
    rule_id: Annotated[
        str | None, Query(pattern=RULE_ID_PATTERN, description="Only this rule's alerts.")
    ] = None,
    kind: Annotated[
        Literal["alert", "retraction"] | None, Query(description="Only alerts or retractions.")
    ] = None,
    partition_key: Annotated[
        str | None,
        Query(
            pattern=r"^[A-Za-z0-9_.-]+$",
            max_length=100,
            description="Only those raised on this block range.",
        ),
    ] = None,
    limit: Annotated[int, Query(ge=1, le=MAX_ALERTS_PAGE, description="Alerts per page.")] = 100,
    cursor: Annotated[
        str | None, Query(max_length=1000, description="`next_cursor` of the previous page.")
    ] = None,
) -> AlertsPublic:
    page = services.alerts.alerts(
        principal,
        rule_id=rule_id,
        kind=kind,
        partition_key=partition_key,
        limit=limit,
        cursor=cursor,
    )
    data = [
        AlertPublic(
            **{k: v for k, v in row.items() if k != "deliveries"},
            deliveries=[DeliveryPublic(**d) for d in row["deliveries"]],
        )
        for row in page.rows
    ]
    return AlertsPublic(data=data, count=len(data), next_cursor=page.next_cursor)
