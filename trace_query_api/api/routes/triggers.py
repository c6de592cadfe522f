"""Webhook triggers: `POST /v1/triggers/{name}` records a call of a trigger declared in
`TRACE_TRIGGERS` (kind `webhook`); the trigger's Dagster sensor turns each recorded call into a
run request (`trace_sensors.triggers`). Only a trigger token issued for that very trigger
(`trace token issue --org ORG --subject SUB --trigger NAME`) may fire it. The same
`Idempotency-Key` fires once: a repeated request answers the first call (200, `fired: false`).

    POST /v1/triggers/rebuild   Idempotency-Key: 2026-12-05-nightly   (body: optional JSON object)
"""

from __future__ import annotations

import json
import re
import uuid
from typing import Annotated, Any

from fastapi import APIRouter, Header, Path, Request, Response, status
from starlette.concurrency import run_in_threadpool

from trace_query_api.api.deps import ServicesDep, VerifiedPrincipal, admit
from trace_query_api.api.docs import AUTH_ERRORS, errors
from trace_query_api.errors import BadRequestError, ForbiddenError, NotFoundError
from trace_query_api.models import TriggerCallPublic
from trace_resources.storage import triggers as calls
from trace_resources.triggers import WebhookTrigger

router = APIRouter(prefix="/v1/triggers", tags=["triggers"])

MAX_PAYLOAD_BYTES = 64 * 1024
_KEY = re.compile(r"^[\x21-\x7e]{1,200}$")  # printable ASCII, no spaces


def _declared(services: ServicesDep, name: str, org: str) -> WebhookTrigger:
    for trigger in services.settings.trigger_configs():
        if isinstance(trigger, WebhookTrigger) and trigger.name == name and trigger.org == org:
            return trigger
    raise NotFoundError(
        f"no webhook trigger {name!r} for this organisation (declared in TRACE_TRIGGERS)",
        code="unknown_trigger",
    )


def _payload(body: bytes) -> dict[str, Any]:
    if not body.strip():
        return {}
    if len(body) > MAX_PAYLOAD_BYTES:
        raise BadRequestError(
            f"the body is {len(body)} bytes; a trigger call carries at most {MAX_PAYLOAD_BYTES} "
            "bytes of JSON",
            code="invalid_trigger_call",
        )
    try:
        payload = json.loads(body)
    except ValueError as exc:
        raise BadRequestError(
            f"the body is not JSON ({exc}); send a JSON object or nothing",
            code="invalid_trigger_call",
        ) from None
    if not isinstance(payload, dict):
        raise BadRequestError(
            f"the body is a JSON {type(payload).__name__}; send a JSON object or nothing",
            code="invalid_trigger_call",
        )
    return payload


@router.post(
    "/{name}",
    response_model=TriggerCallPublic,
    status_code=status.HTTP_202_ACCEPTED,
    summary="Fire a webhook trigger (once per Idempotency-Key)",
    responses={
        200: {"model": TriggerCallPublic, "description": "This key fired already: that call"},
        **errors(*AUTH_ERRORS, 400, 403, 404, 422),
    },
)
async def fire(
    request: Request,
    response: Response,
    principal: VerifiedPrincipal,
    services: ServicesDep,
    name: Annotated[str, Path(max_length=63)],
    idempotency_key: Annotated[
        str | None,
        Header(
            max_length=200,
            description="Fires once per key (printable ASCII, up to 200); none: a new call.",
        ),
    ] = None,
) -> TriggerCallPublic:
    """Record the call (its JSON body, if any, as the run's `trace/trigger_payload` tag); 202.
    403 for a token not issued for this trigger, 404 for a trigger the organisation has not
    declared."""
    await run_in_threadpool(admit, services, principal, firing=True)
    trigger = _declared(services, name, principal.org)
    if name not in principal.triggers:
        raise ForbiddenError(
            f"this token may not fire {name!r}: issue one for it with `trace token issue "
            f"--org {principal.org} --subject SUB --trigger {name}`",
            code="trigger_not_allowed",
        )
    if idempotency_key is not None and not _KEY.match(idempotency_key):
        raise BadRequestError(
            "the Idempotency-Key header must be 1 to 200 printable ASCII characters without "
            "spaces (e.g. a UUID)",
            code="invalid_idempotency_key",
        )
    payload = _payload(await request.body())
    call, new = await run_in_threadpool(
        lambda: calls.record_call(
            services.engine,
            trigger=trigger.name,
            org=principal.org,
            subject=principal.subject,
            idempotency_key=idempotency_key or str(uuid.uuid4()),
            payload=payload,
        )
    )
    if not new:
        response.status_code = status.HTTP_200_OK
    return TriggerCallPublic(
        trigger=call.trigger,
        call_id=call.id,
        correlation_id=calls.call_correlation_id(call),
        idempotency_key=call.idempotency_key,
        fired=new,
        received_at=call.received_at,
    )
