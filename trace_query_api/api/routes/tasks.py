"""`PUT /v1/tasks/uploads/{key}`: a task uploads its staged output, under its task token.

A Python transform's process holds no object-store credentials: the platform mints, for each
attempt, a task token whose `writes` lists exactly the attempt's staging keys, and the process
uploads its Parquet here. Any other key, any org token, is refused; the bytes land in the
datasets bucket under that key only, invisible to readers until the platform verifies and
commits them (the commit protocol)."""

from __future__ import annotations

import sqlalchemy as sa
from fastapi import APIRouter, Path, Request, status
from pydantic import BaseModel
from starlette.concurrency import run_in_threadpool

from trace_query_api.api.deps import ServicesDep, VerifiedPrincipal, admit
from trace_query_api.api.docs import AUTH_ERRORS, errors
from trace_query_api.errors import ForbiddenError
from trace_resources.storage.access import REVOKED_JTI_EXISTS

router = APIRouter(prefix="/v1/tasks", tags=["tasks"])


class UploadPublic(BaseModel):
    key: str
    bytes: int


@router.put(
    "/uploads/{key:path}",
    response_model=UploadPublic,
    status_code=status.HTTP_201_CREATED,
    summary="Upload one staged file of a task (its token lists the key)",
    responses=errors(*AUTH_ERRORS, 403),
)
async def upload(
    request: Request,
    principal: VerifiedPrincipal,
    services: ServicesDep,
    key: str = Path(max_length=1024),
) -> UploadPublic:
    """The body is stored as the object `key` of the datasets bucket, if and only if the token
    is a task token whose `writes` lists exactly this key (a transform's attempt's staging
    keys); 403 otherwise, and nothing is stored."""
    await run_in_threadpool(admit, services, principal)
    if not principal.may_write(key):
        raise ForbiddenError(
            f"this token may not write {key!r}: a task token writes only the staging keys of "
            "its own attempt",
            code="write_not_allowed",
        )
    body = await request.body()

    def store() -> None:
        # the platform revokes the token when the task's process ends, then verifies the
        # file: an upload still arriving after that is refused, not written over it
        with services.autocommit.connect() as conn:
            revoked = conn.execute(
                sa.text(f"SELECT {REVOKED_JTI_EXISTS}"), {"jti": principal.jti}
            ).scalar()
        if revoked:
            raise ForbiddenError(
                "this task's token was revoked while the upload arrived (its process had "
                "ended); nothing was stored",
                code="token_revoked",
            )
        services.datasets.put_bytes(key, body)

    await run_in_threadpool(store)
    return UploadPublic(key=key, bytes=len(body))
