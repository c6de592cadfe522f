"""The message history of one unit of work (`GET /v1/history/{correlation_id}`): each hop it
made from its finalized blocks through their commit to the alerts raised and their deliveries,
in time order, scoped to the token's organisation (`trace_resources.event_history`)."""

from __future__ import annotations

from typing import Annotated

import sqlalchemy as sa
from fastapi import APIRouter, Path

from trace_query_api.api.deps import CurrentUser, ServicesDep
from trace_query_api.api.docs import AUTH_ERRORS, errors
from trace_query_api.errors import NotFoundError, UnavailableError
from trace_query_api.models import HistoryPublic, HopPublic
from trace_resources import event_history
from trace_resources.alert_pipeline import tables as alert_tables

router = APIRouter(prefix="/v1/history", tags=["history"])

CorrelationIdPath = Annotated[
    str,
    Path(
        pattern=r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$",
        description="The correlation id (an alert's `correlation_id`).",
    ),
]


@router.get(
    "/{correlation_id}",
    response_model=HistoryPublic,
    summary="The path of one unit of work, hop by hop, with timestamps",
    responses=errors(*AUTH_ERRORS, 403, 404, 503),
)
def get_history(
    correlation_id: CorrelationIdPath, principal: CurrentUser, services: ServicesDep
) -> HistoryPublic:
    """The public chain hops (finalized blocks, their commit) and your organisation's own
    (its alerts and their deliveries). An id that is not yours answers 404, as an unknown one."""
    engines = [services.engine, alert_tables.data_engine(services.settings.data_dsn)]
    try:
        found = event_history.read_hops(engines, correlation_id)
    except sa.exc.OperationalError as exc:  # half a path would mislead: none, and say why
        raise UnavailableError(
            "the history is kept in the state and the alerts databases and one of them is "
            "unavailable right now; retry shortly",
            code="history_unavailable",
        ) from exc
    hops = event_history.visible_to(found, principal.org)
    if hops is None:
        raise NotFoundError(
            f"no history for correlation id {correlation_id!r} in your organisation; an "
            "alert's correlation_id (GET /v1/alerts) names one",
            code="unknown_correlation_id",
        )
    return HistoryPublic(
        correlation_id=correlation_id,
        hops=[
            HopPublic(hop=h.hop, at=h.at, process=h.process, org=h.org, details=h.details)
            for h in hops
        ],
    )
