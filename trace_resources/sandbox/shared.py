"""One sandbox pool per process for custom-SQL alert rules (the Dagster step that evaluates a
range, the head follower), and another for organisations' SQL transforms (so a runaway
transform never holds up alert evaluation), each started on first use and stopped when the
process exits."""

from __future__ import annotations

import atexit
import threading

from trace_resources.sandbox.pool import SandboxPool
from trace_resources.settings import Settings, byte_size, get_settings

__all__ = ["alert_sql_pool", "udf_sql_pool"]

_lock = threading.Lock()
_pool: SandboxPool | None = None
_udf_pool: SandboxPool | None = None


def alert_sql_pool(settings: Settings | None = None) -> SandboxPool:
    global _pool
    with _lock:
        if _pool is None:
            settings = settings or get_settings()
            _pool = SandboxPool(
                settings.alert_sql_sandboxes,
                memory_bytes=byte_size(settings.alert_sql_memory_limit),
                threads=1,
                cache_bytes=0,
                name="alert-sql-sandbox",
            )
            atexit.register(_close)
        return _pool


def _close() -> None:
    global _pool
    with _lock:
        pool, _pool = _pool, None
    if pool is not None:
        pool.close()


def udf_sql_pool(settings: Settings | None = None) -> SandboxPool:
    global _udf_pool
    with _lock:
        if _udf_pool is None:
            settings = settings or get_settings()
            _udf_pool = SandboxPool(
                settings.udf_sql_sandboxes,
                memory_bytes=byte_size(settings.udf_sql_memory_limit),
                threads=1,
                cache_bytes=0,
                name="udf-sql-sandbox",
            )
            atexit.register(_close_udf)
        return _udf_pool


def _close_udf() -> None:
    global _udf_pool
    with _lock:
        pool, _udf_pool = _udf_pool, None
    if pool is not None:
        pool.close()
