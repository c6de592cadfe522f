"""Liveness, readiness and Prometheus metrics (no token: bind the service to a private
interface or keep these paths off the public load balancer)."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse, Response

from trace_query_api.api.deps import ServicesDep
from trace_query_api.models import HealthPublic, ReadyPublic

router = APIRouter(tags=["health"])


@router.get("/healthz", response_model=HealthPublic, summary="The process answers")
def healthz() -> HealthPublic:
    return HealthPublic(status="ok")


@router.get(
    "/readyz",
    response_model=ReadyPublic,
    summary="Postgres state and the object store answer",
    responses={503: {"model": ReadyPublic, "description": "A dependency does not answer"}},
)
def readyz(services: ServicesDep) -> JSONResponse:
    checks = services.readiness()
    ready = all(value == "ok" for value in checks.values())
    body = ReadyPublic(status="ready" if ready else "not_ready", checks=checks)
    return JSONResponse(body.model_dump(), status_code=200 if ready else 503)


@router.get(
    "/metrics",
    summary="Prometheus metrics",
    response_class=Response,
    responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}}}},
)
def metrics(services: ServicesDep) -> Response:
    return Response(
        services.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8"
    )
