"""Schemathesis against the service's own OpenAPI document, through the real uvicorn.

For every GET and POST operation it generates valid and invalid requests (with a valid token)
and checks that no answer is a server error, and that each status, content type and body is
one the document declares. Bounded: a few examples per operation and mode, derandomised, so
the run is short and repeatable.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.core.failures import FailureGroup, ServerError
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from infra.local.query_service import QueryServer
from tests.query.conftest import Tokens, bearer

CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
]
EXAMPLES = 12


def test_every_operation_conforms_to_the_openapi_document(
    server: QueryServer, tokens: Tokens
) -> None:
    schema = schemathesis.openapi.from_url(f"{server.url}/openapi.json")
    headers = bearer(tokens.org("fuzz", "schemathesis"))
    operations = [result.ok() for result in schema.get_all_operations()]  # type: ignore[union-attr]
    selected = [op for op in operations if op.method.upper() in ("GET", "POST")]
    assert len(selected) >= 14, [op.label for op in selected]
    seen: dict[str, set[int]] = {}

    for operation in selected:
        has_inputs = any(
            len(part) for part in (operation.path_parameters, operation.query, operation.body)
        )
        modes = [GenerationMode.POSITIVE] + ([GenerationMode.NEGATIVE] if has_inputs else [])
        for mode in modes:

            @settings(
                max_examples=EXAMPLES,
                deadline=None,
                database=None,
                derandomize=True,
                phases=[Phase.explicit, Phase.generate],
                suppress_health_check=list(HealthCheck),
            )
            @given(case=operation.as_strategy(generation_mode=mode))
            def exercise(case: Any) -> None:
                response = case.call(base_url=server.url, headers=headers, timeout=30)
                seen.setdefault(case.operation.label, set()).add(response.status_code)
                case.validate_response(response, checks=CHECKS, headers=headers)

            exercise()

    # the run reached every operation, and some of them past validation
    assert set(seen) == {op.label for op in selected}
    assert any(200 in codes for codes in seen.values()), seen


def test_a_planted_server_error_would_fail_the_check(server: QueryServer) -> None:
    """The check that guards the run above does fail on a 5xx (a test that can not fail is
    worth nothing)."""
    schema = schemathesis.openapi.from_url(f"{server.url}/openapi.json")
    operation = schema["/healthz"]["GET"]
    case = operation.Case()
    response = httpx.Response(
        500,
        json={"error": {"code": "internal", "message": "boom"}},
        request=httpx.Request("GET", f"{server.url}/healthz"),
    )
    response.elapsed = timedelta(milliseconds=1)
    with pytest.raises(FailureGroup) as failed:
        case.validate_response(response, checks=[not_a_server_error])
    assert any(isinstance(e, ServerError) for e in failed.value.exceptions)
