"""One sandbox pool per process for custom-SQL alert rules (the Dagster step that evaluates a
range, the head follower), and another for organisations' SQL transforms (so a runaway
transform never holds up alert evaluation), each started on first use and stopped when the
process exits."""

from __future__ import annotations

import atexit
import threading
from collections.abc import Callable

from trace_resources.sandbox.pool import SandboxPool
from trace_resources.settings import Settings, byte_size, get_settings

__all__ = ["alert_sql_pool", "udf_sql_pool", "close"]

_lock = threading.Lock()
_pools: dict[str, SandboxPool] = {}


def _shared(
    name: str, settings: Settings | None, size_limit: Callable[[Settings], tuple[int, str]]
) -> SandboxPool:
    """The process's pool `name`, started on first use with `size_limit(settings)`: its
    number of workers and its memory limit."""
    with _lock:
        pool = _pools.get(name)
        if pool is None:
            size, memory_limit = size_limit(settings or get_settings())
            pool = SandboxPool(
                size, memory_bytes=byte_size(memory_limit), threads=1, cache_bytes=0, name=name
            )
            _pools[name] = pool
            atexit.register(close, name)
        return pool


def close(name: str) -> None:
    """Stop the process's pool `name` (the next use starts a new one)."""
    with _lock:
        pool = _pools.pop(name, None)
    if pool is not None:
        pool.close()


def alert_sql_pool(settings: Settings | None = None) -> SandboxPool:
    return _shared(
        "alert-sql-sandbox", settings, lambda s: (s.alert_sql_sandboxes, s.alert_sql_memory_limit)
    )


def udf_sql_pool(settings: Settings | None = None) -> SandboxPool:
    return _shared(
        "udf-sql-sandbox", settings, lambda s: (s.udf_sql_sandboxes, s.udf_sql_memory_limit)
    )
