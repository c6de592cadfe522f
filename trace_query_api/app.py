"""The FastAPI application of the query service.

    uvicorn trace_query_api.app:app --factory      (or `python -m trace_query_api`)

`create_app(settings)` builds the app; the services (Postgres engine, keyring, sandboxes,
caches, export workers) start with the app's lifespan and stop with it.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from trace_query_api.api.routes import (
    alerts,
    dashboards,
    datasets,
    docs_ui,
    enrichments,
    exports,
    health,
    history,
    query,
    saved_queries,
    tasks,
    transforms,
    triggers,
    ui,
)
from trace_query_api.edge import EdgeMiddleware
from trace_query_api.errors import ApiError
from trace_query_api.metrics import MetricsMiddleware
from trace_query_api.secure import refuse_insecure_settings
from trace_query_api.services import Services
from trace_resources.settings import QuerySettings, get_query_settings
from trace_resources.telemetry import Tracing

__all__ = ["create_app", "app"]

log = logging.getLogger(__name__)

_PAGINATION_FIELDS = {"limit", "offset", "cursor"}
_HTTP_CODES = {404: "not_found", 405: "method_not_allowed", 415: "unsupported_media_type"}

DESCRIPTION = """
Organisation-scoped reads over Trace's committed datasets.

Send a capability token (`trace token issue --org ORG --subject SUB`) as
`Authorization: Bearer <token>`. An org token reads the public chain datasets (`blocks`,
`transactions`, `logs`, and datasets published by the operators) and its organisation's own
datasets (named `org_<org>__<name>`); a task token reads only the datasets and partitions it
lists. Errors are `{"error": {"code": ..., "message": ...}}`.

Org tokens also read their organisation's alert rules and alerts (`/v1/alerts`); creating,
updating and disabling rules takes a token with the `alerts:manage` capability
(`trace token issue --org ORG --subject SUB --capability alerts:manage`). Secrets in rules
(webhook `secret`, SMTP `password`) are never returned: they read `**********`.
"""


def create_app(settings: QuerySettings | None = None) -> FastAPI:
    settings = settings or get_query_settings()
    refuse_insecure_settings(settings)
    holder: dict[str, Services] = {}
    # one tracer per app: each uvicorn worker process exports its own spans
    tracing = Tracing.configured("trace-query", settings.otlp_endpoint)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        services = Services(settings, tracing)
        # serve only once the sandbox workers are up (a second or so), so that the first
        # queries do not queue behind their start
        for pool in (services.sandbox, services.exports.sandbox):
            if not pool.wait_ready(timeout_s=60):
                log.warning("%s: not every sandbox worker started within 60 s", pool.name)
        app.state.services = services
        holder["services"] = services
        try:
            yield
        finally:
            services.close()

    app = FastAPI(
        title="Trace query service",
        version="1",
        description=DESCRIPTION,
        lifespan=lifespan,
        docs_url=None,  # docs_ui serves /docs from local assets
        redoc_url=None,  # ReDoc loads from a CDN
    )
    app.include_router(docs_ui.router)
    app.include_router(health.router)
    app.include_router(datasets.router)
    app.include_router(query.router)
    app.include_router(exports.router)
    app.include_router(saved_queries.router)
    app.include_router(dashboards.router)
    app.include_router(dashboards.embed_router)
    app.include_router(ui.router)
    app.include_router(alerts.router)
    app.include_router(history.router)
    app.include_router(transforms.router)
    app.include_router(enrichments.router)
    app.include_router(tasks.router)
    app.include_router(triggers.router)
    _add_error_handlers(app)

    def count_refusal(code: str) -> None:
        if "services" in holder:
            holder["services"].metrics.rejected.labels(code).inc()

    # inside the metrics middleware (refusals are counted), outside everything that reads
    app.add_middleware(
        EdgeMiddleware,
        max_body_bytes=settings.query_max_body_bytes,
        on_refuse=count_refusal,
        upload_max_bytes=settings.enrichment_max_bytes,
        max_task_upload_bytes=settings.query_max_upload_bytes,
    )
    app.add_middleware(_LazyMetricsMiddleware, holder=holder)
    if tracing.enabled:  # nothing is added when tracing is off
        from opentelemetry.instrumentation.fastapi import FastAPIInstrumentor

        FastAPIInstrumentor.instrument_app(
            app, tracer_provider=tracing.provider, excluded_urls="/healthz$,/readyz$,/metrics$"
        )
    return app


class _LazyMetricsMiddleware:
    """MetricsMiddleware bound to the services the lifespan creates."""

    def __init__(self, app: Any, holder: dict[str, Services]) -> None:
        self.app = app
        self.holder = holder
        self.inner: MetricsMiddleware | None = None

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        services = self.holder.get("services")
        if services is None or scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if self.inner is None:
            self.inner = MetricsMiddleware(self.app, services.metrics)
        await self.inner(scope, receive, send)


def _error(status: int, code: str, message: str, **extra: Any) -> JSONResponse:
    error: dict[str, Any] = {"code": code, "message": message, **extra}
    return JSONResponse({"error": error}, status_code=status)


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = [
            {"loc": [str(p) for p in e.get("loc", ())], "msg": str(e.get("msg", ""))}
            for e in exc.errors()
        ]
        fields = {p for problem in problems for p in problem["loc"]}
        code = "bad_pagination" if fields & _PAGINATION_FIELDS else "invalid_request"
        where = ".".join(problems[0]["loc"]) if problems else ""
        message = str(problems[0]["msg"]) if problems else "invalid request"
        return _error(422, code, f"{where}: {message}" if where else message, details=problems)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = _HTTP_CODES.get(exc.status_code, "http_error")
        response = _error(exc.status_code, code, str(exc.detail))
        if exc.headers:
            response.headers.update(exc.headers)
        return response

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return _error(500, "internal", "an unexpected error occurred; it has been logged")


def app() -> FastAPI:
    """The factory uvicorn calls (`--factory`): settings from the environment."""
    return create_app(get_query_settings())
