"""Exports of whole results to the results bucket, as asynchronous jobs."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pyarrow.fs as pafs
from fastapi import APIRouter, Query, Request, status
from fastapi.responses import FileResponse, Response, StreamingResponse

from trace_query_api.api.deps import CurrentPrincipal, ServicesDep
from trace_query_api.api.docs import AUTH_ERRORS, errors
from trace_query_api.models import ExportPublic, ExportRequest, ExportsPublic

router = APIRouter(prefix="/v1/exports", tags=["exports"])


@router.post(
    "",
    response_model=ExportPublic,
    status_code=status.HTTP_202_ACCEPTED,
    summary="Export a query's whole result (Parquet or CSV) in the background",
    responses=errors(*AUTH_ERRORS, 400, 404, 410, 503),
)
def create_export(
    body: ExportRequest, request: Request, principal: CurrentPrincipal, services: ServicesDep
) -> ExportPublic:
    """The export reads the versions current now (or the pinned ones): its `snapshot`. Poll
    `GET /v1/exports/{id}` until `status` is `succeeded`, then fetch `download_url`."""
    row = services.submit_export(principal, body)
    return ExportPublic(**services.exports.public(row, str(request.base_url)))


@router.get(
    "",
    response_model=ExportsPublic,
    summary="Your latest exports",
    responses=errors(*AUTH_ERRORS),
)
def list_exports(
    request: Request, principal: CurrentPrincipal, services: ServicesDep
) -> ExportsPublic:
    rows = services.exports.latest(principal)
    base_url = str(request.base_url)
    return ExportsPublic(
        data=[ExportPublic(**services.exports.public(r, base_url)) for r in rows], count=len(rows)
    )


@router.get(
    "/{export_id}",
    response_model=ExportPublic,
    summary="Status of an export, and its download URL once it succeeded",
    responses=errors(*AUTH_ERRORS, 404),
)
def get_export(
    export_id: uuid.UUID, request: Request, principal: CurrentPrincipal, services: ServicesDep
) -> ExportPublic:
    row = services.exports.get(principal, str(export_id))
    return ExportPublic(**services.exports.public(row, str(request.base_url)))


@router.delete(
    "/{export_id}",
    response_model=ExportPublic,
    summary="Cancel a queued or running export",
    responses=errors(*AUTH_ERRORS, 404, 409),
)
def cancel_export(
    export_id: uuid.UUID, request: Request, principal: CurrentPrincipal, services: ServicesDep
) -> ExportPublic:
    """A queued export is dropped before it starts, a running one is stopped; no file is left.
    The answer is the export, `cancelled`; 409 once it has finished."""
    row = services.exports.cancel(principal, str(export_id))
    return ExportPublic(**services.exports.public(row, str(request.base_url)))


@router.get(
    "/{export_id}/download",
    summary="Download an export through a signed link (local object store)",
    response_class=Response,
    responses={
        200: {
            "content": {
                "application/vnd.apache.parquet": {
                    "schema": {"type": "string", "format": "binary"}
                },
                "text/csv": {"schema": {"type": "string"}},
            }
        },
        **errors(403, 404, 413, 422),
    },
)
def download_export(
    export_id: uuid.UUID,
    services: ServicesDep,
    expires: int = Query(ge=0, le=2**62),
    signature: str = Query(max_length=128),
) -> Response:
    """No token: the signature is the capability, valid until `expires`."""
    path, media_type, filename = services.exports.signed_object(str(export_id), expires, signature)
    results = services.results
    if isinstance(results.fs, pafs.LocalFileSystem):
        return FileResponse(path, media_type=media_type, filename=filename)

    def chunks() -> Iterator[bytes]:
        with results.fs.open_input_stream(path) as stream:
            while chunk := stream.read(1 << 20):
                yield chunk

    return StreamingResponse(
        chunks(),
        media_type=media_type,
        headers={"Content-Disposition": f'attachment; filename="{filename}"'},
    )
