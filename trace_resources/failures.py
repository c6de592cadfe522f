"""Turn Trace's errors into Dagster failures with a clear description."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import dagster as dg

from trace_resources.errors import TraceError

__all__ = ["as_dagster_failure"]


@contextlib.contextmanager
def as_dagster_failure() -> Iterator[None]:
    """Re-raise a TraceError as `dg.Failure`; permanent errors are not retried by Dagster."""
    try:
        yield
    except TraceError as exc:
        raise dg.Failure(
            description=f"{type(exc).__name__}: {exc}",
            metadata={"error": type(exc).__name__},
            allow_retries=not exc.permanent,
        ) from exc
