"""The organisation's own transforms (SQL UDFs): apply a declaration (`transforms:manage`),
list the newest version of each. The same validation and registry as `trace udf apply`
(`trace_resources.udfs.registry`); a token applies only its organisation's `org_<org>__…`
transforms, over the datasets it may read."""

from __future__ import annotations

from fastapi import APIRouter, Response, status

from trace_query_api.api.deps import CurrentUser, ServicesDep, TransformManager
from trace_query_api.api.docs import AUTH_ERRORS, errors
from trace_query_api.errors import InvalidTransformError
from trace_query_api.models import TransformApply, TransformPublic, TransformsPublic
from trace_resources.storage import udfs as udf_store
from trace_resources.udfs import UdfError
from trace_resources.udfs.registry import apply
from trace_resources.udfs.reload import reload_code_location

router = APIRouter(prefix="/v1/transforms", tags=["transforms"])


def _public(stored: udf_store.StoredUdf) -> TransformPublic:
    decl = stored.declaration
    return TransformPublic(
        name=stored.name,
        version=stored.version,
        changed=stored.changed,
        partitioning=decl["partitioning"],
        mode=decl["mode"],
        inputs=[i["dataset"] for i in decl["inputs"]],
        applied_by=stored.applied_by,
        applied_at=stored.created_at,
    )


@router.post(
    "",
    response_model=TransformPublic,
    status_code=status.HTTP_201_CREATED,
    summary="Apply a transform's declaration (a new version unless unchanged)",
    responses={
        200: {"model": TransformPublic, "description": "Unchanged: the newest version is this"},
        **errors(*AUTH_ERRORS, 400, 403, 503),
    },
)
def apply_transform(
    body: TransformApply, principal: TransformManager, services: ServicesDep, response: Response
) -> TransformPublic:
    """Validates the declaration as `trace udf apply` does; an invalid one answers 422
    `invalid_transform` with one `details` line per problem (`file:line: field: …`). 201 for a
    new version, 200 when the newest version is this very declaration. A new version reloads
    the running Dagster deployment's code location when TRACE_DAGSTER_URL is set (`reloaded`,
    `reload` say what happened; a webserver that is down never fails the apply)."""
    try:
        stored = apply(
            services.engine,
            body.yaml,
            body.file,
            f"{principal.org}/{principal.subject}",
            org=principal.org,
            principal=principal,
        )
    except UdfError as exc:
        lines = str(exc).splitlines()
        raise InvalidTransformError("; ".join(lines), details=lines) from None
    if not stored.changed:
        response.status_code = status.HTTP_200_OK
        return _public(stored)
    settings = services.settings
    outcome = reload_code_location(settings.dagster_url, settings.dagster_location)
    return _public(stored).model_copy(
        update={"reloaded": outcome.reloaded, "reload": outcome.message}
    )


@router.get(
    "",
    response_model=TransformsPublic,
    summary="Your organisation's transforms (the newest version of each)",
    responses=errors(*AUTH_ERRORS, 403, 503),
)
def list_transforms(principal: CurrentUser, services: ServicesDep) -> TransformsPublic:
    found = [_public(s) for s in udf_store.latest(services.engine, principal.org)]
    return TransformsPublic(data=found, count=len(found))
