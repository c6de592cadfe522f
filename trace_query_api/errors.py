"""The query service's errors, written down in one place.

Every error becomes one JSON body, `{"error": {"code": ..., "message": ...}}`, with the HTTP
status of its class. Messages say what was wrong and what to do; they never reveal whether
another organisation's dataset, query, export or snapshot exists (unknown and forbidden read
the same).
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "ApiError",
    "BadRequestError",
    "InvalidSqlError",
    "BadPaginationError",
    "RowCapExceededError",
    "AuthError",
    "ForbiddenError",
    "NotFoundError",
    "UnknownDatasetError",
    "ConflictError",
    "GoneError",
    "RateLimitedError",
    "QueryTimeoutError",
    "ResourceLimitError",
    "InvalidTransformError",
    "UnavailableError",
]


class ApiError(Exception):
    """Base of every error the service answers on purpose."""

    status = 400
    code = "bad_request"

    def __init__(
        self,
        message: str,
        *,
        code: str | None = None,
        headers: dict[str, str] | None = None,
        details: Any = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        self.headers = headers or {}
        self.details = details

    def body(self) -> dict[str, Any]:
        error: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.details is not None:
            error["details"] = self.details
        return {"error": error}


class BadRequestError(ApiError):
    """The request is well-formed JSON but asks for something impossible."""


class InvalidSqlError(BadRequestError):
    """The SQL does not parse, is not one SELECT, or fails to bind."""

    code = "invalid_sql"


class BadPaginationError(BadRequestError):
    """limit, offset or cursor are out of range or do not belong to this query."""

    code = "bad_pagination"


class RowCapExceededError(BadRequestError):
    """The page asked for lies beyond the interactive row cap: export instead."""

    code = "row_cap_exceeded"


class AuthError(ApiError):
    """No token, or a token that is invalid, expired or revoked."""

    status = 401
    code = "invalid_token"

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(message, code=code, headers={"WWW-Authenticate": 'Bearer realm="trace"'})


class ForbiddenError(ApiError):
    """A valid token that may not do this (within its own organisation)."""

    status = 403
    code = "forbidden"


class NotFoundError(ApiError):
    """No such object for this token (also when it exists for another organisation)."""

    status = 404
    code = "not_found"


class UnknownDatasetError(NotFoundError):
    """A dataset the token may not read, whether or not it exists."""

    code = "unknown_dataset"

    def __init__(self, name: str) -> None:
        shown = name if len(name) <= 80 else name[:77] + "..."
        super().__init__(
            f"no dataset named {shown!r} is available to this token; "
            "GET /v1/datasets lists the datasets it may read"
        )
        self.name = name


class ConflictError(ApiError):
    status = 409
    code = "conflict"


class GoneError(ApiError):
    """A pinned version whose files were removed by garbage collection."""

    status = 410
    code = "version_gone"


class RateLimitedError(ApiError):
    status = 429
    code = "rate_limited"

    def __init__(self, message: str, *, retry_after_s: int, code: str | None = None) -> None:
        super().__init__(message, code=code, headers={"Retry-After": str(max(1, retry_after_s))})
        self.retry_after_s = retry_after_s


class QueryTimeoutError(ApiError):
    """The query ran past its time limit and was stopped."""

    status = 422
    code = "query_timeout"


class ResourceLimitError(ApiError):
    """The query needed more memory than the sandbox allows."""

    status = 422
    code = "resource_limit"


class InvalidTransformError(ApiError):
    """A transform's declaration is invalid: `details` holds one line per problem, naming the
    file, line and field."""

    status = 422
    code = "invalid_transform"


class InvalidEnrichmentError(ApiError):
    """An enrichment upload is refused (its name, format, schema or rows); the message says
    what is wrong, for a CSV row its line and column. Nothing was committed."""

    status = 422
    code = "invalid_enrichment"


class UnavailableError(ApiError):
    status = 503
    code = "unavailable"
