"""Turn Trace's errors into Dagster failures with a clear description."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import dagster as dg

from trace_resources.errors import TraceError

__all__ = ["as_dagster_failure"]


@contextlib.contextmanager
def as_dagster_failure() -> Iterator[None]:
    """Re-raise a TraceError as `dg.Failure`; permanent errors are not retried by Dagster.

    A run stopped by the operator (the UI's Terminate, `trace backfill` interrupted, its worker
    stopping: Dagster raises DagsterExecutionInterruptedError in the step) fails the step
    without a retry: Dagster would otherwise honour the step's retry policy and start it again,
    extracting and staging for another minute after the operator stopped it."""
    from dagster._core.errors import DagsterExecutionInterruptedError

    try:
        yield
    except (DagsterExecutionInterruptedError, KeyboardInterrupt) as stop:
        raise dg.Failure(
            description="stopped: the run was terminated; not retried",
            metadata={"error": type(stop).__name__},
            allow_retries=False,
        ) from None
    except TraceError as exc:
        raise dg.Failure(
            description=f"{type(exc).__name__}: {exc}",
            metadata={"error": type(exc).__name__},
            allow_retries=not exc.permanent,
        ) from exc
