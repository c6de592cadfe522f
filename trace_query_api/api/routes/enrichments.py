"""The organisation's enrichment datasets: upload rows (CSV or Parquet) as `org_<org>__<name>`
(`transforms:manage`: what its transforms join), list them. The same checks and commit as
`trace enrich upload` (`trace_resources.udfs.enrichments`): each upload is the dataset's next
version, readable by the organisation only; a refused upload commits nothing.

    PUT /v1/enrichments/labels?schema=address:binary,label:string   (body: the CSV)
    PUT /v1/enrichments/labels                (body: Parquet; its own schema, or ?schema=)
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Request, Response, status
from starlette.concurrency import run_in_threadpool

from trace_query_api.api.deps import CurrentUser, ServicesDep, TransformManager
from trace_query_api.api.docs import AUTH_ERRORS, errors
from trace_query_api.errors import InvalidEnrichmentError
from trace_query_api.models import ColumnPublic, EnrichmentPublic, EnrichmentsPublic
from trace_resources.storage import enrichments as registry
from trace_resources.storage.paths import UNPARTITIONED
from trace_resources.storage.read_model import ReadModel
from trace_resources.udfs.enrichments import (
    EnrichmentError,
    Limits,
    Uploaded,
    detect_format,
    parse_schema,
    upload,
)

router = APIRouter(prefix="/v1/enrichments", tags=["enrichments"])


@router.put(
    "/{name}",
    response_model=EnrichmentPublic,
    status_code=status.HTTP_201_CREATED,
    summary="Upload an enrichment dataset's rows (CSV or Parquet) as its next version",
    responses={
        200: {"model": EnrichmentPublic, "description": "Unchanged: the same rows as now"},
        **errors(*AUTH_ERRORS, 403, 413, 422, 503),
    },
    openapi_extra={  # the body is the file itself, read by the route (not a JSON model)
        "requestBody": {
            "required": True,
            "content": {
                "text/csv": {"schema": {"type": "string"}},
                "application/vnd.apache.parquet": {
                    "schema": {"type": "string", "format": "binary"}
                },
            },
        }
    },
)
async def put_enrichment(
    name: str,
    request: Request,
    principal: TransformManager,
    services: ServicesDep,
    response: Response,
    schema: Annotated[
        str | None,
        Query(
            max_length=10_000,
            description="name:type,... (e.g. address:binary,label:string); required for CSV, "
            "optional for Parquet (its columns are cast to it). Binary columns are 0x-hex in "
            "a CSV.",
        ),
    ] = None,
    format: Annotated[  # noqa: A002  (the query parameter's name)
        str | None,
        Query(description="csv or parquet (default: from Content-Type, else from the bytes)"),
    ] = None,
    description: Annotated[str | None, Query(max_length=2_000)] = None,
) -> EnrichmentPublic:
    """The body is the file (`Content-Type: text/csv` or `application/vnd.apache.parquet`).
    It is stored as `org_<org>__<name>` (unpartitioned, replace mode); `name` may also be
    the full `org_<org>__<name>` of the token's organisation. A refused upload answers 422
    `invalid_enrichment` with one line saying why (for a CSV row: its line and column)."""
    data = await request.body()
    limits = Limits.from_settings(services.settings)
    try:
        fmt = detect_format(data, format or request.headers.get("content-type"))
        declared = parse_schema(schema, limits) if schema else None
        done: Uploaded = await run_in_threadpool(
            upload,
            services.engine,
            services.datasets,
            org=principal.org,
            name=name,
            data=data,
            fmt=fmt,
            schema=declared,
            uploaded_by=f"{principal.org}/{principal.subject}",
            limits=limits,
            description=description,
        )
    except EnrichmentError as exc:
        raise InvalidEnrichmentError(str(exc)) from None
    if not done.changed:
        response.status_code = status.HTTP_200_OK
    return EnrichmentPublic(
        name=done.dataset,
        version=done.version,
        changed=done.changed,
        rows=done.rows,
        columns=[ColumnPublic(name=n, type=t) for n, t in done.columns],
    )


@router.get(
    "",
    response_model=EnrichmentsPublic,
    summary="Your organisation's enrichment datasets (their current versions)",
    responses=errors(*AUTH_ERRORS, 403, 503),
)
def list_enrichments(principal: CurrentUser, services: ServicesDep) -> EnrichmentsPublic:
    read = ReadModel(services.engine)
    found = []
    for item in registry.listed(services.engine, principal.org):
        current = read.current_versions(item.name, [UNPARTITIONED]).get(UNPARTITIONED)
        schema = read.registered_schema(item.name)
        if current is None or schema is None:
            continue  # registered, never committed (its first upload failed)
        found.append(
            EnrichmentPublic(
                name=item.name,
                version=current.version,
                changed=True,
                rows=sum(f.rows for f in current.manifest.files),
                columns=[ColumnPublic(name=f["name"], type=f["type"]) for f in schema[1]],
            )
        )
    return EnrichmentsPublic(data=found, count=len(found))
